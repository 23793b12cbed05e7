"""featstore.discover.samples: JanusVLN's history rule, reference frames, sample keys and annotation records."""

from __future__ import annotations

import hashlib
import json

import pytest

from featstore.discover.samples import (Sample, episode_samples, frames_of_record, janusvln_history, janusvln_history_padded,
                               kept_index, make_sample, sample_key, stream_order)


@pytest.mark.parametrize("i,expected", [
    (0, [0]), (8, [0, 1, 2, 3, 4, 5, 6, 7, 8]), (9, [0, 1, 2, 3, 4, 5, 6, 7, 9]),
    (20, [0, 2, 5, 7, 10, 12, 15, 17, 20]), (21, [0, 2, 5, 7, 10, 13, 15, 18, 21]),
])
def test_janusvln_history_rule(i, expected):
    assert janusvln_history(i) == expected


def test_janusvln_history_is_floor_of_k_i_over_8():
    # numpy.linspace(0, i, 9, dtype=int) truncates k * (i / 8); i / 8 is exact in binary, so it is k*i // 8.
    for i in range(9, 600):
        assert janusvln_history(i) == [k * i // 8 for k in range(9)], i
    assert janusvln_history(3, history=2) == [0, 1, 3]
    with pytest.raises(ValueError):
        janusvln_history(-1)


def test_front_padding_variant_repeats_frame_zero():
    assert janusvln_history_padded(0) == [0] * 9
    assert janusvln_history_padded(2) == [0, 0, 0, 0, 0, 0, 0, 1, 2]
    assert janusvln_history_padded(8) == list(range(9))
    assert janusvln_history_padded(20) == janusvln_history(20)
    assert all(len(janusvln_history_padded(i)) == 9 for i in range(40))


def test_reference_frame_first_and_last():
    first = make_sample(["a", "b", "c"])
    last = make_sample(["a", "b", "c"], "last")
    assert stream_order(first) == ("a", "b", "c") and kept_index(first) == 2
    assert stream_order(last) == ("c", "b", "a") and kept_index(last) == 0
    # The kept frame is the last frame fed.
    for s in (first, last):
        assert s.frames[kept_index(s)] == stream_order(s)[-1]
    assert first.key != last.key


def test_sample_validation():
    assert make_sample(["a"]).frames == ("a",)
    assert isinstance(Sample("k", ["a", "b"]).frames, tuple)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no frames"):
        Sample("k", ())
    with pytest.raises(ValueError, match="reference frame 'middle'"):
        Sample("k", ("a",), "middle")
    with pytest.raises(ValueError, match="non-empty string"):
        Sample("k", ("a", ""))


def test_sample_key_rule_is_the_documented_digest():
    frames = ["ep1/000.jpg", "ep1/001.jpg", "épisode/002.jpg", "bad\udcffname.jpg"]
    payload = json.dumps(["first", *frames], ensure_ascii=True, separators=(",", ":")).encode("ascii")
    assert sample_key(frames) == "sample-" + hashlib.sha256(payload).hexdigest()[:32]
    assert sample_key(frames) == sample_key(tuple(frames))  # stable, any sequence type
    assert sample_key(frames, "last") != sample_key(frames)
    assert sample_key(frames[::-1]) != sample_key(frames)
    assert sample_key(["a,b"]) != sample_key(["a", "b"])
    assert sample_key(frames, id="ep1/step3") == "ep1/step3"
    assert make_sample(frames, id="x").key == "x" and make_sample(frames, id="x").id == "x"
    with pytest.raises(ValueError, match="non-empty string"):
        sample_key(frames, id="")


def test_episode_samples():
    keys = [f"ep/{i:03d}.png" for i in range(25)]
    samples = episode_samples(keys)
    assert len(samples) == 25 and len({s.key for s in samples}) == 25
    for i, s in enumerate(samples):
        assert s.frames[-1] == keys[i] and s.frames == tuple(keys[j] for j in janusvln_history(i))
    assert episode_samples(keys, history=3)[10].frames == tuple(keys[j] for j in janusvln_history(10, 3))
    padded = episode_samples(keys, pad=True)
    assert all(len(s.frames) == 9 for s in padded) and padded[1].frames == (keys[0],) * 8 + (keys[1],)
    last = episode_samples(keys, reference_frame="last")
    assert all(s.reference_frame == "last" and s.frames == f.frames for s, f in zip(last, samples))


@pytest.mark.parametrize("record,expected", [
    ({"images": ["a.jpg", "b.jpg"]}, ["a.jpg", "b.jpg"]),
    ({"images": "a.jpg"}, ["a.jpg"]),
    ({"history_images": ["a.jpg", "b.jpg"], "current_image": "c.jpg"}, ["a.jpg", "b.jpg", "c.jpg"]),
    ({"history_images": [], "current_image": "c.jpg"}, ["c.jpg"]),
    ({"image": "a.jpg"}, ["a.jpg"]),
    ({"image": ["a.jpg", "b.jpg"]}, ["a.jpg", "b.jpg"]),
    ({"images": ["x.jpg"], "image": "y.jpg"}, ["x.jpg"]),
    ({"conversations": []}, None),
    ({"images": []}, None),
    ({"history_images": ["a.jpg"]}, None),
])
def test_frames_of_record(record, expected):
    assert frames_of_record(record) == expected


@pytest.mark.parametrize("record", [{"images": [1, 2]}, {"images": {"a": 1}}, {"image": None},
                                   {"history_images": ["a"], "current_image": ["b"]}, {"images": ["a", ""]}])
def test_frames_of_record_rejects_malformed_fields(record):
    with pytest.raises(ValueError, match="annotation field"):
        frames_of_record(record)


def test_the_frame_key_has_one_definition_in_formats():
    from featstore.formats.keys import frames_key

    frames = ["ep/0.jpg", "ep/1.jpg"]
    assert sample_key(frames) == frames_key(frames) and sample_key(frames, "last") == frames_key(frames, "last")


# ---------------------------------------------------------------- discover_samples: one result shape

def test_sample_discovery_has_the_image_discovery_shape(tmp_path):
    from featstore.discover import Discovery, MissingFrame, discover_images, discover_samples
    from helpers import touch, write_jsonl

    for n in range(3):
        touch(tmp_path / "ep" / f"{n}.jpg")
    ann = write_jsonl(tmp_path / "a" / "train.jsonl", [
        {"id": "one", "images": ["ep/0.jpg", "ep/1.jpg"]},
        {"id": "lost", "images": ["ep/0.jpg", "ep/gone.jpg"]},
        {"images": ["ep/1.jpg", "ep/2.jpg"]},
        "not a record"])
    found = discover_samples(tmp_path, annotations=[ann])
    images = discover_images(tmp_path, annotations=[ann])
    assert type(found) is type(images) is Discovery
    assert [i.key for i in found.items] == ["one", sample_key(["ep/1.jpg", "ep/2.jpg"])]
    assert found.missing == [MissingFrame("lost", "ep/gone.jpg", str(ann), 2, frame="ep/gone.jpg")]
    assert found.missing_keys == ["lost"] and images.missing_keys == ["ep/gone.jpg"]
    assert found.missing[0].frame_key == images.missing[0].frame_key == "ep/gone.jpg"
    assert found.missing[0].to_json() == {"key": "lost", "frame": "ep/gone.jpg", "path": "ep/gone.jpg",
                                          "annotation": str(ann), "line": 2}
    assert images.missing[0].to_json()["references"] == 1 and "frame" not in images.missing[0].to_json()
    assert [str(m) for m in found.malformed] == [f"{ann}:4: a JSON str, not a record (a JSON object)"]
    entry = found.manifest_entry
    assert entry["annotations"] == [{"file": "a/train.jsonl", "records": 3, "samples": 2, "missing": 1}]
    assert (entry["samples"], entry["missing"], entry["malformed_lines"]) == (2, 1, 1)
    assert found.source_stats[0].records == 3 and found.sources == [str(ann)]


def test_episode_samples_from_folders_share_the_shape(tmp_path):
    from featstore.discover import discover_samples
    from helpers import touch

    for ep, n in (("a", 3), ("b", 2)):
        for i in range(n):
            touch(tmp_path / ep / f"{i}.jpg")
    found = discover_samples(tmp_path, history=1)
    assert [i.frames for i in found.items] == [("a/0.jpg",), ("a/0.jpg", "a/1.jpg"), ("a/0.jpg", "a/2.jpg"),
                                              ("b/0.jpg",), ("b/0.jpg", "b/1.jpg")]
    assert found.missing == [] and found.scanned
    assert found.manifest_entry["episodes"] == 2 and found.manifest_entry["frames"] == 5
