"""featstore plan (and build --dry-run): its counts against independent counts on small real data sets, its
projected bytes against a real build's, and its refusals."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from featstore.build.plan import count_prefix_nodes
from featstore.build.plan_data import (CODEC_BYTES_PER_VALUE, RECORD_OVERHEAD_BYTES, SHARD_OVERHEAD_BYTES,
                                       STORE_OVERHEAD_BYTES)
from featstore.build.schedule import build_forest
from featstore.discover.samples import janusvln_history, make_sample, stream_order
from featstore.model.preprocess import preprocessed_size
from featstore.runtime.fsutil import free_bytes
from helpers import run_inproc, write_jsonl


def images(root: Path, keys: list[str], size=(70, 56)) -> None:
    rng = np.random.RandomState(0)
    for k in keys:
        (root / k).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / k)


def plan(*args: str) -> tuple[int, dict, str]:
    r = run_inproc("plan", "--model", "tiny", "--device", "cpu", "--json", "-", *args)
    return r.returncode, (json.loads(r.stdout) if r.stdout.strip() else {}), r.stderr


def test_prefix_nodes_equal_the_build_schedule_forest():
    rng = random.Random(0)
    samples = [make_sample([f"f{rng.randrange(6)}" for _ in range(rng.randrange(1, 6))], rng.choice(("first", "last")))
               for _ in range(300)]
    streams = [stream_order(s) for s in samples]
    prefixes = {tuple(s[:k]) for s in streams for k in range(1, len(s) + 1)}
    assert count_prefix_nodes(streams) == len(prefixes) == build_forest(samples, "tree").num_nodes
    assert count_prefix_nodes([]) == 0


def test_episode_plan_matches_an_independent_count(tmp_path):
    lengths = {"a": 13, "b": 4, "c": 9}
    images(tmp_path, [f"{ep}/{i:03d}.png" for ep, n in lengths.items() for i in range(n)])
    for ref in ("first", "last"):
        rc, doc, err = plan("--data-root", str(tmp_path), "--context", "sample", "--history", "8",
                            "--image-size", "56", "--reference-frame", ref)
        assert rc == 0, err
        samples = [[f"{ep}/{j:03d}.png" for j in janusvln_history(i, 8)] for ep, n in lengths.items() for i in range(n)]
        streams = [tuple(s if ref == "first" else s[::-1]) for s in samples]
        prefixes = {s[:k] for s in streams for k in range(1, len(s) + 1)}
        assert doc["samples"] == doc["records"] == len(samples) == 26
        assert doc["frames_decoded"] == 26 and doc["failed"] == doc["missing"] == 0
        assert doc["frame_passes"] == len(prefixes)
        assert doc["frame_passes_without_sharing"] == sum(map(len, samples))
        h, w = preprocessed_size(70, 56, "crop", 56)
        assert doc["shapes"] == {f"[1, {(h // 14) * (w // 14)}, 128]": 26}
        assert "frame passes" in err and "projected bytes" in err  # the text report goes to stderr with --json -


def test_deduplicated_annotations_with_assumed_sizes_touch_no_image(tmp_path):
    rows = [{"id": f"s{s}q{q}", "images": [f"scene{s}/{i}.jpg" for i in range(4)]} for s in range(3) for q in range(5)]
    rows.append({"id": "other", "images": ["scene0/0.jpg", "scene0/1.jpg"]})  # a prefix of scene 0's list
    ann = tmp_path / "ann.jsonl"
    write_jsonl(ann, rows)  # no image file exists
    common = ("--data-root", str(tmp_path), "--annotations", str(ann), "--assume-size", "640x480", "--dtype",
              "bfloat16", "--image-size", "644")
    rc, doc, err = plan(*common, "--context", "sample")
    assert rc == 0, err
    assert (doc["samples"], doc["records"], doc["frames_decoded"], doc["missing"]) == (16, 4, 12, 0)
    assert doc["frame_passes"] == 12 and doc["frame_passes_without_sharing"] == 3 * 4 + 2
    h, w = preprocessed_size(640, 480, "crop", 644)
    values = (h // 14) * (w // 14) * 2 * 64
    assert doc["shapes"] == {f"[1, {values // 128}, 128]": 4}
    assert doc["bytes"] == {c: int(4 * values * per["bfloat16"] + 4 * RECORD_OVERHEAD_BYTES + STORE_OVERHEAD_BYTES
                                   + SHARD_OVERHEAD_BYTES) for c, per in CODEC_BYTES_PER_VALUE.items()}
    assert doc["projected_bytes"] == doc["bytes"]["zstd"] and doc["fits"] is True
    rc, doc, _ = plan(*common)  # --context image: one record per distinct image
    assert rc == 0 and (doc["samples"], doc["records"], doc["frame_passes"]) == (12, 12, 12)


def test_projected_raw_bytes_match_a_real_build(tmp_path):
    images(tmp_path, [f"ep/{i}.png" for i in range(6)])
    rc, doc, err = plan("--data-root", str(tmp_path), "--codec", "raw", "--image-size", "56", "--batch-size", "2",
                        "--layers=-2,-1")
    assert rc == 0, err
    r = run_inproc("build", "--data-root", str(tmp_path), "--model", "tiny", "--device", "cpu", "--no-progress",
                   "--num-workers", "0", "--codec", "raw", "--image-size", "56", "--batch-size", "2", "--layers=-2,-1")
    assert r.returncode == 0, r.stderr
    store = tmp_path / "vggt_featstore"
    actual = sum(p.stat().st_size for p in (store / "shards").iterdir()) + (store / "index.fsi").stat().st_size
    assert doc["records"] == 6 and abs(doc["bytes"]["raw"] - actual) / actual < 0.02, (doc["bytes"], actual)


def test_a_store_that_does_not_fit_is_an_error(tmp_path):
    per_record = 73 * 73 * 2048 * 4 * 24  # --image-size 1022 --tokens patch --dtype float32, 24 layers
    n = min(200_000, (free_bytes(tmp_path) or 0) // per_record + 10)
    ann = tmp_path / "ann.jsonl"
    write_jsonl(ann, [{"image": f"img/{i}.jpg"} for i in range(n)])
    layers = ",".join(str(i) for i in range(24))
    r = run_inproc("plan", "--model", "vggt-1b-random", "--data-root", str(tmp_path), "--annotations", str(ann),
                   "--assume-size", "1022x1022", "--image-size", "1022", "--dtype", "float32", f"--layers={layers}",
                   "--codec", "raw", "--json", str(tmp_path / "plan.json"))
    assert r.returncode == 1, r.stderr
    assert "[ERROR] the projected store" in r.stderr and "does not fit" in r.stderr
    assert "--codec int8" in r.stderr  # the smaller codec is suggested
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert doc["fits"] is False and doc["records"] == n and doc["projected_bytes"] > doc["free_bytes"]


def test_bad_plan_flags_are_one_error_line(tmp_path):
    for extra, text in [(("--assume-size", "640"), "--assume-size '640': expected WIDTHxHEIGHT"),
                        (("--rate", "-3"), "--rate -3.0: expected frame passes per second")]:
        r = run_inproc("plan", "--model", "tiny", "--data-root", str(tmp_path), *extra)
        assert r.returncode == 2 and text in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_inproc("build", "--model", "tiny", "--data-root", str(tmp_path), "--assume-size", "640x480")
    assert r.returncode == 2 and "--assume-size only apply to a plan: add --dry-run" in r.stderr
    assert not (tmp_path / "vggt_featstore").exists()


def test_build_dry_run_is_the_plan(tmp_path):
    images(tmp_path, [f"ep/{i}.png" for i in range(3)])
    args = ("--data-root", str(tmp_path), "--model", "tiny", "--device", "cpu", "--image-size", "56", "--json", "-")
    a, b = run_inproc("plan", *args), run_inproc("build", "--dry-run", *args)
    assert a.returncode == b.returncode == 0
    plan, dry = json.loads(a.stdout), json.loads(b.stdout)
    for doc in (plan, dry):  # the disk's free space moves between the two runs when anything else writes
        doc.pop("free_bytes"), doc.pop("fits")
    assert plan == dry
    assert not (tmp_path / "vggt_featstore").exists()  # nothing written


def test_records_the_trainer_draws_on_are_refused_without_a_transform(tmp_path):
    imgs = ["sc/0.jpg", "sc/1.jpg"]
    ann = tmp_path / "ann.jsonl"
    write_jsonl(ann, [{"id": "a", "images": imgs}, {"id": "b", "images": imgs},
                      {"id": "spar", "images": imgs, "spar_info": {"type": "depth"}}])
    rc, doc, err = plan("--data-root", str(tmp_path), "--annotations", str(ann), "--assume-size", "640x480",
                        "--context", "sample")
    assert rc == 0, err
    assert (doc["samples"], doc["records"], doc["failed"]) == (3, 1, 1)  # a+b share one record; spar is refused
