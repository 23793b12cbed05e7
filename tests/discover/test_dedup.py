"""featstore.discover.dedup: samples with equal frame lists, reference frame and transform input share one record."""

from __future__ import annotations

import itertools

from featstore.discover import discover_samples
from featstore.discover.dedup import RecordPlan, dedup_counts, dedup_samples
from featstore.discover.samples import SampleItem, make_sample
from featstore.formats.keys import frames_key

from helpers import touch, write_jsonl


def scannet_like(root, scenes=3, questions=5, frames=4):
    """Many questions per scene, one frame list per scene; returns the annotation file."""
    rows = []
    for s in range(scenes):
        imgs = [f"scene{s}/{i}.jpg" for i in range(frames)]
        for i in imgs:
            touch(root / i)
        rows += [{"id": f"s{s}q{q}", "images": imgs, "conversations": [{"value": f"question {q}"}]}
                 for q in range(questions)]
    return write_jsonl(root / "ann" / "train.jsonl", rows)


def test_questions_of_one_scene_share_one_record(tmp_path):
    ann = scannet_like(tmp_path)
    found = discover_samples(tmp_path, annotations=[ann])
    assert len(found.items) == 15  # every unique id is its own sample
    plans = dedup_samples(found.items)
    scenes = {tuple(f"scene{s}/{i}.jpg" for i in range(4)) for s in range(3)}
    assert {p.frames for p in plans} == scenes and len(plans) == 3
    for p in plans:
        assert isinstance(p, RecordPlan) and isinstance(p, SampleItem)
        s = p.frames[0].split("/")[0][5:]
        assert p.key == frames_key(p.frames) and p.ids == tuple(f"s{s}q{q}" for q in range(5))
        assert p.samples == 5 and p.sample.id is None and len(p.paths) == 4
        assert all(path.endswith(f) for path, f in zip(p.paths, p.frames))
    assert dedup_counts(plans) == (15, 3)


def test_a_sample_alone_keeps_its_key_and_id(tmp_path):
    ann = scannet_like(tmp_path, scenes=2, questions=1)
    plans = dedup_samples(discover_samples(tmp_path, annotations=[ann]).items)
    assert [(p.key, p.ids, p.samples) for p in plans] == [("s0q0", ("s0q0",), 1), ("s1q0", ("s1q0",), 1)]


def test_records_without_ids_are_counted_and_merged_with_ided_ones(tmp_path):
    imgs = [f"ep/{i}.jpg" for i in range(3)]
    for i in imgs:
        touch(tmp_path / i)
    ann = write_jsonl(tmp_path / "a.jsonl", [{"images": imgs}, {"images": imgs}, {"id": "x", "images": imgs},
                                             {"images": imgs[:2]}])
    found = discover_samples(tmp_path, annotations=[ann])
    assert sorted(i.count for i in found.items) == [1, 1, 2]
    plans = dedup_samples(found.items)
    assert [(p.frames, p.ids, p.samples) for p in plans] == sorted(
        [(tuple(imgs), ("x",), 3), (tuple(imgs[:2]), (), 1)], key=lambda t: frames_key(t[0]))


def test_a_record_the_transform_reads_is_its_own_sample(tmp_path):
    imgs = [f"sc/{i}.jpg" for i in range(2)]
    for i in imgs:
        touch(tmp_path / i)
    spar = {"type": "depth", "point": [1, 2]}
    ann = write_jsonl(tmp_path / "a.jsonl", [
        {"id": "plain1", "images": imgs}, {"id": "plain2", "images": imgs},
        {"id": "spar1", "images": imgs, "spar_info": spar},
        {"images": imgs, "spar_info": spar}, {"images": imgs, "spar_info": spar},  # equal records: one sample
        {"images": imgs, "spar_info": {"type": "distance"}}])
    found = discover_samples(tmp_path, annotations=[ann], transform_depends_on=("spar_info",))
    own = [i for i in found.items if i.own_input]
    assert len(found.items) == 5 and len(own) == 3
    assert all(i.annotation is not None and "spar_info" in i.annotation for i in own)
    assert all(i.annotation is None for i in found.items if not i.own_input)
    plans = dedup_samples(found.items, transform_depends_on=("spar_info",))
    assert sorted((p.ids, p.samples) for p in plans) == [((), 1), ((), 2), (("plain1", "plain2"), 2), (("spar1",), 1)]
    assert len({p.key for p in plans}) == 4
    # with no transform, the record fields do not matter: one record for all six
    plain = dedup_samples(discover_samples(tmp_path, annotations=[ann]).items)
    assert [(p.ids, p.samples) for p in plain] == [(("plain1", "plain2", "spar1"), 6)]


def test_a_predicate_and_kept_annotations(tmp_path):
    imgs = ["a.jpg", "b.jpg"]
    for i in imgs:
        touch(tmp_path / i)
    ann = write_jsonl(tmp_path / "a.jsonl", [{"id": "1", "images": imgs, "mark": True},
                                             {"id": "2", "images": imgs}, {"id": "3", "images": imgs}])
    found = discover_samples(tmp_path, annotations=[ann], keep_annotations=True)
    assert all(i.annotation is not None and not i.own_input for i in found.items)
    plans = dedup_samples(found.items, transform_depends_on=lambda r: bool(r.get("mark")))
    assert sorted(p.ids for p in plans) == [("1",), ("2", "3")]


def test_reference_frame_and_order_separate_records():
    frames = ("e/0.jpg", "e/1.jpg", "e/2.jpg")
    items = [SampleItem(make_sample(f, ref, id), tuple(f)) for f, ref, id in [
        (frames, "first", "a"), (frames, "last", "b"), (frames[::-1], "first", "c"), (frames, "first", "d")]]
    plans = dedup_samples(items)
    assert sorted(p.ids for p in plans) == [("a", "d"), ("b",), ("c",)]


def test_counts_match_an_independent_count_on_episodes(tmp_path):
    for ep, n in (("a", 12), ("b", 3)):
        for i in range(n):
            touch(tmp_path / ep / f"{i:03d}.jpg")
    for pad, history in itertools.product((False, True), (0, 2, 8)):
        found = discover_samples(tmp_path, history=history, history_pad=pad)
        plans = dedup_samples(found.items)
        distinct = {(i.sample.reference_frame, i.frames) for i in found.items}
        assert len(plans) == len(distinct) and dedup_counts(plans) == (len(found.items), len(distinct))
