"""featstore.build.context: executing plans equals JanusVLN's per-sample streaming (golden tiny_stream), for any
batch size, sharing strategy, reference frame, and across CUDA out-of-memory splits."""

from __future__ import annotations

import logging

import pytest
import torch

from featstore.build.context import CachePool, PlanExecutor, kv_bytes_per_frame, run_plan
from featstore.model import StreamCache, get_config
from featstore.discover.samples import episode_samples, make_sample, stream_order
from featstore.build.schedule import STRATEGIES, Step, cache_bound_frames, peak_cache_frames, plan_steps

TOL = 2e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are far too small for threads; on a shared 2-core machine they only add waiting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _frames_by_key(table: dict[str, torch.Tensor]):
    return lambda step: torch.stack([table[f] for f in step.distinct_frames])


def _run(model, samples, table, batch_size, strategy="tree", layers=(0, 1), **kw) -> dict[str, dict]:
    steps = plan_steps(samples, batch_size, strategy=strategy)
    out = {}
    for sample, feats in run_plan(model, steps, _frames_by_key(table), layers=layers, **kw):
        assert sample.key not in out
        out[sample.key] = feats
    assert sorted(out) == sorted(s.key for s in samples)
    return out


def _max_diff(a: dict[str, dict], b: dict[str, dict]) -> float:
    return max((a[k][n] - b[k][n]).abs().max().item() for k in a for n in a[k])


def _equal(a: dict[str, dict], b: dict[str, dict]) -> bool:
    return all(torch.equal(a[k][n], b[k][n]) for k in a for n in a[k])


@pytest.fixture(scope="module")
def episodes():
    """Two JanusVLN episodes of 12 and 5 frames (history 8) with random 28x42 frames."""
    gen = torch.Generator().manual_seed(7)
    table, samples = {}, []
    for e, n in enumerate((12, 5)):
        keys = [f"ep{e}/{i:03d}.jpg" for i in range(n)]
        table.update((k, torch.rand(3, 28, 42, generator=gen)) for k in keys)
        samples += episode_samples(keys)
    return samples, table


# ------------------------------------------------------------------------------------------ golden

@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("batch_size", [1, 4])
def test_golden_stream_every_frame_as_last_frame_of_its_sample(tiny_model, stream_data, strategy, batch_size):
    images, stream_ref, _ = stream_data
    keys = [f"f{k}" for k in range(4)]
    table = {k: images[0, i] for i, k in enumerate(keys)}
    samples = [make_sample(keys[:k + 1]) for k in range(4)]
    got = _run(tiny_model, samples, table, batch_size, strategy, tokens="all")
    for k, s in enumerate(samples):
        for name, layer in (("features", 0), ("layer_1", 1)):
            ref = stream_ref[f"frame.{k}.layer.{layer}"][0]  # [1, 545, 128]
            assert got[s.key][name].shape == ref.shape
            assert (got[s.key][name] - ref).abs().max().item() <= TOL, (k, layer)


def test_golden_joint_causal_mask_outputs(tiny_model, stream_data):
    images, _, causal_ref = stream_data
    keys = [f"f{k}" for k in range(4)]
    table = {k: images[0, i] for i, k in enumerate(keys)}
    samples = [make_sample(keys[:k + 1]) for k in range(4)]
    got = _run(tiny_model, samples, table, 1, layers=(1, 0))  # patch tokens; first requested layer = features
    with torch.no_grad():
        joint = tiny_model(images, layers=(0, 1), causal=True)
    for layer, name in ((1, "features"), (0, "layer_0")):
        ref = causal_ref[f"layer.{layer}"]
        assert (joint[layer] - ref).abs().max().item() <= TOL
        for k, s in enumerate(samples):
            assert got[s.key][name].shape == (1, 540, 128)
            assert (got[s.key][name] - ref[:, k, 5:]).abs().max().item() <= TOL


# ------------------------------------------------------------------------------------------ equivalences

def test_sharing_equals_separate_passes_bit_for_bit_at_batch_1(tiny_model, episodes):
    samples, table = episodes
    separate = _run(tiny_model, samples, table, 1, "none")
    for strategy in ("prefix", "tree"):
        assert _equal(_run(tiny_model, samples, table, 1, strategy), separate), strategy


def test_batched_equals_batch_1_and_sharing_within_tolerance(tiny_model, episodes):
    samples, table = episodes
    separate = _run(tiny_model, samples, table, 1, "none")
    for strategy in STRATEGIES:
        for batch_size in (3, 8):
            assert _max_diff(_run(tiny_model, samples, table, batch_size, strategy), separate) <= TOL


def test_each_sample_equals_its_own_stream(tiny_model, episodes):
    samples, table = episodes
    got = _run(tiny_model, samples, table, 5, "tree", layers=(-1,))
    for s in samples[::4]:
        cache = None
        with torch.no_grad():
            for f in stream_order(s):
                out, cache = tiny_model.stream_step(table[f][None, None], cache, layers=(1,))
        assert (got[s.key]["features"] - out[1][:, 0, 5:]).abs().max().item() <= TOL


def test_reference_frame_last_keeps_the_oldest_frame_with_newer_frames_as_context(tiny_model, episodes):
    samples, table = episodes
    s_first = samples[10]
    s_last = make_sample(s_first.frames, "last")
    got = _run(tiny_model, [s_first, s_last], table, 2, layers=(1,))
    reversed_images = torch.stack([table[f] for f in s_first.frames[::-1]])[None]
    with torch.no_grad():
        causal = tiny_model(reversed_images, layers=(1,), causal=True)[1]
        alone = tiny_model(table[s_first.frames[0]][None, None], layers=(1,))[1]
    assert (got[s_last.key]["features"] - causal[:, -1, 5:]).abs().max().item() <= TOL
    # Context matters: the oldest frame with context differs from the oldest frame alone and from 'first'.
    assert (got[s_last.key]["features"] - alone[:, 0, 5:]).abs().max().item() > 1e-4
    assert (got[s_last.key]["features"] - got[s_first.key]["features"]).abs().max().item() > 1e-4


# ------------------------------------------------------------------------------------------ executor details

class OOMAbove:
    """Wraps the model; stream_step raises CUDA out-of-memory for more than `limit` rows."""

    def __init__(self, model, limit: int) -> None:
        self.model, self.limit, self.calls = model, limit, []
        self.depth, self.patch_start_idx = model.depth, model.patch_start_idx

    def stream_step(self, frame, cache, layers):
        self.calls.append(frame.shape[0])
        if frame.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("simulated")
        return self.model.stream_step(frame, cache, layers=layers)


def test_oom_halves_the_step_and_gives_identical_results(tiny_model, episodes, caplog):
    samples, table = episodes
    steps = plan_steps(samples, 8, strategy="tree")
    assert max(st.size for st in steps) >= 3
    wrapped = OOMAbove(tiny_model, 2)
    executor = PlanExecutor(wrapped, (0, 1))
    with caplog.at_level(logging.WARNING, logger="featstore"):
        split = {s.key: f for s, f in executor.run(steps, _frames_by_key(table))}
    assert executor.max_rows == 2 and max(wrapped.calls) > 2
    assert "CUDA out of memory" in caplog.text and "at most 2 rows" in caplog.text
    same_chunks = {s.key: f for s, f in PlanExecutor(tiny_model, (0, 1), max_rows=2).run(steps, _frames_by_key(table))}
    assert _equal(split, same_chunks)  # the same batch compositions: bit for bit
    assert _max_diff(split, _run(tiny_model, samples, table, 8)) <= TOL
    with pytest.raises(torch.cuda.OutOfMemoryError):
        list(run_plan(OOMAbove(tiny_model, 0), steps, _frames_by_key(table), layers=(0,)))


def test_executor_memory_stays_within_the_plan_bound(tiny_model):
    gen = torch.Generator().manual_seed(3)
    samples = []
    table = {}
    for e in range(3):
        keys = [f"e{e}/{i:03d}" for i in range(30)]
        table.update((k, torch.rand(3, 14, 14, generator=gen)) for k in keys)
        samples += episode_samples(keys)
    for batch_size in (1, 4):
        steps = plan_steps(samples, batch_size)
        executor = PlanExecutor(tiny_model, (-2,))
        assert sum(1 for _ in executor.run(steps, _frames_by_key(table))) == len(samples)
        assert not executor.pool.where  # every cache released
        # Held batches are more than half used (compaction) and stacking copies at most B x (L-1) frames.
        assert executor.peak_frames_held <= 2 * peak_cache_frames(steps) + batch_size * 8
        assert peak_cache_frames(steps) <= cache_bound_frames(batch_size, 9)


def test_step_images_per_node_or_per_distinct_frame_and_iterables(tiny_model):
    gen = torch.Generator().manual_seed(5)
    table = {k: torch.rand(3, 28, 28, generator=gen) for k in "abc"}
    samples = [make_sample(["a", "b"]), make_sample(["c", "b"]), make_sample(["a", "a"])]
    steps = plan_steps(samples, 4, strategy="none")
    assert steps[1].frames == ("b", "b", "a") and steps[1].distinct_frames == ("b", "a")
    distinct = {s.key: f for s, f in run_plan(tiny_model, steps, _frames_by_key(table), layers=(0,))}
    per_node = [torch.stack([table[f] for f in st.frames]) for st in steps]
    from_list = {s.key: f for s, f in run_plan(tiny_model, steps, per_node, layers=(0,))}
    assert _equal(distinct, from_list)
    assert steps[0].frames == ("a", "c", "a")
    bad = [torch.stack([table["a"]] * 4)] + per_node[1:]
    with pytest.raises(ValueError, match="got 4 images"):
        list(run_plan(tiny_model, steps, bad, layers=(0,)))
    with pytest.raises(ValueError, match="ran out at step 1"):
        list(run_plan(tiny_model, steps, per_node[:1], layers=(0,)))
    sized = plan_steps(samples, 4, strategy="none", image_size_of=lambda f: (28, 42))
    with pytest.raises(ValueError, match="the plan says 28x42"):
        list(run_plan(tiny_model, sized, per_node, layers=(0,)))


def test_store_dtype_names_and_shapes(tiny_model, episodes):
    samples, table = episodes
    got = _run(tiny_model, samples[:3], table, 2, layers=(-1, 0), store_dtype=torch.bfloat16)
    feats = got[samples[2].key]
    assert list(feats) == ["features", "layer_0"]
    assert all(t.dtype == torch.bfloat16 and t.shape == (1, 6, 128) for t in feats.values())
    with pytest.raises(ValueError, match="out of range"):
        PlanExecutor(tiny_model, (2,))
    with pytest.raises(ValueError, match="tokens"):
        PlanExecutor(tiny_model, (0,), tokens="cls")


def test_features_do_not_depend_on_the_other_rows(tiny_model, episodes):
    # Stacking parents from several held batches (siblings, other trees) must keep each row's own context.
    samples, table = episodes
    steps: list[Step] = plan_steps(samples, 6, strategy="tree")
    assert any(len(set(st.parents)) < st.size for st in steps if st.depth > 0)  # siblings share a parent
    got = {s.key: f for s, f in run_plan(tiny_model, steps, _frames_by_key(table), layers=(1,))}
    reference = _run(tiny_model, samples, table, 1, "none", layers=(1,))
    assert _max_diff(got, reference) <= TOL


def _cache(rows: int, frames: int = 2) -> StreamCache:
    kv = torch.arange(rows, dtype=torch.float32).view(rows, 1, 1, 1).expand(rows, 2, frames, 3).contiguous()
    return StreamCache(frames, rows, (14, 14), 1, [(kv, kv + 100)])


def test_cache_pool_compacts_half_used_batches_and_stacks_rows():
    pool = CachePool()
    pool.put(_cache(4), [10], [2])  # one row of four kept: copied out
    assert pool.frames_held() == 2 and pool.where[10].cache.kv[0][0][0, 0, 0, 0] == 2
    pool.put(_cache(4), [20, 21, 22], [0, 1, 3])  # three of four: held as it is
    assert pool.frames_held() == 2 + 8
    pool.release([21])
    assert pool.frames_held() == 2 + 4  # two of four rows used: compacted (at most half used)
    assert pool.where[20].cache.kv[0][0][:, 0, 0, 0].tolist() == [0, 3]
    pool.release([20])
    assert pool.frames_held() == 2 + 2 and pool.where[22].cache.kv[0][0][0, 0, 0, 0] == 3
    stacked, copied = pool.gather([22, 10, 22])
    assert copied == 6 and stacked.kv[0][0][:, 0, 0, 0].tolist() == [3, 2, 3]
    assert stacked.kv[0][1][:, 0, 0, 0].tolist() == [103, 102, 103]
    pool.put(_cache(3), [30, 31, 32], [0, 1, 2])
    whole, copied = pool.gather([30, 31, 32])
    assert copied == 0 and whole.kv[0][0] is pool.where[30].cache.kv[0][0] and whole.kv is not pool.where[30].cache.kv
    part, copied = pool.gather([31, 32])
    assert copied == 0 and part.kv[0][0].data_ptr() == pool.where[31].cache.kv[0][0][1].data_ptr()


def test_kv_bytes_per_frame_matches_a_real_cache(tiny_model):
    with torch.no_grad():
        _, cache = tiny_model.stream_step(torch.rand(2, 1, 3, 28, 42), None, layers=(0,))
        _, cache = tiny_model.stream_step(torch.rand(2, 1, 3, 28, 42), cache, layers=(0,))
    assert cache.memory_bytes() == 2 * 2 * kv_bytes_per_frame(tiny_model.config, (28, 42), 0, torch.float32)
    # VGGT-1B at JanusVLN's 490x644 for layer -2 (22): 1615 tokens x 23 layers x K,V x 1024 x bf16.
    assert kv_bytes_per_frame(get_config("vggt-1b"), (490, 644), 22, torch.bfloat16) == 1615 * 23 * 2 * 1024 * 2
