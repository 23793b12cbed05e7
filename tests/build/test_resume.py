"""Resume planning (featstore.build.resume), the one temp-file cleanup (fsutil.remove_temp_files) and the per-rank
locks (lock.lock_for_rank), on real files: fast, no model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from featstore.errors import LockError, StoreError
from featstore.formats.layout import LOCK_NAME, PER_IMAGE_SUFFIX
from featstore.formats.perimage import write_pt
from featstore.formats.record import Record
from featstore.runtime.fsutil import final_name_of, remove_temp_files, temp_name_for
from featstore.build.locks import BuildLock, RankLock, StorageLock, lock_for_rank
from featstore.build.pipeline import WorkItem
from featstore.build.resume import build_target, check_compatible, owner_of, plan_resume, rank_share, reusable_settings
from featstore.formats.manifest import BuildSettings
from featstore.discover.samples import SampleItem, make_sample


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def temp_of(final: Path, host: str, pid: int) -> Path:
    """A temporary file as temp_name_for names it, written by ``host``/``pid``."""
    p = final.with_name(f".{final.name}.tmp-{host}-{pid}-0123abcd")
    p.write_bytes(b"partial")
    return p


def test_temp_name_round_trip(tmp_path):
    final = tmp_path / "a.b-c.tar"
    assert final_name_of(temp_name_for(final).name) == "a.b-c.tar"


def test_remove_temp_files_only_dead_writers_here_unless_the_caller_owns_the_names(tmp_path):
    host = socket.gethostname()
    dead = temp_of(tmp_path / "a.json", host, dead_pid())
    live = temp_of(tmp_path / "b.json", host, os.getpid())
    elsewhere = temp_of(tmp_path / "c.json", "another-host", 1)
    keep = tmp_path / "c.json"
    keep.write_text("{}")
    assert remove_temp_files(tmp_path) == [dead]
    assert live.exists() and elsewhere.exists() and keep.exists()
    # The caller holds the lock over c.json: its temporary goes whoever wrote it; b.json's is not named.
    assert remove_temp_files(tmp_path, finals={"c.json"}, any_writer=True) == [elsewhere]
    assert live.exists() and keep.exists()


def record(key: str) -> Record:
    return Record(key, key, {"features": torch.zeros(1, 2, 4)}, {})


def test_per_image_resume_removes_only_this_ranks_temporaries(tmp_path):
    data = tmp_path / "d"
    (data / "ep").mkdir(parents=True)
    t = build_target("per-image", None, data, 0)
    mine = [WorkItem(f"ep/{i}.png", str(data / f"ep/{i}.png")) for i in range(3)]
    write_pt(data / ("ep/0.png" + PER_IMAGE_SUFFIX), record("ep/0.png"))
    killed = temp_of(data / ("ep/1.png" + PER_IMAGE_SUFFIX), "another-host", 1)  # this rank's, killed elsewhere
    other_rank = temp_of(data / ("ep/9.png" + PER_IMAGE_SUFFIX), socket.gethostname(), os.getpid())  # live writer
    plan = plan_resume(t, mine, skip_existing=True, rebuild_stale=False)
    assert [it.key for it in plan.todo] == ["ep/1.png", "ep/2.png"] and plan.skipped == 1 and plan.stale == 0
    assert not killed.exists() and other_rank.exists()
    assert [it.key for it in plan_resume(t, mine, skip_existing=False, rebuild_stale=False).todo] == [
        it.key for it in mine]


def test_rank_share_images_by_key_samples_by_first_streamed_frame():
    frames = [f"ep/{i}.png" for i in range(40)]
    images = [WorkItem(k, k) for k in frames]
    samples = [SampleItem(make_sample(frames[i:i + 3], ref), tuple(frames[i:i + 3]))
               for i in range(30) for ref in ("first", "last")]
    items = images + samples
    shares = [rank_share(items, gid, 3) for gid in range(3)]
    assert sorted(len(s) for s in shares) != [0, 0, len(items)]
    assert Counter(id(it) for s in shares for it in s) == Counter(id(it) for it in items)  # disjoint, complete
    for gid, share in enumerate(shares):
        for it in share:
            first = it.sample.frames[0 if it.sample.reference_frame == "first" else -1] if isinstance(
                it, SampleItem) else it.key
            assert it.owner_frame == first and owner_of(first, 3) == gid


SETTINGS = BuildSettings.of({
    "model": {"fingerprint": "a" * 64, "config": {"depth": 2}}, "vggt_model_path": "tiny", "layers": [0],
    "dtype": "float32", "tokens": "patch", "compute": "float32", "context": {"mode": "image"},
    "preprocess": {"mode": "crop", "target_size": 518}, "codec": "zstd"})


def changed(**values) -> BuildSettings:
    return BuildSettings.of(dict(SETTINGS.to_json(), **values))


def test_check_compatible_names_each_binding_setting_and_a_store_without_records_binds_nothing():
    check_compatible(SETTINGS, changed(codec="raw", source_fingerprint="sha256", vggt_model_path="/x"), "/store")
    with pytest.raises(StoreError, match=r"built with other settings \(--layers: the store's records have \[0\], "
                                         r"this run \[1\] \(layers\)"):
        check_compatible(SETTINGS, changed(layers=[1]), "/store")
    check_compatible(None, changed(layers=[1]), "/store")


def test_reusable_settings_need_every_compared_setting_recorded_and_equal():
    requested = changed(model={"fingerprint": None, "name": None, "config": None})  # before the model loads
    carried = reusable_settings(SETTINGS, requested)
    assert carried is not None and carried.model == SETTINGS.model
    assert reusable_settings(SETTINGS, changed(vggt_model_path="other")) is None
    assert reusable_settings(SETTINGS, changed(dtype="bfloat16")) is None
    assert reusable_settings(changed(dtype=None), requested) is None
    assert reusable_settings(None, requested) is None


def test_lock_for_rank_rank_0_holds_the_store_lock_others_their_own(tmp_path):
    zero, three = lock_for_rank(0, tmp_path), lock_for_rank(3, tmp_path)
    assert type(zero) is BuildLock and zero.path == tmp_path / LOCK_NAME
    assert isinstance(three, RankLock) and three.path == tmp_path / f"{LOCK_NAME}-build-00003"
    with zero, three:
        assert zero.path.is_file() and three.path.is_file()
        with pytest.raises(LockError, match="another featstore job"):
            lock_for_rank(3, tmp_path).acquire()
    assert not zero.path.exists() and not three.path.exists()
    assert isinstance(lock_for_rank(2, tmp_path, store=build_target("shards", tmp_path, tmp_path, 2).store),
                      StorageLock)
