"""The manifest schema: one JSON document describing a store, shared by build, merge, verify and export.

Shard stores keep it as ``<out>/manifest.json``; per-image stores as ``<data root>/vggt_cache_manifest.json``
(the file older tools read). The fields older tools read (``total_images``, ``processed_images``,
``vggt_model_path``, ``data_root``, ``cache_format``) are always present.

Writers build it as a :class:`Manifest` (its :class:`BuildSettings`, the one list of build settings, and the one
:meth:`Manifest.is_complete`); :func:`read_manifest` gives readers the plain document.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

from featstore.constants import DEFAULT_IMAGE_SIZE
from featstore.errors import StoreError
from featstore.runtime.fsutil import atomic_write_json
from featstore.formats.layout import PER_IMAGE_FORMAT, PER_IMAGE_MANIFEST, SHARD_FORMAT, SHARD_MANIFEST, STORE_DIR

if TYPE_CHECKING:
    from featstore.storage import Storage

SCHEMA_VERSION = 1
REQUIRED = ("total_images", "processed_images", "vggt_model_path", "data_root", "cache_format")
LAYOUTS = ("shards", "per-image")


def _no_model() -> dict[str, Any]:
    return {"fingerprint": None, "name": None, "config": None}


@dataclass
class BuildSettings:
    """What the records of a store were built with, set by the build's flags; the one settings object of build,
    resume, merge, export and verify. Manifests, ``build.json`` and part summaries hold them as top-level fields;
    how each one binds a store is :data:`SETTING_RULES`, applied by :meth:`differences` alone."""

    vggt_model_path: str = ""
    model: dict[str, Any] = field(default_factory=_no_model)  # {"fingerprint", "name", "config"}
    layers: list[int] = field(default_factory=list)
    tensors: dict[str, Any] = field(default_factory=dict)  # name -> {"layer": int, "dtype": str, "codec": str}
    # "crop", "pad" or "janusvln", apply_exif, target_size (longest or width side), multiple (14 or 28)
    preprocess: dict[str, Any] = field(default_factory=lambda: {"mode": None, "apply_exif": False})
    # "image": a record per image; "sample": a record per training sample (its frames streamed as causal
    # context, one frame's tokens kept); "joint": a record per sample, every frame's tokens of one joint call;
    # with {"reference_frame", "history"}
    context: dict[str, Any] = field(default_factory=lambda: {"mode": "image"})
    dtype: str | None = None
    compute: str | None = None  # how the model ran on the build's device, e.g. "bfloat16-weights+autocast-bfloat16"
    precision: str | None = None  # the recipe (featstore.model.precision): fp32, bf16, amp, deepspeed-bf16
    # the --frame-transform function ("MODULE:FUNCTION") and the sha256 of its source file; None: no transform
    frame_transform: dict[str, Any] = field(default_factory=lambda: {"name": None, "sha256": None})
    codec: str | None = None  # shard codec the build or export wrote with (zstd, raw, int8); None: zstd (older)
    tokens: str = "patch"  # "patch": patch tokens only (JanusVLN); "all": camera + register + patch
    source_fingerprint: str = "stat"  # "stat" (size, mtime) or "sha256"

    @classmethod
    def of(cls, doc: Mapping[str, Any]) -> "BuildSettings":
        """The settings recorded in a manifest, ``build.json`` or part summary: absent fields read as their
        defaults, and settings older versions did not record as what those versions built (:func:`_historic`)."""
        found = {k: copy.deepcopy(doc[k]) for k in SETTING_FIELDS if k in doc and doc[k] is not None}
        if "vggt_model_path" not in found and "model_path" in doc:  # part summaries of early versions
            found["vggt_model_path"] = str(doc["model_path"])
        return _historic(cls(**found))

    def to_json(self) -> dict[str, Any]:
        """The settings as top-level manifest fields."""
        return {k: copy.deepcopy(getattr(self, k)) for k in SETTING_FIELDS}

    def differences(self, requested: "BuildSettings") -> list["Difference"]:
        """Each binding setting (:data:`SETTING_RULES`) in which records built with ``self`` (the store's) and
        with ``requested`` differ. The model is compared by fingerprint and dict settings key by key; a value one
        side did not record (None, or a key it lacks) binds nothing."""
        out = []
        for name in SETTING_FIELDS:
            if SETTING_RULES[name] != BINDS:
                continue
            for sub, mine, theirs in _compared(name, getattr(self, name), getattr(requested, name)):
                if mine != theirs:
                    out.append(Difference(sub, SETTING_FLAGS.get(sub, "--" + sub), mine, theirs))
        return out


class Difference(NamedTuple):
    """One binding setting in which two sets of settings differ: its name, the flag that sets it, both values."""

    setting: str
    flag: str
    stored: Any
    requested: Any

    def describe(self, mine: str = "the store's records have", theirs: str = "this run") -> str:
        """``--apply-exif: the store's records have false, this run true (preprocess.apply_exif)``."""
        return f"{self.flag}: {mine} {_shown(self.stored)}, {theirs} {_shown(self.requested)} ({self.setting})"


def _shown(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def _compared(name: str, mine: Any, theirs: Any) -> list[tuple[str, Any, Any]]:
    """The values compared for setting ``name``, known on both sides: the model's fingerprint, each key of a dict
    setting both record (``preprocess.apply_exif``; a recorded None is a value), else the value itself (None or
    an empty list: not recorded)."""
    if name == "model":
        mine, theirs = (mine or {}).get("fingerprint"), (theirs or {}).get("fingerprint")
    elif isinstance(mine, dict) and isinstance(theirs, dict):
        return [(f"{name}.{k}", mine[k], theirs[k]) for k in sorted(mine.keys() & theirs.keys())]
    return [] if mine in (None, []) or theirs in (None, []) else [(name, mine, theirs)]


def _historic(s: BuildSettings) -> BuildSettings:
    """Fill in what stores recorded before a setting existed: every build ran at image size 518, without EXIF
    rotation, to a multiple of 14 (28 for janusvln), one record per image, without a frame transform, and in the
    recipe its ``compute`` names (:data:`LEGACY_PRECISION`); a store that recorded no preprocessing at all (an
    older script's caches) stays unknown."""
    pre = s.preprocess
    if pre.get("mode") is not None:
        pre.setdefault("apply_exif", False)
        pre.setdefault("target_size", HISTORIC_IMAGE_SIZE)
        pre.setdefault("multiple", 28 if pre["mode"] == "janusvln" else 14)
    s.context.setdefault("mode", "image")
    if s.precision is None and s.compute is not None:
        s.precision = LEGACY_PRECISION.get(s.compute, f"legacy-{s.compute}")
    return s


SETTING_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(BuildSettings))  # the one list of build settings

BINDS, PER_RECORD, FREE, DERIVED = "binds", "per-record", "free", "derived"
#: How each setting binds a store, the one rule resume and merge apply (through :meth:`BuildSettings.differences`):
#: - ``binds``: it changes the stored numbers, so every record of a store shares it; a resume into the store or a
#:   merge of its parts with another value is refused, naming the setting.
#: - ``per-record``: it changes only how the bytes are encoded; records may differ (each record's bytes name the
#:   codec of each tensor), the manifest holds the latest build's value. The zstd level is not recorded at all.
#: - ``free``: it changes neither. ``vggt_model_path`` is where the checkpoint lies (the model binds by its
#:   fingerprint); ``source_fingerprint`` is how ``--hash-inputs`` notes each source image: every record keeps
#:   its own note and staleness judges each record by its own, so runs may differ; the manifest holds the latest.
#: - ``derived``: ``tensors`` follows from layers, dtype and codec; ``compute`` from the precision and the device.
SETTING_RULES: dict[str, str] = {"vggt_model_path": FREE, "model": BINDS, "layers": BINDS, "tensors": DERIVED,
                                 "preprocess": BINDS, "context": BINDS, "dtype": BINDS, "compute": DERIVED,
                                 "precision": BINDS, "frame_transform": BINDS, "codec": PER_RECORD, "tokens": BINDS,
                                 "source_fingerprint": FREE}
#: The flag that sets each binding setting, for messages.
SETTING_FLAGS: dict[str, str] = {"model": "--model", "layers": "--layers", "preprocess.mode": "--preprocess",
                                 "preprocess.apply_exif": "--apply-exif", "preprocess.target_size": "--image-size",
                                 "preprocess.multiple": "--preprocess", "context.mode": "--context",
                                 "context.reference_frame": "--reference-frame", "context.history": "--history",
                                 "dtype": "--dtype", "precision": "--precision", "tokens": "--tokens",
                                 "frame_transform.name": "--frame-transform", "frame_transform.sha256": "--frame-transform"}
#: The recipe of stores recorded before ``precision`` existed, by their ``compute``: float32 is the fp32 recipe bit
#: for bit; their bf16 and autocast runs followed another dtype flow (RoPE tables, input normalisation), which
#: no recipe reproduces: they read as ``legacy-<compute>``, so a resume with any recipe is refused.
LEGACY_PRECISION = {"float32": "fp32"}
#: The image size of stores recorded before ``preprocess.target_size`` existed (they were all built at 518).
HISTORIC_IMAGE_SIZE = DEFAULT_IMAGE_SIZE
assert set(SETTING_RULES) == set(SETTING_FIELDS), "every build setting needs a rule"


@dataclass
class Manifest(BuildSettings):
    """A store's manifest: its build settings plus what the store holds (counts, shards, index, times).

    ``to_json`` writes the JSON document older tools and every featstore version read (fields in
    :data:`JSON_ORDER`, then any fields of other tools kept from the document read).
    """

    total_images: int = 0
    processed_images: int = 0
    data_root: str = ""
    cache_format: str = SHARD_FORMAT
    featstore_version: str = ""
    schema_version: int = SCHEMA_VERSION
    layout: str = "shards"
    cache_root: str | None = None  # per-image caches mirrored under --out; None when beside the images
    complete: bool = False
    lossy: dict[str, Any] | None = None  # {tensor: {"codec", "rel_l2", "max_abs"}}: worst bounds of lossy records
    feature_shapes: dict[str, int] = field(default_factory=dict)  # "[1, P, C]" -> count
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNT_FIELDS, 0))
    failures_ledger: str | None = None
    missing_ledger: str | None = None  # MISSING_LEDGER / PER_IMAGE_MISSING_LEDGER when annotated images are missing
    # how images were chosen (featstore.discover.Discovery.manifest_entry): annotation files with their counts,
    # image list, data_path, or a scan; verify compares the store with the same sources
    sources: dict[str, Any] | None = None
    times: dict[str, Any] = field(default_factory=lambda: {"started": None, "finished": None, "seconds": None})
    world_size: int = 1
    parts: list[int] | None = None
    shards: list[dict[str, Any]] = field(default_factory=list)  # [{"name", "records", "bytes", "sha256"}]
    index: dict[str, Any] | None = None  # {"name", "records", "bytes", "sha256"}
    provenance_unknown: list[str] = field(default_factory=list)  # fields an export from legacy caches could not know
    extra: dict[str, Any] = field(default_factory=dict)  # fields of other tools, kept as read

    @classmethod
    def new(cls, *, layout: str, data_root: str, model_path: str, **values: Any) -> "Manifest":
        """A manifest of this featstore version (``layout`` is ``"shards"`` or ``"per-image"``)."""
        from featstore import __version__

        if layout not in LAYOUTS:
            raise ValueError(f"layout must be 'shards' or 'per-image', not {layout!r}")
        unknown = set(values) - set(JSON_ORDER)
        if unknown:
            raise ValueError(f"unknown manifest fields {sorted(unknown)}")
        return cls(layout=layout, data_root=data_root, vggt_model_path=model_path, featstore_version=__version__,
                   cache_format=PER_IMAGE_FORMAT if layout == "per-image" else SHARD_FORMAT, **values)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> "Manifest":
        """The manifest a JSON document describes (featstore's of any version, or an older script's)."""
        # a null where the schema has a value (an older or hand-edited document) reads as the default
        known = {k: copy.deepcopy(v) for k, v in doc.items() if k in JSON_ORDER and (v is not None or k in NULLABLE)}
        m = cls(**known, extra={k: copy.deepcopy(v) for k, v in doc.items() if k not in JSON_ORDER})
        if "layout" not in doc:
            m.layout = "per-image" if m.cache_format == PER_IMAGE_FORMAT else "shards"
        return m

    def to_json(self) -> dict[str, Any]:
        """The JSON document (every schema field present)."""
        return {**{k: copy.deepcopy(getattr(self, k)) for k in JSON_ORDER}, **self.extra}

    def settings(self) -> BuildSettings:
        """The build settings this manifest records."""
        return BuildSettings.of(self.to_json())

    def use_settings(self, settings: BuildSettings) -> None:
        """Record ``settings`` as this store's build settings."""
        for k, v in settings.to_json().items():
            setattr(self, k, v)

    def is_complete(self) -> bool:
        """Whether every image the sources name is stored, or listed as failed or missing (a re-run of the
        build has nothing to add)."""
        settled = self.processed_images + self.counts.get("failed", 0) + self.counts.get("missing", 0)
        return self.total_images > 0 and settled >= self.total_images


COUNT_FIELDS = ("records", "processed", "skipped", "failed", "missing", "stale_rebuilt", "malformed_annotation_lines")
# the manifest's fields in the order every featstore version has written them
JSON_ORDER = ("total_images", "processed_images", "vggt_model_path", "data_root", "cache_format", "featstore_version",
              "schema_version", "layout", "cache_root", "complete", "model", "layers", "tensors", "preprocess",
              "context", "dtype", "compute", "precision", "frame_transform", "codec", "lossy", "tokens",
              "feature_shapes", "counts", "failures_ledger", "missing_ledger", "sources", "source_fingerprint", "times",
              "world_size", "parts", "shards", "index", "provenance_unknown")


NULLABLE = frozenset(k for k, v in Manifest().to_json().items() if v is None)


def new_manifest(*, layout: str, data_root: str, model_path: str, **fields: Any) -> dict[str, Any]:
    """A manifest document with every schema field present (``layout`` is ``"shards"`` or ``"per-image"``)."""
    return Manifest.new(layout=layout, data_root=data_root, model_path=model_path, **fields).to_json()


def write_manifest(path: Path, manifest: Manifest | dict[str, Any]) -> None:
    """Validate and write a manifest atomically."""
    if isinstance(manifest, Manifest):
        manifest = manifest.to_json()
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ValueError(f"manifest lacks required fields {missing}")
    atomic_write_json(path, manifest)


def read_manifest(path: Path) -> dict[str, Any]:
    """Read a manifest (featstore's or an older script's); raises StoreError naming what is wrong."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StoreError(f"manifest not found at {path}: run `featstore build` first (or point at the store "
                         f"directory that holds {SHARD_MANIFEST} or {PER_IMAGE_MANIFEST})") from None
    except (OSError, ValueError) as e:
        raise StoreError(f"manifest {path} is unreadable ({e}); re-run `featstore merge` or `featstore build` to "
                         f"rewrite it") from None
    return parse_manifest(text, str(path))


def parse_manifest(text: str | bytes, where: str) -> dict[str, Any]:
    """Parse manifest JSON read from ``where`` (a path or URL, for messages)."""
    try:
        m = json.loads(text)
    except ValueError as e:
        raise StoreError(f"manifest {where} is not JSON ({e}); re-run `featstore merge` or `featstore build` to "
                         f"rewrite it") from None
    if not isinstance(m, dict):
        raise StoreError(f"manifest {where} is not a JSON object")
    m.setdefault("layout", "per-image" if m.get("cache_format") == PER_IMAGE_FORMAT else "shards")
    return m


def read_store_manifest(storage: "Storage") -> dict[str, Any]:
    """The ``manifest.json`` at the root of a (possibly remote) shard store; StoreError when there is none."""
    try:
        text = storage.read_bytes(SHARD_MANIFEST)
    except FileNotFoundError:
        raise StoreError(f"no featstore manifest at {storage.describe(SHARD_MANIFEST)}: expected a shard store "
                         f"(run `featstore build --out {storage.display}` first)") from None
    return parse_manifest(text, storage.describe(SHARD_MANIFEST))


def find_manifest(path: Path) -> Path:
    """Locate the manifest for a store path (a shard store dir, a data root, or the manifest file itself)."""
    path = Path(path)
    if path.is_file():
        return path
    for name in (SHARD_MANIFEST, PER_IMAGE_MANIFEST):
        if (path / name).is_file():
            return path / name
    if (path / STORE_DIR / SHARD_MANIFEST).is_file():
        return path / STORE_DIR / SHARD_MANIFEST
    raise StoreError(f"no featstore manifest under {path}: expected {SHARD_MANIFEST} (shard store) or "
                     f"{PER_IMAGE_MANIFEST} (per-image caches); run `featstore build` first")


def shape_key(shape: tuple[int, ...] | list[int]) -> str:
    """The ``feature_shapes`` key for a tensor shape, e.g. ``"[1, 1369, 2048]"``."""
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"
