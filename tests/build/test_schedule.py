"""featstore.build.schedule: prefix forests, frame passes per sample, and the static plan's order and memory bound."""

from __future__ import annotations

import pytest

from featstore.discover.samples import Sample, episode_samples, make_sample, stream_order
from featstore.build.schedule import (ORDERS, STRATEGIES, Step, build_forest, cache_bound_frames, frame_passes_per_sample,
                                peak_cache_frames, plan_steps)

# Issue 13's table: frame passes per sample for JanusVLN episodes (none, prefix, tree).
ISSUE_TABLE = {20: (7.2, 5.4, 3.1), 50: (8.3, 7.6, 4.3), 100: (8.6, 8.3, 4.7), 200: (8.8, 8.6, 4.9)}


def _episodes(lengths: list[int], reference_frame: str = "first", pad: bool = False) -> list[Sample]:
    out = []
    for e, n in enumerate(lengths):
        out += episode_samples([f"ep{e}/{i:04d}.jpg" for i in range(n)], pad=pad, reference_frame=reference_frame)
    return out


def _distinct_prefixes(samples: list[Sample]) -> int:
    return len({stream_order(s)[:k] for s in samples for k in range(1, len(s.frames) + 1)})


def _prefix_sharing_passes(samples: list[Sample]) -> int:
    streams = list(dict.fromkeys(stream_order(s) for s in samples))
    maximal = [a for a in streams if not any(len(b) > len(a) and b[:len(a)] == a for b in streams)]
    return sum(len(a) for a in maximal)


@pytest.mark.parametrize("length", sorted(ISSUE_TABLE))
def test_frame_passes_per_sample_match_issue_table(length):
    samples = _episodes([length])
    got = [frame_passes_per_sample(samples, s) for s in STRATEGIES]
    for value, expected in zip(got, ISSUE_TABLE[length]):
        assert abs(value - expected) <= 0.02 * expected, (length, got)
    # The same counts by independent definitions.
    assert got[0] == sum(len(s.frames) for s in samples) / len(samples)
    assert got[1] == _prefix_sharing_passes(samples) / len(samples)
    assert got[2] == _distinct_prefixes(samples) / len(samples)


def test_reference_frame_last_shares_nothing_in_janusvln_episodes():
    # Reversed lists start with each sample's own current frame: no two samples share a first frame.
    samples = _episodes([50], reference_frame="last")
    passes = [frame_passes_per_sample(samples, s) for s in STRATEGIES]
    assert passes[0] == passes[1] == passes[2] == frame_passes_per_sample(_episodes([50]), "none")
    assert len(build_forest(samples, "tree").roots()) == 50


def test_duplicates_and_prefixes_share_one_node():
    a = make_sample(["x", "y", "z"])
    b = make_sample(["x", "y"])
    dup = Sample("dup", ("x", "y", "z"))
    c = make_sample(["x", "q"])
    samples = [b, a, dup, c]
    assert build_forest(samples, "none").num_nodes == 2 + 3 + 3 + 2
    assert build_forest(samples, "prefix").num_nodes == 3 + 2
    tree = build_forest(samples, "tree")
    assert tree.num_nodes == 4
    ends = {s.key: n for n in range(tree.num_nodes) for s in tree.ends[n]}
    assert ends[a.key] == ends["dup"] and tree.depth[ends[b.key]] == 1
    with pytest.raises(ValueError, match="unknown strategy"):
        build_forest(samples, "bfs")


def _check_plan(samples: list[Sample], steps: list[Step], batch_size: int) -> None:
    """Every node once, parents first and still held, equal depth per step, each sample exactly once,
    `keep`/`release` consistent with the node's children."""
    done: dict[int, Step] = {}
    held: set[int] = set()
    children: dict[int, int] = {}
    for step in steps:
        assert 1 <= step.size <= batch_size and len(set(step.nodes)) == step.size
        for node, parent, frame, idx in zip(step.nodes, step.parents, step.frames, step.frame_index):
            assert node not in done and step.distinct_frames[idx] == frame
            if parent is None:
                assert step.depth == 0
            else:
                assert parent in held and done[parent].depth == step.depth - 1
                children[parent] = children.get(parent, 0) + 1
        assert len(set(step.distinct_frames)) == len(step.distinct_frames) == len(set(step.frames))
        done.update((n, step) for n in step.nodes)
        held.update(step.keep)
        for n in step.release:
            held.remove(n)
    assert not held
    emitted = [s for step in steps for s in step.samples()]
    assert sorted(s.key for s in emitted) == sorted(s.key for s in samples)
    assert all(n in children for step in steps for n in step.keep)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_plan_is_valid_and_within_memory_bound(strategy, order, batch_size):
    samples = _episodes([30, 17, 1, 45]) + _episodes([12], pad=True)
    steps = plan_steps(samples, batch_size, strategy=strategy, order=order)
    _check_plan(samples, steps, batch_size)
    assert sum(s.size for s in steps) == build_forest(samples, strategy).num_nodes
    peak = peak_cache_frames(steps)
    assert peak <= cache_bound_frames(batch_size, 9, order)
    if strategy != "tree" and order == "deepest":
        assert peak <= batch_size * (2 * 9 - 1)


def test_fill_order_fills_batches_and_deepest_order_bound_is_tight_enough():
    samples = _episodes([100] * 4)
    fill = plan_steps(samples, 8, strategy="tree")
    deep = plan_steps(samples, 8, strategy="tree", order="deepest")
    assert sum(s.size for s in fill) == sum(s.size for s in deep)
    assert len(fill) < 0.7 * len(deep)  # fuller steps
    many = _episodes([100] * 20)
    nodes = build_forest(many, "tree").num_nodes
    assert len(plan_steps(many, 8)) <= 1.01 * -(-nodes // 8)  # within 1% of the fewest possible steps
    assert peak_cache_frames(deep) <= cache_bound_frames(8, 9, "deepest")
    # B = 1 is a plain depth-first walk: at most the path's caches plus the new one.
    assert peak_cache_frames(plan_steps(samples, 1, strategy="tree", order="deepest")) <= 9 * 10 // 2


def test_batches_across_trees_and_groups_by_image_size():
    samples = _episodes([20] * 6)
    size = {f: ((28, 42) if f.startswith(("ep0/", "ep2/", "ep4/")) else (42, 28)) for s in samples for f in s.frames}
    steps = plan_steps(samples, 16, image_size_of=size.__getitem__)
    _check_plan(samples, steps, 16)
    for step in steps:
        assert {size[f] for f in step.frames} == {step.image_size}
    assert any(len({f.split("/")[0] for f in step.frames}) > 1 for step in steps)  # several trees per step


def test_frames_of_one_sample_must_have_one_size():
    samples = [make_sample(["a", "b"])]
    with pytest.raises(ValueError, match="one preprocessed size"):
        plan_steps(samples, 4, image_size_of={"a": (28, 28), "b": (28, 42)}.__getitem__)


def test_release_happens_after_the_last_child():
    samples = [make_sample(["r", "a", "x"]), make_sample(["r", "b"]), make_sample(["r", "a", "y"])]
    steps = plan_steps(samples, 1, strategy="tree", order="deepest")
    assert [s.frames for s in steps] == [("r",), ("a",), ("x",), ("y",), ("b",)]
    assert [s.release for s in steps] == [(), (), (), (steps[1].nodes[0],), (steps[0].nodes[0],)]
    assert [s.keep for s in steps] == [steps[0].nodes, steps[1].nodes, (), (), ()]
    assert steps[0].ends == ((),) and [s.key for s in steps[4].samples()] == [samples[1].key]


def test_distinct_frames_of_a_step():
    samples = [make_sample(["a", "a", "b"], id="1"), make_sample(["c", "a", "b"], id="2"),
               make_sample(["d", "b"], id="3")]
    steps = plan_steps(samples, 8, strategy="none")
    second = [s for s in steps if s.depth == 1][0]
    assert second.frames == ("a", "a", "b") and second.distinct_frames == ("a", "b")
    assert second.frame_index == (0, 0, 1)


def test_bad_batch_size_and_order():
    with pytest.raises(ValueError, match="batch size"):
        plan_steps([make_sample(["a"])], 0)
    with pytest.raises(ValueError, match="unknown order"):
        plan_steps([make_sample(["a"])], 1, order="widest")
    with pytest.raises(ValueError, match="no samples"):
        frame_passes_per_sample([])
