"""The build's decode stage: make_loader delivers both item kinds (a chunk of decoded images, a context step)
in order, and with pin_memory in pinned memory (checked where there is a GPU)."""

from __future__ import annotations

import pytest
import torch

from featstore.build.pipeline import DecodedStep, DecodeOptions, ImageDataset, StepDataset, WorkItem, make_loader
from featstore.build.schedule import plan_steps
from featstore.discover.samples import make_sample
from tests.buildutil import make_images


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
