"""What a report reads: the store (opened once), its keys, the records it shows and the records its statistics
read, with every read error kept for the page instead of raised."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from featstore.errors import FeatstoreError
from featstore.formats.record import Record
from featstore.report.select import MAX_STATS_RECORDS
from featstore.report.stats import ChannelMoments, CodecBound, RecordStats, codec_bound, record_stats


def short_error(e: BaseException) -> str:
    """An exception as one line for the page."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if not isinstance(e, FeatstoreError) else text


@dataclass
class Options:
    """What the caller asked for (see :func:`featstore.report.run.report`)."""

    samples: int = 8
    seed: int = 0
    verify: bool = False
    recompute: int = 0
    model: str | None = None
    device: str = "cpu"
    data_root: str | None = None
    storage_options: dict[str, Any] | None = None
    max_stats_records: int = MAX_STATS_RECORDS


@dataclass
class Scan:
    """What the statistics pass over the records found."""

    stats: list[RecordStats] = field(default_factory=list)
    moments: ChannelMoments = field(default_factory=ChannelMoments)
    bounds: list[CodecBound] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)
    sampled: bool = False


@dataclass
class Inputs:
    """The opened store and what was read from it."""

    location: str
    store: Any
    manifest: dict[str, Any]
    has_manifest: bool
    keys: list[str]
    options: Options
    errors: dict[str, str] = field(default_factory=dict)  # key -> why its record could not be read

    @property
    def layout(self) -> str:
        """``shards`` or ``per-image``."""
        return str(getattr(self.store, "layout", self.manifest.get("layout", "shards")))

    @property
    def data_root(self) -> str | None:
        """Where the source images are (the caller's ``data_root``, else the manifest's)."""
        return getattr(self.store, "data_root", None) or self.manifest.get("data_root")

    def read(self, key: str) -> Record | None:
        """The record of ``key`` (dequantized), or None with the reason kept in :attr:`errors`."""
        try:
            return self.store.record(key)
        except Exception as e:  # noqa: BLE001 - a record the page cannot read is listed, never fatal
            self.errors[key] = short_error(e)
            return None

    def read_file(self) -> Callable[[str], bytes]:
        """A reader of files beside the manifest (ledgers), for either layout."""
        storage = getattr(self.store, "storage", None)
        if storage is not None:
            return storage.read_bytes
        root = Path(self.store.root)
        return lambda name: (root / name).read_bytes()

    def stats_storage(self) -> Any:
        """The storage the build's throughput series lies in."""
        from featstore.storage import LocalStorage

        storage = getattr(self.store, "storage", None)
        return storage if storage is not None else LocalStorage(Path(self.store.root))


def scan_records(inputs: Inputs, keys: list[str], sampled: bool) -> Scan:
    """Read ``keys`` once each for the distributions and the codec bounds."""
    scan = Scan(keys=keys, sampled=sampled)
    for key in keys:
        rec = inputs.read(key)
        if rec is None:
            scan.errors[key] = inputs.errors[key]
            continue
        feats = rec.features
        scan.stats.append(record_stats(key, feats))
        scan.moments.add(feats)
        bound = codec_bound(key, rec.bounds) or codec_bound(key, rec.meta.get("lossy") or {})
        if bound is not None:
            scan.bounds.append(bound)
    return scan
