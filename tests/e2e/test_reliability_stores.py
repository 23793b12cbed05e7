"""Hostile stores: code-running pickles, keys escaping the output on export, index entries past the end of
a shard, records claiming huge shapes and zstd frames claiming huge sizes. Each is rejected with a clear
error and bounded memory, and verify reports it (exit 1)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zstandard

from featstore.errors import RecordError
from featstore.formats.index import Index, write_index
from featstore.formats.record import MAGIC, Record, encode_record
from featstore.formats.shards import ShardEntry, ShardWriter
from featstore.runtime.fsutil import file_sha256 as sha256_file
from helpers import REPO, build_args, make_images, run_inproc


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("built")
    make_images(base / "d", 4)
    assert run_inproc(*build_args(base / "d", "--out", str(base / "store"))).returncode == 0
    assert run_inproc(*build_args(base / "d", "--format", "per-image", "--out", str(base / "pi"))).returncode == 0
    return base


def copy_of(built: Path, name: str, tmp_path: Path) -> Path:
    shutil.copytree(built / name, tmp_path / name, symlinks=True)
    return tmp_path / name


def verify(path: Path) -> tuple[int, str]:
    r = run_inproc("verify", str(path), "--no-progress", "--workers", "1")
    return r.returncode, r.stdout + r.stderr


class RunsCode:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(built, tmp_path):
    from featstore import open_store
    from featstore.formats.perimage import read_pt

    pi = copy_of(built, "pi", tmp_path)
    mpath = pi / "vggt_cache_manifest.json"
    mpath.write_text(json.dumps(dict(json.loads(mpath.read_text()), cache_root=str(pi))))
    victim = sorted(pi.rglob("*.vggt_cache.pt"))[0]
    marker = tmp_path / "PWNED"
    torch.save({"features": torch.zeros(1, 3, 4), "path": "x", "payload": RunsCode(str(marker))}, victim)
    with pytest.raises(RecordError, match="refuses to unpickle"):
        read_pt(victim)
    store = open_store(pi)
    key = str(victim.relative_to(pi))[: -len(".vggt_cache.pt")]
    with pytest.raises(RecordError):
        store[key]
    rc, text = verify(pi)
    assert rc == 1 and key in text, text
    r = run_inproc("export", str(pi), "--format", "shards", "--out", str(tmp_path / "sh"))
    assert r.returncode == 1 and "refuses to unpickle" in r.stderr, r.stderr
    assert not marker.exists(), "unpickling ran code"


def craft_store(built: Path, out: Path, records: dict[str, bytes], entries: dict[str, ShardEntry] | None = None) -> Path:
    """A shard store holding exactly ``records`` (raw record bytes, possibly hostile), with a matching
    index and manifest copied from a real build."""
    (out / "shards").mkdir(parents=True)
    w = ShardWriter(out / "shards", "vggt", 0, 0, fsync=False)
    import tarfile
    import io
    import time

    from featstore.formats.keys import member_name

    name = "vggt-00000-000000.tar"
    ents = []
    with open(out / "shards" / name, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, data in records.items():
            info = tarfile.TarInfo(member_name(key))
            info.size, info.mtime = len(data), int(time.time())
            tar.addfile(info, io.BytesIO(data))
            off = tar.offset - (-(-len(data) // 512) * 512)
            ents.append((entries or {}).get(key) or ShardEntry(key, off, len(data), 0, (("features", "float32", (1, 1)),),
                                                               (-1, -1)))
    del w
    write_index(out / "index.fsi", [name], ((0, e) for e in ents))
    m = json.loads((built / "store" / "manifest.json").read_text())
    m["shards"] = [{"name": name, "records": len(records), "bytes": (out / "shards" / name).stat().st_size,
                    "sha256": sha256_file(out / "shards" / name)}]
    m["index"] = {"name": "index.fsi", "records": len(records), "bytes": (out / "index.fsi").stat().st_size,
                  "sha256": sha256_file(out / "index.fsi")}
    m["total_images"] = m["processed_images"] = m["counts"]["records"] = len(records)
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def real_record(built: Path) -> Record:
    from featstore import open_store

    s = open_store(built / "store")
    return s.record(sorted(s.keys())[0])


def test_export_refuses_keys_escaping_the_output(built, tmp_path):
    rec = real_record(built)
    evil = {k: encode_record(Record(k, k, rec.tensors, rec.meta)) for k in ("../escape.png", "/abs/escape.png", "ok.png")}
    store = craft_store(built, tmp_path / "evil", evil)
    out = tmp_path / "exported"
    r = run_inproc("export", str(store), "--format", "per-image", "--out", str(out))
    assert r.returncode == 1 and "refused 2 keys" in r.stderr, r.stderr
    assert (out / "ok.png.vggt_cache.pt").is_file()
    assert not (tmp_path / "escape.png.vggt_cache.pt").exists() and not Path("/abs/escape.png.vggt_cache.pt").exists()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.vggt_cache.pt")) == ["exported/ok.png.vggt_cache.pt"]


def test_index_entry_past_end_of_shard(built, tmp_path):
    from featstore import open_store

    store = copy_of(built, "store", tmp_path)
    ix = Index(store / "index.fsi")
    entries = list(ix.entries())
    victim = entries[0]
    size = (store / "shards" / victim.shard).stat().st_size
    moved = [ShardEntry(e.key, size + 4096 if e.key == victim.key else e.offset, e.length, e.crc32, e.tensors, e.source)
             for e in entries]
    del ix
    write_index(store / "index.fsi", [victim.shard], ((0, e) for e in moved))
    with pytest.raises(RecordError, match="truncated"):
        open_store(store)[victim.key]
    rc, text = verify(store)
    assert rc == 1 and victim.key in text, text


def lying_zstd_frame(claim: int, payload: bytes = b"\0" * 1000) -> bytes:
    """A zstd frame whose header claims ``claim`` bytes of content but holds ``len(payload)``."""
    z = zstandard.ZstdCompressor(write_content_size=False, write_checksum=False).compress(payload)
    fhd = z[4]
    assert fhd & 0xC0 == 0 and not fhd & 0x20
    return z[:4] + bytes([fhd | 0xC0]) + z[5:6] + struct.pack("<Q", claim) + z[6:]


def hostile_record(key: str, shape: list[int], nbytes: int, frame: bytes) -> bytes:
    spec = {"name": "features", "dtype": "float32", "shape": shape, "nbytes": nbytes, "zbytes": len(frame),
            "crc32": 0, "filter": "none"}
    hb = json.dumps({"v": 1, "key": key, "path": key, "meta": {}, "tensors": [spec]}).encode()
    return MAGIC + struct.pack("<I", len(hb)) + hb + frame


HUGE = 1 << 40  # a 1 TiB claim


def test_hostile_records_rejected_with_bounded_memory(tmp_path):
    cases = {
        "huge-shape.png": hostile_record("huge-shape.png", [1 << 20, 1 << 18], HUGE, lying_zstd_frame(HUGE)),
        "lying-zstd.png": hostile_record("lying-zstd.png", [3 << 28], 3 << 30, lying_zstd_frame(3 << 30)),
        "shape-mismatch.png": hostile_record("shape-mismatch.png", [1 << 30], 16, lying_zstd_frame(16)),
        "header-length.png": MAGIC + struct.pack("<I", 0xFFFFFFF0) + b"{}",
    }
    for k, v in cases.items():
        (tmp_path / k).write_bytes(v)
    code = f"""
import resource, sys
from pathlib import Path
from featstore.formats.record import decode_record
from featstore.errors import RecordError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for p in sorted(Path({str(tmp_path)!r}).glob("*.png")):
    try:
        decode_record(p.read_bytes())
        print("ACCEPTED", p.name)
    except RecordError as e:
        print("REFUSED", p.name, e)
print("GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert "ACCEPTED" not in r.stdout and r.stdout.count("REFUSED") == 4, r.stdout + r.stderr
    assert int(r.stdout.split("GROWTH_KB")[1]) < 50_000, r.stdout


def test_verify_reports_hostile_records_in_a_shard(built, tmp_path):
    rec = real_record(built)
    records = {"good.png": encode_record(Record("good.png", "good.png", rec.tensors, rec.meta)),
               "huge-shape.png": hostile_record("huge-shape.png", [1 << 20, 1 << 18], HUGE, lying_zstd_frame(HUGE)),
               "lying-zstd.png": hostile_record("lying-zstd.png", [3 << 28], 3 << 30, lying_zstd_frame(3 << 30))}
    store = craft_store(built, tmp_path / "s", records)
    rc, text = verify(store)
    assert rc == 1, text
    assert "huge-shape.png" in text and "lying-zstd.png" in text, text
    from featstore import open_store

    s = open_store(store)
    for k in ("huge-shape.png", "lying-zstd.png"):
        with pytest.raises(RecordError):
            s[k]
    assert s["good.png"].shape == rec.features.shape
