"""The provenance table: what the manifest says about how the store was built, as (field, value) rows, plus the
first entries of its failures and missing-image ledgers."""

from __future__ import annotations

import json
from typing import Any, Callable

NOT_RECORDED = "not recorded"
LEDGER_ROWS = 5

Row = tuple[str, str]


def _value(v: Any) -> str:
    if v is None or v == "" or v == [] or v == {}:
        return NOT_RECORDED
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False)
    return str(v)


def precision_of(m: dict[str, Any]) -> str:
    """How the features were computed and stored: the manifest's ``precision`` when it has one, else its
    ``compute`` and ``dtype`` fields; "not recorded" in older stores."""
    parts = [f"compute {m['compute']}" if m.get("compute") else "", f"stored {m['dtype']}" if m.get("dtype") else ""]
    how = ", ".join(p for p in parts if p)
    if m.get("precision") is not None:
        return f"{_value(m['precision'])} ({how})" if how else _value(m["precision"])
    return how or NOT_RECORDED


def _model_rows(m: dict[str, Any]) -> list[Row]:
    model = m.get("model") or {}
    return [("model", _value(model.get("name"))), ("model fingerprint", _value(model.get("fingerprint"))),
            ("checkpoint", _value(m.get("vggt_model_path"))), ("layers", _value(m.get("layers"))),
            ("tensors", ", ".join(f"{n}: layer {t.get('layer')}, {t.get('dtype')}, {t.get('codec', 'zstd')}"
                                  for n, t in (m.get("tensors") or {}).items()) or NOT_RECORDED),
            ("tokens", _value(m.get("tokens")))]


def _settings_rows(m: dict[str, Any]) -> list[Row]:
    pre = m.get("preprocess") or {}
    size = pre.get("target_size")
    prep = (f"{pre['mode']}" + (f", size {size}" if size else ", size not recorded") +
            (f", multiple of {pre['multiple']}" if pre.get("multiple") else "") +
            (", EXIF applied" if pre.get("apply_exif") else "")) if pre.get("mode") else NOT_RECORDED
    ctx = m.get("context") or {}
    return [("preprocessing", prep), ("context", _value(ctx.get("mode"))),
            ("reference frame", _value(ctx.get("reference_frame")) if ctx.get("mode") == "sample" else "n/a (image)"),
            ("history", _value(ctx.get("history")) if ctx.get("mode") == "sample" else "n/a (image)"),
            ("precision", precision_of(m)), ("codec", _value(m.get("codec"))),
            ("lossy bounds (worst)", _value(m.get("lossy"))), ("source fingerprint", _value(m.get("source_fingerprint")))]


def _store_rows(m: dict[str, Any], records: int | None) -> list[Row]:
    times = m.get("times") or {}
    counts = m.get("counts") or {}
    return [("layout", _value(m.get("layout"))), ("featstore version", _value(m.get("featstore_version"))),
            ("records", NOT_RECORDED if records is None else str(records)),
            ("images named / stored", f"{m.get('total_images', '?')} / {m.get('processed_images', '?')}"),
            ("complete", _value(m.get("complete"))),
            ("counts", ", ".join(f"{k} {v}" for k, v in counts.items()) or NOT_RECORDED),
            ("feature shapes", ", ".join(f"{k} x{v}" for k, v in (m.get("feature_shapes") or {}).items()) or NOT_RECORDED),
            ("build seconds", _value(times.get("seconds"))), ("world size", _value(m.get("world_size"))),
            ("data root", _value(m.get("data_root"))),
            ("fields an export could not know", _value(m.get("provenance_unknown")))]


def manifest_rows(m: dict[str, Any], records: int | None) -> list[Row]:
    """Every provenance row of a manifest document (older stores: "not recorded" where a field is absent)."""
    return _model_rows(m) + _settings_rows(m) + _store_rows(m, records)


def source_rows(m: dict[str, Any]) -> list[list[str]]:
    """Per source file: [file, records, images or samples, missing] (a scan or list: one row saying so)."""
    src = m.get("sources") or {}
    files = list(src.get("annotations") or []) + ([src["image_list"]] if isinstance(src.get("image_list"), dict) else [])
    rows = [[str(a.get("file")), str(a.get("records", "")), str(a.get("images", a.get("samples", ""))),
             str(a.get("missing", 0))] for a in files if isinstance(a, dict)]
    if not rows and src:
        method = src.get("method", "?")
        rows = [[f"({method}: {src.get('data_path') or m.get('data_root')})", "",
                 str(src.get("images", src.get("samples", ""))), str(src.get("missing", ""))]]
    return rows


def ledger_entries(read: Callable[[str], bytes], name: str | None, limit: int = LEDGER_ROWS
                   ) -> tuple[int, list[dict[str, Any]], str]:
    """(entries, the first ``limit`` of them, a note) of a JSON-lines ledger read with ``read``."""
    if not name:
        return 0, [], ""
    try:
        lines = [ln for ln in read(name).decode("utf-8", "replace").splitlines() if ln.strip()]
    except (OSError, FileNotFoundError) as e:
        return 0, [], f"{name} could not be read ({e})"
    first = []
    for ln in lines[:limit]:
        try:
            entry = json.loads(ln)
        except ValueError:
            entry = {"line": ln}
        first.append(entry if isinstance(entry, dict) else {"line": ln})
    return len(lines), first, ""
