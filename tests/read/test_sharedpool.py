"""The recycled shared-memory pool that DataLoader workers decode samples into: pickling by reference, release
counting, slot reuse, and the descriptor protocol (in one process; the DataLoader runs are in test_codec_stores)."""

from __future__ import annotations

import gc
from multiprocessing.reduction import ForkingPickler

import pytest
import torch

from featstore.read import sharedpool
from featstore.read.sharedpool import SharedSample, SlotPool, slot_class

pytestmark = pytest.mark.skipif(not sharedpool.AVAILABLE, reason="needs os.memfd_create (Linux)")


def make_sample(pool: SlotPool, key: str, fill: float) -> SharedSample:
    slot = pool.slot(4096 + 64)
    values = slot.empty((32, 32), torch.float32)
    values.fill_(fill)
    scales = slot.empty((16,), torch.int8)
    scales.fill_(int(fill) % 100)
    sample = SharedSample(key=key, features=values, features_scales=scales, quantized={"features": "float32"})
    sample.slot = slot
    return sample


def send(sample: SharedSample) -> bytes:
    return bytes(ForkingPickler.dumps(sample))


def receive(data: bytes) -> dict:
    return ForkingPickler.loads(data)


@pytest.fixture(autouse=True)
def fresh_receiver_state():
    sharedpool._latest.clear()
    yield
    sharedpool._latest.clear()
    gc.collect()


def test_a_sample_crosses_by_reference_and_arrives_as_a_plain_dict():
    pool = SlotPool()
    sample = make_sample(pool, "a", 7.0)
    got = receive(send(sample))
    assert type(got) is dict and list(got) == ["key", "features", "features_scales", "quantized"]
    assert got["key"] == "a" and got["quantized"] == {"features": "float32"}
    assert torch.equal(got["features"], torch.full((32, 32), 7.0))
    assert torch.equal(got["features_scales"], torch.full((16,), 7, dtype=torch.int8))
    got["features"][0, 0] = -1.0  # the receiver's tensor is the worker's memory, not a copy
    assert float(sample["features"][0, 0]) == -1.0
    plain = SharedSample(key="b", other=torch.ones(3))  # no slot: pickled as usual, values copied
    assert type(receive(send(plain))) is dict and torch.equal(receive(send(plain))["other"], torch.ones(3))


def test_a_tensor_torch_moved_to_its_own_shared_memory_is_no_longer_sent_by_reference():
    pool = SlotPool()
    sample = make_sample(pool, "a", 3.0)
    alone = receive(bytes(ForkingPickler.dumps(sample["features"])))  # torch moves the storage to new shared memory
    assert torch.equal(alone, torch.full((32, 32), 3.0)) and sample["features"].is_shared()
    gc.collect()
    assert sample.slot.arena.live[sample.slot.index] == 0  # the slot's memory is no longer referenced
    got = receive(send(sample))  # so the sample pickles its moved tensors as usual, never the reusable slot
    assert torch.equal(got["features"], torch.full((32, 32), 3.0)) and sum(sample.slot.arena.sent) == 0


def test_slots_are_reused_only_after_the_worker_and_the_receiver_release_them():
    pool = SlotPool()
    first = make_sample(pool, "a", 1.0)
    arena, index = first.slot.arena, first.slot.index
    got = receive(send(first))
    del first
    gc.collect()
    assert arena.live[index] == 0 and arena.sent[index] == 1 and int(arena.header[1 + index]) == 0
    held = [make_sample(pool, f"k{i}", float(i)) for i in range(arena.count - 1)]  # every other slot
    assert all(s.slot.index != index for s in held)
    extra = make_sample(pool, "x", 99.0)  # the arena is full while the receiver holds slot `index`
    assert extra.slot.arena is not arena and torch.equal(got["features"], torch.full((32, 32), 1.0))
    del got
    gc.collect()
    assert int(arena.header[1 + index]) == 1  # released by the receiver
    del held
    gc.collect()
    again = [make_sample(pool, "y", 5.0) for _ in range(2 * arena.count - 1)]  # every free slot of both arenas
    assert {s.slot.index for s in again if s.slot.arena is arena} == set(range(arena.count))
    assert len(pool.arenas) == 2 and extra.slot.arena in pool.arenas


def test_held_samples_are_never_overwritten_by_later_ones():
    pool = SlotPool()
    kept = [receive(send(make_sample(pool, f"k{i}", float(i)))) for i in range(3 * 64)]
    gc.collect()  # the worker's references are gone; the receiver holds every sample
    for i, s in enumerate(kept):
        assert torch.equal(s["features"], torch.full((32, 32), float(i))), i
    for i in range(3 * 64):
        receive(send(make_sample(pool, "t", -5.0)))  # dropped at once: reuses slots, never the held ones
    for i, s in enumerate(kept):
        assert torch.equal(s["features"], torch.full((32, 32), float(i))), i


def test_the_descriptor_travels_once_per_arena_and_a_lost_one_is_recovered():
    pool = SlotPool()
    a, b = make_sample(pool, "a", 1.0), make_sample(pool, "b", 2.0)
    sent_a, sent_b = send(a), send(b)
    assert b"DupFd" in sent_a and b"DupFd" not in sent_b  # same arena: b carries no descriptor
    got_b = receive(sent_b)  # b first, as if a were lost: its arena is opened through /proc
    assert torch.equal(got_b["features"], torch.full((32, 32), 2.0))
    got_a = receive(sent_a)
    assert torch.equal(got_a["features"], torch.full((32, 32), 1.0))


def test_slot_sizes_round_up_by_at_most_an_eighth():
    for n in (1, 63, 64, 1000, 4097, 2_803_000, 5_607_424, 8_700_000):
        size = slot_class(n)
        assert n <= size <= max(64, n + n // 8 + 64) and size % 64 == 0
    assert slot_class(2_803_000) == slot_class(2_803_100)  # records of one store share a slot size
