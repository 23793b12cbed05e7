"""Where one rank's build writes: the store and its local folder, the output's first preparation, the shard or
per-image sink with remote upload of closed shards, and ``build.json``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from featstore.build.options import BuildOptions
from featstore.build.pipeline import PerImageSink, ShardSink
from featstore.build.resume import build_target, salvage_unfinished_shards
from featstore.errors import StoreError
from featstore.formats.keys import CacheLayout
from featstore.formats.layout import BUILD_CONFIG, MISSING_LEDGER, PARTS_DIR, PER_IMAGE_MISSING_LEDGER, PER_IMAGE_STATE_DIR, SHARDS_DIR
from featstore.formats.manifest import BuildSettings
from featstore.formats.shardstore import list_store_shards
from featstore.formats.shards import ClosedShard, ShardWriter, parse_shard_name
from featstore.build.merge import per_image_manifest_path
from featstore.runtime.faults import crash_point
from featstore.runtime.fsutil import remove_temp_files
from featstore.storage import LocalStorage, Storage, publish_json, reset_staging_dir

log = logging.getLogger("featstore")


class Output:
    """One rank's output: the store (local folder or URL), the local folder written, part files, cache layout."""

    def __init__(self, opts: BuildOptions, data_root: Path, gid: int):
        self.opts, self.data_root, self.gid = opts, data_root, gid
        self.target = build_target(opts.format, opts.out, data_root, gid, opts.storage_options)
        t = self.target
        self.store, self.out, self.cache_root, self.remote = t.store, t.out, t.cache_root, t.remote
        if opts.format == "shards":
            self.state_dir = self.out / PARTS_DIR
            self.parts: Storage = self.store.sub(PARTS_DIR)
        else:
            self.state_dir = self.out / PER_IMAGE_STATE_DIR / PARTS_DIR
            self.parts = LocalStorage(self.state_dir)
        self.cache_files = CacheLayout(data_root, self.cache_root)  # where per-image caches go
        self.where = self.store.display  # the output, safe for messages
        self.closed: list[ClosedShard] = []  # this rank's shards, for its part file

    def folders(self) -> list[Path]:
        """Folders this build writes, which discovery never reads."""
        if self.opts.format == "shards":
            return [self.out]
        return [self.cache_root] if self.cache_root else []

    def salvage(self) -> None:
        """Keep the complete records of this rank's shard that a crash left unfinished (see resume)."""
        salvage_unfinished_shards(self.target, self.gid, fsync=self.opts.fsync)

    def prepare(self) -> None:
        """Create the output folders (the first shared write), emptying a remote build's staging folder and
        removing the temporary files that dead writers on this host left there."""
        if self.remote:
            reset_staging_dir(self.out)  # this rank's lock is held: leftovers are a killed run's
            mine = f"{SHARDS_DIR}/{self.opts.shard_prefix}-{self.gid:05d}-"
            if n := self.store.abort_incomplete_uploads(mine):
                log.info("aborted %d unfinished shard uploads left by an interrupted build", n)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create output directory {self.out}: {e.strerror}; choose a writable --out") from None
        if not os.access(self.out, os.W_OK):
            raise StoreError(f"output directory {self.out} is not writable; choose a writable --out")
        # Index, manifest, ledger and part files of a killed run leave temporary files; delete those whose
        # writer is dead (a live job-array part may be writing its own right now).
        for d in (self.out, self.state_dir):
            for p in remove_temp_files(d):
                log.info("removing temporary file %s left by an interrupted build", p)
        if self.opts.format == "shards":
            (self.out / SHARDS_DIR).mkdir(exist_ok=True)

    def record_settings(self, settings: BuildSettings, data_root: Path, is_leader: bool) -> None:
        """Write the store's build settings (shard stores), which a later resume is checked against."""
        if self.opts.format == "shards" and (is_leader or self.opts.num_parts > 1):
            publish_json(self.store, BUILD_CONFIG, self.settings_doc(settings, data_root))

    def settings_doc(self, settings: BuildSettings, data_root: Path) -> dict[str, Any]:
        """The settings as ``build.json`` and part summaries hold them, with the data and cache roots."""
        return dict(settings.to_json(), data_root=str(data_root),
                    cache_root=str(self.cache_root) if self.cache_root else None)

    def missing_ledger_path(self) -> Path:
        """Where the list of annotated images that do not exist goes (beside the manifest)."""
        if self.opts.format == "shards":
            return self.out / MISSING_LEDGER
        return per_image_manifest_path(self.data_root, self.cache_root).parent / PER_IMAGE_MISSING_LEDGER

    def missing_ledger_where(self) -> str:
        """The missing-images ledger's location, for messages."""
        return self.store.describe(MISSING_LEDGER) if self.remote else str(self.missing_ledger_path())

    def sink(self) -> ShardSink | PerImageSink:
        """The sink records are written to: the rank's next shards, or per-image cache files."""
        o = self.opts
        if o.format == "shards":
            existing = [parse_shard_name(n) for n in list_store_shards(self.store)]
            first_n = max((p[2] for p in existing if p), default=-1) + 1
            writer = ShardWriter(self.out / SHARDS_DIR, o.shard_prefix, self.gid, first_n, o.shard_size,
                                 fsync=o.fsync, post=self._shard_closed)
            return ShardSink(writer, o.writer_threads, o.zstd_level, o.codec)
        return PerImageSink(self.cache_files, o.writer_threads, fsync=o.fsync)

    def _shard_closed(self, shard: ClosedShard) -> None:
        """Upload a closed shard of a remote store under its final name (multipart when large, then the local
        copy is dropped); keep its index entries for this rank's part file."""
        if self.remote:
            crash_point("shard-before-upload")
            self.store.publish_file(f"{SHARDS_DIR}/{shard.info.name}", shard.path, move=True)
            crash_point("shard-after-upload")
        self.closed.append(shard)
