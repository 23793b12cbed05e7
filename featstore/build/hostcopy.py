"""Device-to-host copies of a batch's outputs on a side stream, so they overlap the next batch's compute.

The copy stream first waits for the compute stream (the outputs are complete), the device tensors are marked
as used by it (their memory is not reused before the copy ends), and the returned event tells the writer
thread when the pinned host tensors hold the values. On CPU the outputs are already host tensors.
"""

from __future__ import annotations

import threading

import torch

_streams: dict[torch.device, "torch.cuda.Stream"] = {}
_lock = threading.Lock()


def copy_stream(device: torch.device) -> "torch.cuda.Stream":
    """The side stream for copies off ``device`` (one per device, made on first use)."""
    with _lock:
        if device not in _streams:
            _streams[device] = torch.cuda.Stream(device)
        return _streams[device]


def to_host(feats: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
    """Start copying features to pinned host memory on the side stream; returns the host tensors and the event
    that marks the end of the copy (None, and the tensors themselves, when they are not on a GPU)."""
    first = next(iter(feats.values()))
    if first.device.type != "cuda":
        return feats, None
    stream = copy_stream(first.device)
    stream.wait_stream(torch.cuda.current_stream(first.device))
    host = {n: torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for n, t in feats.items()}
    with torch.cuda.stream(stream):
        for n, t in feats.items():
            host[n].copy_(t, non_blocking=True)
            t.record_stream(stream)
        ev = torch.cuda.Event()
        ev.record(stream)
    return host, ev
