"""`featstore build --context sample`: a record per training sample equals JanusVLN's streaming computation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import featstore
from helpers import REPO, run_cli, run_inproc, write_jsonl
from featstore.errors import StoreError
from featstore.formats.manifest import read_manifest
from featstore.formats.shards import list_shards
from featstore.model import load_vggt
from featstore.model.preprocess import preprocess_image
from featstore.discover.samples import janusvln_history
from helpers import copy_sample

SIZE = "224"  # small frames keep the tiny model fast; the geometry rules are the official ones at any size


def context_args(root: Path, *extra: str) -> list[str]:
    return ["build", "--data-root", str(root), "--model", "tiny", "--device", "cpu", "--no-progress",
            "--num-workers", "0", "--batch-size", "3", "--context", "sample", "--image-size", SIZE, *extra]


@pytest.fixture(scope="module")
def tiny():
    return load_vggt("tiny")


def streamed(model, paths: list[Path], mode: str = "crop", size: int = int(SIZE)) -> torch.Tensor:
    """What JanusVLN's training computes for one sample: its frames in stream order, causal, last frame's
    layer -2 patch tokens (the causal forward equals the KV-cache stream, golden tiny_stream)."""
    images = torch.stack([preprocess_image(p, mode, image_size=size) for p in paths])[None]
    out = model(images, layers=(-2,), causal=True)
    return next(iter(out.values()))[:, -1, 5:]


def annotation_samples(root: Path) -> list[tuple[str, list[Path]]]:
    """(id, frame paths in training order) of the sample data set's annotation records."""
    out = []
    for line in (root / "train.jsonl").read_text().splitlines():
        r = json.loads(line)
        frames = r["images"] if "images" in r else [r["image"]]
        out.append((r["id"], [root / f for f in frames]))
    for r in json.loads((root / "annotations.json").read_text()):
        frames = r["history_images"] + [r["current_image"]]
        out.append((str(r["id"]), [root / r["data_path"] / f for f in frames]))
    return out


@pytest.mark.parametrize("reference", ["first", pytest.param("last", marks=pytest.mark.slow)])
def test_sample_records_equal_training_streams(tmp_path, tiny, reference):
    root = copy_sample(tmp_path / "d")
    r = run_inproc(*context_args(root, "--reference-frame", reference))
    assert r.returncode == 0, r.stderr
    # 7 annotation records, 4 frame lists: ep000 and 0 (ep001 and 1, ep002 and 2) name the same frames
    assert "4 records for 7 samples" in r.stderr and "[SUCCESS] Processed 4 samples" in r.stderr
    store = featstore.open_store(root / "vggt_featstore")
    assert len(store) == 4 and store.context["reference_frame"] == reference
    for sid, paths in annotation_samples(root):
        stream = paths if reference == "first" else paths[::-1]
        expected = streamed(tiny, stream)
        got = store.get_sample(paths)
        assert got is not None and got.shape == expected.shape == (1, 16 * 12, 128)
        assert (got - expected).abs().max().item() <= 2e-5, sid
        assert torch.equal(store.get_sample(id=sid), got)
        rec = store.record(sid if sid in store.keys() else store.sample_key(paths))
        assert rec.meta["frames"] == [store.key_for(p) for p in paths] and rec.meta["grid"] == [12, 16]
        assert rec.meta["kept"] == (len(paths) - 1 if reference == "first" else 0)
        assert rec.path == str(paths[rec.meta["kept"]])
    m = read_manifest(root / "vggt_featstore" / "manifest.json")
    assert m["context"] == {"mode": "sample", "reference_frame": reference, "history": None}
    assert m["preprocess"]["target_size"] == int(SIZE) and m["complete"]


def test_one_frame_sample_is_the_plain_image_feature(tmp_path, tiny):
    root = copy_sample(tmp_path / "d")
    assert run_inproc(*context_args(root)).returncode == 0
    store = featstore.open_store(root / "vggt_featstore")
    frame = root / "episodes/episode_000/frame.003.jpg"
    image = preprocess_image(frame, "crop", image_size=int(SIZE))[None, None]
    plain = tiny(image, layers=(-2,))[0][:, 0, 5:]
    assert torch.equal(store.get_sample([frame]), plain)


@pytest.mark.parametrize("pad", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_history_samples_from_episode_folders(tmp_path, tiny, pad):
    root = copy_sample(tmp_path / "d", patterns=("*.jpg", "*.png"))
    r = run_inproc(*context_args(root, "--history", "2", *(["--history-pad"] if pad else [])))
    assert r.returncode == 0, r.stderr
    store = featstore.open_store(root / "vggt_featstore")
    episode = sorted((root / "episodes" / "episode_000").iterdir())
    assert len(store) == 12  # one sample per frame of the 3 episodes
    for i in range(len(episode)):
        idx = janusvln_history(i, 2)
        if pad:
            idx = [0] * (3 - len(idx)) + idx
        paths = [episode[j] for j in idx]
        got = store.get_sample(paths)
        assert got is not None and (got - streamed(tiny, paths)).abs().max().item() <= 2e-5
    m = read_manifest(root / "vggt_featstore" / "manifest.json")
    assert m["context"]["history"] == {"frames": 2, "pad": pad, "rule": "janusvln"}
    assert m["sources"]["method"] == "episodes"


def test_resume_skips_and_settings_are_checked(tmp_path):
    root = copy_sample(tmp_path / "d")
    assert run_inproc(*context_args(root)).returncode == 0
    r = run_inproc(*context_args(root))
    assert r.returncode == 0 and "4 already stored" in r.stderr and "Processed 0 samples" in r.stderr
    r = run_inproc(*context_args(root)[:-2], "--image-size", "252")
    assert r.returncode == 2 and "--image-size: the store's records have 224, this run 252" in r.stderr
    r = run_inproc(*context_args(root, "--reference-frame", "last"))
    assert r.returncode == 2 and "context" in r.stderr
    r = run_inproc("build", "--data-root", str(root), "--model", "tiny", "--device", "cpu", "--no-progress",
                   "--image-size", SIZE)
    assert r.returncode == 2 and "context" in r.stderr


@pytest.mark.slow
def test_changed_frame_makes_its_samples_stale(tmp_path):
    root = copy_sample(tmp_path / "d")
    assert run_inproc(*context_args(root)).returncode == 0
    frame = root / "episodes/episode_000/frame.001.jpg"
    os.utime(frame, ns=(frame.stat().st_atime_ns, frame.stat().st_mtime_ns + 10**9))
    r = run_inproc(*context_args(root, "--rebuild-stale"))
    # frame.001 is a frame of sample ep000 (train.jsonl) and of sample 0 (annotations.json): the same frame list,
    # so one deduplicated record serves both, and it is the one record rebuilt
    assert r.returncode == 0 and "stale rebuilt 1" in r.stderr, r.stderr
    st = featstore.open_store(root / "vggt_featstore")
    assert torch.equal(st.get_sample(id="ep000"), st.get_sample(id=0))


def test_missing_and_broken_frames_fail_their_samples_only(tmp_path):
    root = copy_sample(tmp_path / "d", patterns=("*.jpg", "*.png"))
    ep = "episodes/episode_000"
    (root / ep / "frame.002.jpg").write_bytes(b"not a jpeg")
    write_jsonl(root / "ann" / "train.jsonl", [
        {"id": "ok", "images": [f"{ep}/frame.000.jpg", f"{ep}/frame.001.jpg"]},
        {"id": "broken", "images": [f"{ep}/frame.000.jpg", f"{ep}/frame.002.jpg", f"{ep}/frame.003.jpg"]},
        {"id": "gone", "images": [f"{ep}/frame.000.jpg", f"{ep}/nope.jpg"]},
    ])
    r = run_inproc(*context_args(root))
    assert r.returncode == 1 and "1 samples failed" in r.stderr, r.stderr
    out = root / "vggt_featstore"
    assert featstore.open_store(out).keys() == ["ok"]
    failures = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["key"], f["frame"]) for f in failures] == [("broken", f"{ep}/frame.002.jpg")]
    missing = [json.loads(x) for x in (out / "missing.jsonl").read_text().splitlines()]
    assert [(m["key"], m["frame"], m["line"]) for m in missing] == [("gone", f"{ep}/nope.jpg", 3)]
    assert missing[0]["annotation"].endswith("train.jsonl")


def test_per_image_format_and_bad_options_refused(tmp_path):
    root = copy_sample(tmp_path / "d")
    for extra, text in [(("--format", "per-image"), "shard stores only"),
                        (("--history", "-1"), "--history=-1: expected a number of history frames")]:
        r = run_inproc(*context_args(root, *extra))
        assert r.returncode == 2 and text in r.stderr and "Traceback" not in r.stderr
    r = run_inproc("build", "--data-root", str(root), "--model", "tiny", "--device", "cpu", "--history", "2")
    assert r.returncode == 2 and "add --context sample" in r.stderr
    r = run_inproc("build", "--data-root", str(root), "--model", "tiny", "--device", "cpu", "--image-size", "500")
    assert r.returncode == 2 and "multiple of 14" in r.stderr
    assert not (root / "vggt_featstore").exists()


def test_preset_janusvln_and_overrides(tmp_path):
    from featstore.cli.build import apply_preset
    from featstore.cli.main import make_parser

    args = make_parser().parse_args(["build", "--data-root", str(tmp_path), "--model", "tiny", "--preset", "janusvln"])
    apply_preset(args)
    assert (args.context, args.image_size, args.preprocess, args.layers, args.reference_frame, args.precision) == \
        ("sample", 644, "crop", (-2,), "first", "deepspeed-bf16")
    args = make_parser().parse_args(["build", "--data-root", str(tmp_path), "--model", "tiny", "--preset", "janusvln",
                                     "--preprocess", "pad", "--reference-frame", "last", "--no-autocast"])
    apply_preset(args)
    assert (args.context, args.image_size, args.preprocess, args.reference_frame, args.autocast, args.precision) == \
        ("sample", 644, "pad", "last", False, None)  # --no-autocast: not the preset's recipe, the machine's
    args = make_parser().parse_args(["build", "--data-root", str(tmp_path), "--model", "tiny", "--preset", "vgllm",
                                     "--image-size", "644"])
    apply_preset(args)
    assert (args.context, args.image_size, args.preprocess, args.layers, args.reference_frame, args.precision) == \
        ("joint", 644, "crop", (-2,), "first", "deepspeed-bf16")


def test_sample_lookups_and_stream(tmp_path):
    root = copy_sample(tmp_path / "d")
    assert run_inproc(*context_args(root)).returncode == 0
    out = root / "vggt_featstore"
    store = featstore.open_store(out)
    sid, paths = annotation_samples(root)[0]
    assert torch.equal(store.get_sample(paths), store.get_sample(id=sid))
    assert store.get_sample(paths[:1] + paths[2:]) is None and store.get_sample(id="nope", default=7) == 7
    assert torch.equal(featstore.load_sample_features(paths, store=out), store.get_sample(paths))
    with pytest.raises(TypeError):
        store.get_sample(paths, id=sid)
    samples = list(featstore.stream(out, shuffle=False))
    assert sorted(s["key"] for s in samples) == store.keys()
    one = next(s for s in samples if s["key"] == store.sample_key(paths))  # ep000 and 0: one record
    assert one["frames"] == [store.key_for(p) for p in paths] and one["grid"] == (12, 16)
    assert one["features"].shape == (1, 192, 128)
    image_root = copy_sample(tmp_path / "img")
    assert run_inproc("build", "--data-root", str(image_root), "--model", "tiny", "--device", "cpu",
                      "--no-progress", "--num-workers", "0").returncode == 0
    with pytest.raises(StoreError, match="one record per image"):
        featstore.open_store(image_root / "vggt_featstore").get_sample(paths)


def test_sample_lookup_by_relative_paths(tmp_path, monkeypatch):
    root = copy_sample(tmp_path / "d")
    assert run_inproc(*context_args(root)).returncode == 0
    store = featstore.open_store(root / "vggt_featstore")
    sid, paths = annotation_samples(root)[0]
    keys = [store.key_for(p) for p in paths]
    assert torch.equal(store.get_sample(keys), store.get_sample(id=sid))  # the store's own keys
    monkeypatch.chdir(root / "episodes")
    rel = [os.path.relpath(p) for p in paths]  # relative to the current directory, as a dataset may hold them
    assert torch.equal(store.get_sample(rel), store.get_sample(id=sid))


@pytest.mark.slow
@pytest.mark.parametrize("point,batch", [("record-appended:3", "3"), ("shard-after-rename:1", "3"),
                                         ("batch-queued:2", "3"), ("shard-after-rename:1", "1")])
def test_sigkill_then_resume_samples(tmp_path, point, batch):
    """A resumed build has every record once, with the features of an uninterrupted build: bit for bit at
    --batch-size 1; at B=3 the resumed run batches the remaining samples differently, and BLAS (MKL on AVX2)
    rounds differently by matrix shape, so within the documented 2e-5 of B>1 (measured 4.8e-7)."""
    root = copy_sample(tmp_path / "d", patterns=("*.jpg", "*.png"))
    clean = copy_sample(tmp_path / "clean", patterns=("*.jpg", "*.png"))
    args = ("--history", "2", "--shard-size", "100KB", "--batch-size", batch)
    assert run_cli(*context_args(clean, *args)).returncode == 0
    r = run_cli(*context_args(root, *args), env={"FEATSTORE_KILL_AT": point})
    assert r.returncode == -9, f"expected SIGKILL at {point}: {r.returncode} {r.stderr[-2000:]}"
    r = run_cli(*context_args(root, *args))
    assert r.returncode == 0, r.stderr
    got, want = featstore.open_store(root / "vggt_featstore"), featstore.open_store(clean / "vggt_featstore")
    assert got.keys() == want.keys() and len(got) == 12
    for k in want.keys():
        assert got.record(k).meta == want.record(k).meta, k
        if batch == "1":
            assert torch.equal(got[k], want[k]), k
        else:
            assert (got[k] - want[k]).abs().max().item() <= 2e-5, k
    assert not [p for p in (root / "vggt_featstore" / "shards").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_torchrun_two_ranks_over_samples(tmp_path):
    root = copy_sample(tmp_path / "d", patterns=("*.jpg", "*.png"))
    clean = copy_sample(tmp_path / "clean", patterns=("*.jpg", "*.png"))
    assert run_cli(*context_args(clean, "--history", "2")).returncode == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "featstore", *context_args(root, "--history", "2")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(REPO),
                       env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = root / "vggt_featstore"
    assert {s.split("-")[1] for s in list_shards(out / "shards")} == {"00000", "00001"}
    got, want = featstore.open_store(out), featstore.open_store(clean / "vggt_featstore")
    assert got.keys() == want.keys()
    for k in want.keys():
        assert (got[k] - want[k]).abs().max().item() <= 2e-5, k
    m = read_manifest(out / "manifest.json")
    assert m["world_size"] == 2 and m["complete"] and m["counts"]["records"] == 12


def test_verify_sample_store(tmp_path):
    root = copy_sample(tmp_path / "d")
    assert run_inproc(*context_args(root)).returncode == 0
    out = root / "vggt_featstore"
    r = run_inproc("verify", str(out), "--recompute", "3", "--json", "-")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["recompute"]["checked"] == 3 and report["recompute"]["worst_error"] <= 1e-5
    frame = root / "episodes/episode_000/frame.001.jpg"  # a frame of samples ep000 and 0
    os.utime(frame, ns=(frame.stat().st_atime_ns, frame.stat().st_mtime_ns + 10**9))
    (root / "episodes/episode 001/rgb_002.png").unlink()  # a frame of samples ep001 and 1
    with open(root / "train.jsonl", "a") as f:  # a new record: its sample is missing from the store
        f.write(json.dumps({"id": "new", "images": ["episodes/episode_000/frame.003.jpg",
                                                     "episodes/episode_000/frame.000.jpg"]}) + "\n")
    r = run_inproc("verify", str(out), "--json", "-")
    assert r.returncode == 1
    kinds = {}
    for p in json.loads(r.stdout)["problems"]:
        kinds.setdefault(p["kind"], set()).add(p["key"])
    store = featstore.open_store(out)
    ep000, ep001 = ([p for sid, p in annotation_samples(root) if sid == name][0] for name in ("ep000", "ep001"))
    assert kinds["stale"] == {store.sample_key(ep000)} and kinds["orphan"] >= {store.sample_key(ep001)}
    assert "new" in kinds["missing"]


def test_export_of_sample_store(tmp_path):
    root = copy_sample(tmp_path / "d")
    assert run_inproc(*context_args(root)).returncode == 0
    out = root / "vggt_featstore"
    r = run_inproc("export", str(out), "--format", "per-image")
    assert r.returncode == 2 and "one record per training sample" in r.stderr and "Traceback" not in r.stderr
    assert not list(root.rglob("*.vggt_cache.pt"))
    r = run_inproc("export", str(out), "--format", "shards", "--codec", "int8", "--out", str(tmp_path / "q"))
    assert r.returncode == 0, r.stderr
    q = featstore.open_store(tmp_path / "q")
    sid, paths = annotation_samples(root)[0]
    want = featstore.open_store(out).get_sample(paths)
    got = q.get_sample(paths)
    assert q.context["mode"] == "sample" and got is not None
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 0.01


@pytest.mark.slow
def test_crash_keeps_the_records_already_on_disk(tmp_path):
    """A SIGKILL mid-shard loses only the records still on their way to the disk: the unfinished shard's
    complete records are kept on resume and not computed again."""
    root = copy_sample(tmp_path / "d", patterns=("*.jpg", "*.png"))
    args = context_args(root, "--history", "2", "--batch-size", "2")
    r = run_cli(*args, env={"FEATSTORE_KILL_AT": "record-appended:5"})
    assert r.returncode == -9, r.stderr[-2000:]
    shards = root / "vggt_featstore" / "shards"
    assert not list_shards(shards) and [p for p in shards.iterdir() if p.name.startswith(".")]
    r = run_inproc(*args)
    assert r.returncode == 0, r.stderr
    assert "kept its 5 complete records" in r.stderr and "5 already stored" in r.stderr, r.stderr
    store = featstore.open_store(root / "vggt_featstore")
    assert len(store) == 12 and len(list_shards(shards)) == 2
    members = []
    for s in list_shards(shards):
        import tarfile
        with tarfile.open(shards / s) as t:
            members += [m.name for m in t]
    assert len(members) == len(set(members)) == 12  # every sample once, in two valid tar files
    r = run_inproc("verify", str(root / "vggt_featstore"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_autocast_runs_fp32_weights_under_autocast_like_janusvln(tmp_path, tiny):
    root = copy_sample(tmp_path / "d", patterns=("*.jpg",))
    ep = "episodes/episode_000"
    write_jsonl(root / "train.jsonl", [{"id": "s", "images": [f"{ep}/frame.000.jpg", f"{ep}/frame.001.jpg",
                                                                f"{ep}/frame.002.jpg"]}])
    r = run_inproc(*context_args(root, "--autocast", "--batch-size", "1"))
    assert r.returncode == 0, r.stderr
    store = featstore.open_store(root / "vggt_featstore")
    assert (store.manifest["precision"], store.manifest["compute"]) == ("amp", "float32-weights+autocast-bfloat16")
    # JanusVLN's loop: fp32 weights, autocast, one frame at a time on a KV cache, the last frame's tokens kept
    paths = [root / ep / f"frame.00{i}.jpg" for i in range(3)]
    cache = None
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for p in paths:
            frame = preprocess_image(p, "crop", image_size=int(SIZE))[None, None]
            out, cache = tiny.stream_step(frame, cache, layers=(-2,))
    expected = next(iter(out.values()))[:, 0, 5:].float()
    got = store.get_sample(paths)
    assert torch.equal(got, expected)
    assert (got - streamed(tiny, paths)).abs().max().item() > 1e-4  # really computed under autocast
    r = run_inproc(*context_args(root, "--batch-size", "1"))
    assert r.returncode == 2 and "--precision: the store's records have amp, this run fp32" in r.stderr


@pytest.mark.slow
def test_job_array_parts_over_samples_then_merge(tmp_path):
    root = copy_sample(tmp_path / "d", patterns=("*.jpg", "*.png"))
    clean = copy_sample(tmp_path / "clean", patterns=("*.jpg", "*.png"))
    assert run_inproc(*context_args(clean, "--history", "2")).returncode == 0
    for part in ("0", "1"):
        r = run_inproc(*context_args(root, "--history", "2", "--num-parts", "2", "--part", part))
        assert r.returncode == 0, r.stderr
    assert run_inproc("merge", str(root / "vggt_featstore")).returncode == 0
    got, want = featstore.open_store(root / "vggt_featstore"), featstore.open_store(clean / "vggt_featstore")
    assert got.keys() == want.keys() and len(got) == 12
    for k in want.keys():  # each part batches its own trees: equal within B>1's bound, as under torchrun
        assert (got[k] - want[k]).abs().max().item() <= 2e-5, k
    assert read_manifest(root / "vggt_featstore" / "manifest.json")["context"]["mode"] == "sample"
