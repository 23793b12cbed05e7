"""The build's decode stage: make_loader delivers both item kinds (a chunk of decoded images, a context step)
in order, and with pin_memory in pinned memory (checked where there is a GPU); the batch feeder forms batches
off the main thread (whole chunks as they are, the rest in reused ring slots)."""

from __future__ import annotations

import threading

import pytest
import torch

from featstore.build.pipeline import (MAX_DECODE_CHUNK, DecodedStep, DecodeOptions, ImageDataset, StepDataset, WorkItem,
                                      decode_chunk, make_loader)
from featstore.build.ring import BatchFeeder, Ring
from featstore.build.schedule import plan_steps
from featstore.discover.samples import make_sample
from helpers import make_images


def loaders(root, pin: bool):
    keys = make_images(root, 6, size=(56, 56))
    items = [WorkItem(k, str(root / k)) for k in keys]
    images = make_loader(ImageDataset(items, DecodeOptions(image_size=28), chunk=4), 0, pin_memory=pin)
    samples = [make_sample(keys[:3]), make_sample(keys[:2])]
    steps = plan_steps(samples, 4, lambda _: (28, 28))
    paths = {k: str(root / k) for k in keys}
    return items, images, steps, make_loader(StepDataset(steps, paths, DecodeOptions(image_size=28)), 0, pin_memory=pin)


def test_make_loader_yields_both_item_kinds_in_order(tmp_path):
    items, images, steps, decoded_steps = loaders(tmp_path, pin=False)
    chunks = list(images)
    assert [d.item for chunk in chunks for d in chunk] == items and all(d.error is None for c in chunks for d in c)
    got = list(decoded_steps)
    assert [s.index for s in got] == list(range(len(steps))) and all(isinstance(s, DecodedStep) for s in got)
    assert all(s.images.shape[0] == len(step.distinct_frames) for s, step in zip(got, steps))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs an accelerator")
def test_make_loader_pins_both_item_kinds(tmp_path):
    _, images, _, decoded_steps = loaders(tmp_path, pin=True)
    assert all(d.image.is_pinned() for chunk in images for d in chunk)
    assert all(s.images.is_pinned() for s in decoded_steps)


def chunked(root, n: int, chunk: int, size=(56, 56)):
    keys = make_images(root, n, size=size)
    items = [WorkItem(k, str(root / k)) for k in keys]
    return items, make_loader(ImageDataset(items, DecodeOptions(image_size=28), chunk=chunk), 0)


def test_batch_sized_chunks_become_batches_without_a_copy(tmp_path):
    items, loader = chunked(tmp_path, 8, 4)
    chunks = list(loader)
    expected = torch.cat([torch.stack([d.image for d in c]) for c in chunks])
    feeder = BatchFeeder(iter(chunks), 4, lambda d: None)
    batches = [(b.images, b.items) for b in feeder]
    assert [it for _, its in batches for it in its] == items and feeder.zero_copy == 2 and feeder.copied == 0
    assert all(imgs.data_ptr() == c[0].image.data_ptr() for (imgs, _), c in zip(batches, chunks))  # the worker's storage
    assert torch.equal(torch.cat([imgs for imgs, _ in batches]), expected)


def test_batches_across_chunks_and_failures_are_stacked_into_reused_ring_slots(tmp_path):
    items, loader = chunked(tmp_path, 10, 3)
    (tmp_path / items[4].key).write_bytes(b"not a jpeg")
    failed = []
    feeder = BatchFeeder(loader, 4, failed.append, slots=2)
    got = []
    for b in feeder:
        assert b.slot is not None and b.images.untyped_storage().data_ptr() in {
            buf.untyped_storage().data_ptr() for buf in feeder.ring.buffers if buf is not None}
        got.append((list(b.items), b.images.clone()))
    assert [d.item for d in failed] == [items[4]] and failed[0].error
    assert [it for its, _ in got for it in its] == items[:4] + items[5:]
    assert [len(its) for its, _ in got] == [4, 4, 1] and feeder.ring.allocations <= 2
    singles = {d.item: d.image for c in make_loader(ImageDataset(items, DecodeOptions(image_size=28)), 0) for d in c}
    assert all(torch.equal(img, singles[it]) for its, imgs in got for it, img in zip(its, imgs))


class Fence:
    def __init__(self):
        self.waited = 0

    def synchronize(self):
        self.waited += 1


def test_a_ring_slot_is_reused_only_after_its_fence_and_its_release(tmp_path):
    ring = Ring(1)
    i, buf = ring.acquire(16)
    stop = threading.Event()
    stop.set()
    assert ring.acquire(16, stop) is None  # held: no second slot
    fence = Fence()
    ring.release(i, fence)
    j, again = ring.acquire(8)
    assert j == i and fence.waited == 1 and again.data_ptr() == buf.data_ptr() and ring.allocations == 1


def test_the_feeder_hands_on_errors_and_stops_when_the_consumer_stops(tmp_path):
    def broken():
        yield from chunked(tmp_path, 4, 2)[1]
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(BatchFeeder(broken(), 8, lambda d: None))
    feeder = BatchFeeder(chunked(tmp_path / "b", 12, 2)[1], 2, lambda d: None, slots=2)
    it = iter(feeder)
    next(it)
    it.close()  # the consumer stops early (an error in the model loop): the thread ends too
    assert not feeder.thread.is_alive()


def test_decode_chunks_are_batch_sized_unless_workers_would_idle():
    assert decode_chunk(1000, 32, 4) == 32 and decode_chunk(1000, 500, 4) == MAX_DECODE_CHUNK
    assert decode_chunk(24, 16, 2) == 12 and decode_chunk(24, 16, 0) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory and CUDA events need a GPU")
def test_pinned_batches_reach_the_device_intact_through_reused_slots(tmp_path):
    items, loader = chunked(tmp_path, 12, 4)
    singles = {d.item: d.image for c in make_loader(ImageDataset(items, DecodeOptions(image_size=28)), 0) for d in c}
    fence = lambda: torch.cuda.current_stream().record_event()  # noqa: E731
    feeder = BatchFeeder(loader, 4, lambda d: None, pin_memory=True, slots=2, fence=fence)
    on_device = [(b.items, b.images.to("cuda", non_blocking=True)) for b in feeder if b.images.is_pinned()]
    assert len(on_device) == 3 and feeder.ring.allocations <= 2
    assert all(torch.equal(img.cpu(), singles[it]) for its, imgs in on_device for it, img in zip(its, imgs))


def test_the_null_model_gives_full_size_outputs_without_computing(tmp_path):
    from featstore.build.extract import Extractor
    from featstore.build.nullmodel import NullModel

    model = NullModel(torch.device("cpu"))
    ex = Extractor(model, (4, 23), torch.bfloat16)
    a = ex.run(torch.zeros(2, 3, 518, 518, dtype=torch.uint8))
    b = ex.run(torch.full((3, 3, 518, 518), 255, dtype=torch.uint8))
    assert list(a) == ["features", "layer_23"] and a["features"].shape == (2, 1, 1369, 2048)
    assert b["features"].shape == (3, 1, 1369, 2048) and b["features"].dtype == torch.bfloat16
    assert a["features"].data_ptr() == b["features"].data_ptr()  # one buffer, no per-batch work
    assert a["features"].float().std() > 0.1  # feature-like values, not zeros: encode costs what it costs


def test_a_build_with_the_null_model_writes_readable_full_size_records(tmp_path):
    import featstore
    from helpers import run_inproc

    make_images(tmp_path / "data", 3, size=(560, 560))
    out = tmp_path / "store"
    r = run_inproc("build", "--data-root", str(tmp_path / "data"), "--model", "null", "--device", "cpu",
                   "--no-progress", "--num-workers", "0", "--batch-size", "2", "--dtype", "bfloat16", "--out", str(out))
    assert r.returncode == 0, r.stderr
    store = featstore.open_store(out)
    assert len(store) == 3 and store.manifest["model"]["fingerprint"] == "null"
    assert all(store[k].shape == (1, 1369, 2048) and store[k].dtype == torch.bfloat16 for k in store.keys())


def test_host_copies_of_cpu_outputs_are_the_outputs():
    from featstore.build.hostcopy import to_host

    feats = {"features": torch.randn(2, 1, 4, 8)}
    host, event = to_host(feats)
    assert event is None and host["features"] is feats["features"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="side-stream copies need a GPU")
def test_host_copies_run_on_a_side_stream_and_hold_the_values_after_the_event():
    from featstore.build.hostcopy import copy_stream, to_host

    x = torch.randn(4, 1, 1369, 64, device="cuda")
    y = (x * 2).to(torch.bfloat16)  # queued on the compute stream: the copy must wait for it
    host, event = to_host({"features": y})
    assert copy_stream(y.device) != torch.cuda.current_stream() and host["features"].is_pinned()
    event.synchronize()
    assert torch.equal(host["features"], (x * 2).to(torch.bfloat16).cpu())


def test_the_null_model_is_refused_for_sample_context_before_anything_is_written(tmp_path):
    from helpers import run_inproc

    make_images(tmp_path / "data", 4, size=(56, 56))
    out = tmp_path / "store"
    r = run_inproc("build", "--data-root", str(tmp_path / "data"), "--model", "null", "--device", "cpu",
                   "--no-progress", "--num-workers", "0", "--context", "sample", "--history", "2", "--out", str(out))
    errors = [line for line in r.stderr.splitlines() if "[ERROR]" in line]
    assert r.returncode == 2 and len(errors) == 1 and "--model null" in errors[0] and "Traceback" not in r.stderr
    assert not out.exists()
