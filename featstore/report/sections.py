"""The report's sections, each built from the opened store; a section that cannot show something says so."""

from __future__ import annotations

import datetime as dt

import numpy as np

from featstore.formats.codecs import INT8_TARGET_REL_L2
from featstore.report import figures
from featstore.report.inputs import Inputs, Scan, short_error
from featstore.report.maps import RecordView, colour_views, record_view
from featstore.report.page import Section, esc, note, picture, plot, table
from featstore.report.provenance import NOT_RECORDED, ledger_entries, manifest_rows, source_rows
from featstore.report.select import choose_records
from featstore.report.stats import summary

SHOW_ERRORS = 3
LEGACY_UNKNOWN = ("model", "model fingerprint", "checkpoint", "layers", "tokens", "preprocessing", "context",
                  "precision", "codec")


def _errors_note(what: str, errors: dict[str, str], of: int) -> str:
    if not errors:
        return ""
    first = "; ".join(f"{k}: {v}" for k, v in list(errors.items())[:SHOW_ERRORS])
    return note(f"could not read {len(errors)} of {of} {what} (first: {first})", "bad")


def _patch_size(inputs: Inputs) -> int:
    config = (inputs.manifest.get("model") or {}).get("config") or {}
    return int(config.get("patch_size") or 14)


def _tile(inner: str, caption: str, cls: str = "") -> str:
    return f'<figure class="tile {cls}">{inner}<figcaption>{caption}</figcaption></figure>'


def _record_html(v: RecordView) -> str:
    """A record's row: each frame (with its map below it in a joint record), and for an image or sample record
    the map of the stored tokens beside the frames (a sample's kept frame outlined)."""
    tiles, beside = [], []
    for t in v.tiles:
        inner = picture(t.frame_png, f"frame {t.frame}", "frame", t.frame_note)
        if t.map_index is not None and v.kind == "joint":
            inner += picture(t.map_png, f"token map of {t.frame}", "map figure", "no map")
        elif t.map_index is not None:
            what = "tokens of the kept frame" if v.kind == "sample" else "patch tokens"
            beside.append(_tile(picture(t.map_png, f"token map of {t.frame}", "map figure", "no map"),
                                f"{what} (PCA colours)", "map-tile"))
        tiles.append(_tile(inner, esc(t.frame) + (" <b>(kept)</b>" if t.kept else ""), "kept" if t.kept else ""))
    tiles += beside
    head = f"{esc(v.key)} <span class=meta>({v.kind}, grid {v.grid[0]}x{v.grid[1]})</span>"
    extra = note(v.note) if v.note else ""
    return f'<div class="record"><h3>{head}</h3>{extra}<div class="tiles">{"".join(tiles)}</div></div>'


def feature_maps(inputs: Inputs) -> Section:
    """Seeded records: their frames as the model saw them beside the PCA colours of their patch tokens."""
    s = Section("feature-maps", "Feature maps")
    if not inputs.keys:
        return s.add(note("the store holds no records: there is no feature map to show", "bad"))
    chosen = choose_records(inputs.keys, inputs.options.samples, inputs.options.seed)
    pre = inputs.manifest.get("preprocess") or {}
    views, errors = [], {}
    for key in chosen:
        rec = inputs.read(key)
        if rec is None:
            errors[key] = inputs.errors[key]
            continue
        try:
            views.append(record_view(rec, inputs.data_root, pre, _patch_size(inputs)))
        except (ValueError, RuntimeError) as e:
            errors[key] = short_error(e)
    colour_views(views, seed=inputs.options.seed)
    shown = ("Frames are shown preprocessed as the build fed them to the model" if pre.get("mode") else
             "Frames are shown as they are on disk (the store does not record its preprocessing)")
    s.add(f"<p class=meta>{len(chosen)} of {len(inputs.keys)} records, chosen with seed {inputs.options.seed}. "
          f"{shown}; colours are the first three principal "
          "components of the patch tokens, fitted on every map shown together (one colour, one feature direction, "
          "across all maps). Sample records show every frame; the kept frame (the one whose tokens the record "
          "stores) is outlined.</p>")
    s.add(_errors_note("chosen records", errors, len(chosen)))
    return s.add(*(_record_html(v) for v in views))


def distributions(inputs: Inputs, scan: Scan) -> Section:
    """Histograms of per-record token norms and non-finite fractions; sorted per-channel moments."""
    s = Section("distributions", "Distributions")
    if not inputs.keys:
        return s.add(note("the store holds no records: there is nothing to measure", "bad"))
    read = len(scan.stats)
    how = (f"a seeded sample of {len(scan.keys)} of {len(inputs.keys)} records (at most "
           f"{inputs.options.max_stats_records} are read)" if scan.sampled else f"all {len(inputs.keys)} records")
    s.add(f"<p class=meta>Over {how}; {read} read.</p>", _errors_note("records", scan.errors, len(scan.keys)))
    if not read:
        return s.add(note("no record could be read: no distribution to show", "bad"))
    nonfinite = [r.nonfinite_fraction for r in scan.stats]
    bad = sum(1 for f in nonfinite if f > 0)
    s.add(note(f"non-finite values: {bad} of {read} records hold NaN or Inf (worst fraction {max(nonfinite):.3g})",
               "bad" if bad else "ok"))
    s.add(plot(figures.histograms([("token L2 norm: mean over the record", [r.norm_mean for r in scan.stats], None, ""),
                                   ("token L2 norm: max over the record", [r.norm_max for r in scan.stats], None, ""),
                                   ("fraction of non-finite values", nonfinite, 0.0, "expected")]),
               "histograms of token norms and non-finite fractions"))
    if scan.moments.count is not None:
        s.add(plot(figures.sorted_channels(scan.moments.mean(), scan.moments.std()), "per-channel mean and std"))
    rows = [[name, *(f"{v:.4g}" for v in summary(vals).values())] for name, vals in (
        ("token norm mean", [r.norm_mean for r in scan.stats]), ("token norm max", [r.norm_max for r in scan.stats]))]
    return s.add(table(rows, ["per record", "min", "median", "mean", "max"]))


def codec_error(inputs: Inputs, scan: Scan) -> Section:
    """The error bounds lossy records store, against the codec's target."""
    s = Section("codec-error", "Codec error")
    codec = inputs.manifest.get("codec") or "zstd"
    if not scan.bounds:
        lossless = "the store is lossless" if codec != "int8" else "no record read stores an error bound"
        return s.add(note(f"{lossless} (codec {codec}): no codec error to show"))
    rel = [b.rel_l2 for b in scan.bounds]
    over = sum(1 for r in rel if r > INT8_TARGET_REL_L2 * 1.5)
    s.add(f"<p class=meta>{len(scan.bounds)} of {len(scan.stats)} records read store a lossy bound (codec "
          f"{esc(scan.bounds[0].codec)}). The int8 codec chooses its levels for a relative L2 error of "
          f"{INT8_TARGET_REL_L2} and stores the error it measured when writing.</p>")
    s.add(plot(figures.histograms([("stored relative L2 error", rel, INT8_TARGET_REL_L2, "codec target"),
                                   ("stored max abs error", [b.max_abs for b in scan.bounds], None, "")]),
               "codec error bounds"))
    s.add(note(f"{over} records exceed 1.5x the target", "bad" if over else "ok"))
    rows = [[name, *(f"{v:.4g}" for v in summary(vals).values())] for name, vals in (
        ("relative L2", rel), ("max abs", [b.max_abs for b in scan.bounds]))]
    return s.add(table(rows, ["bound", "min", "median", "mean", "max"]))


def provenance(inputs: Inputs) -> Section:
    """The manifest as a table: model, settings, counts per source file, failures and missing images."""
    s = Section("provenance", "Provenance")
    m = inputs.manifest
    if not inputs.has_manifest:
        s.add(note("no manifest: a folder of legacy per-image caches. The model, layers, preprocessing, context, "
                   "precision and codec were not recorded; grids are inferred from token counts.", "bad"))
        rows = [("layout", "per-image (legacy caches, no manifest)"), ("records", str(len(inputs.keys))),
                ("data root", str(inputs.data_root))] + [(f, NOT_RECORDED) for f in LEGACY_UNKNOWN]
        return s.add(table(rows, ["field", "value"]))
    s.add(table(manifest_rows(m, len(inputs.keys)), ["field", "value"]))
    sources = source_rows(m)
    if sources:
        s.add("<h3>Sources</h3>", table(sources, ["source", "records", "images / samples", "missing"]))
    for title, field in (("Failures", "failures_ledger"), ("Missing images", "missing_ledger")):
        total, first, why = ledger_entries(inputs.read_file(), m.get(field))
        if why:
            s.add(note(why, "bad"))
        elif total:
            rows = [[e.get("key", e.get("path", "")), e.get("error", e.get("annotation", e.get("line", "")))]
                    for e in first]
            s.add(f"<h3>{title}: {total} (first {len(first)})</h3>", table(rows, ["entry", "detail"]))
    return s


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def throughput(inputs: Inputs) -> Section:
    """Records/s over time and the stage split of every recorded build run."""
    from featstore.formats.buildstats import read_build_stats

    s = Section("throughput", "Build throughput")
    runs, problems = read_build_stats(inputs.stats_storage(), inputs.layout)
    s.add(*(note(p, "bad") for p in problems))
    if not runs:
        return s.add(note("this store's build recorded no throughput series (built by an older featstore, or "
                          "every record was already stored)"))
    series, stages, rows = [], [], []
    for r in runs:
        pts = np.asarray(r.points, dtype=np.float64).reshape(-1, 5)
        label = f"rank {r.gid} @ {_when(r.started)[11:19]}"
        series.append((label, pts))
        last = pts[-1]
        stages.append((label, {"decode wait": last[2], "model": last[3], "write": last[4]}))
        rate = last[1] / last[0] if last[0] > 0 else float("nan")
        rows.append([label, _when(r.started), f"{int(last[1])}", f"{last[0]:.1f}", f"{rate:.2f}",
                     f"{last[2]:.1f} / {last[3]:.1f} / {last[4]:.1f}"])
    s.add(plot(figures.throughput(series, stages), "records per second over time and stage seconds"))
    return s.add(table(rows, ["run", "started", "records", "seconds", "records/s",
                              "decode wait / model / write (s)"]))
