"""Streaming (per-frame KV cache, causal over frames) against JanusVLN's golden stream outputs."""

from __future__ import annotations

import pytest
import torch



def test_stream_matches_janusvln_per_frame_and_layer(tiny_model, stream_data):
    images, stream_ref, _ = stream_data
    cache = None
    with torch.no_grad():
        for k in range(images.shape[1]):
            out, cache = tiny_model.stream_step(images[:, k:k + 1], cache, layers=(0, 1))
            for layer in (0, 1):
                ref = stream_ref[f"frame.{k}.layer.{layer}"]
                assert out[layer].shape == ref.shape
                assert (out[layer] - ref).abs().max().item() <= 2e-5, (k, layer)
    assert cache.num_frames == 4
    assert tuple(cache.kv[0][0].shape) == (1, 4, 4 * 545, 16)


def test_causal_forward_matches_janusvln_noncache(tiny_model, stream_data):
    images, stream_ref, causal_ref = stream_data
    with torch.no_grad():
        out = tiny_model(images, layers=(0, 1), causal=True)
        bidir = tiny_model(images, layers=(1,))
    for layer in (0, 1):
        assert (out[layer] - causal_ref[f"layer.{layer}"]).abs().max().item() <= 2e-5
    # Official (bidirectional) differs from the causal path for frames that have later frames.
    assert (bidir[1][:, 0] - out[1][:, 0]).abs().max().item() > 1e-4


@pytest.mark.slow  # three streams step by step (about 10 s on 2 cores)
def test_stream_batch_of_two_equals_each_stream_alone(tiny_model, stream_data):
    images, stream_ref, _ = stream_data
    other = images.flip(1)  # a different stream: the same frames in reverse order
    batch = torch.cat([images, other], dim=0)
    cache2 = cache_a = cache_b = None
    with torch.no_grad():
        for k in range(batch.shape[1]):
            out2, cache2 = tiny_model.stream_step(batch[:, k], cache2, layers=(0, 1))  # [B,3,H,W] accepted
            out_a, cache_a = tiny_model.stream_step(images[:, k:k + 1], cache_a, layers=(0, 1))
            out_b, cache_b = tiny_model.stream_step(other[:, k:k + 1], cache_b, layers=(0, 1))
            for layer in (0, 1):
                assert out2[layer].shape == (2, 1, 545, 128)
                assert (out2[layer][0:1] - out_a[layer]).abs().max().item() <= 2e-5
                assert (out2[layer][1:2] - out_b[layer]).abs().max().item() <= 2e-5
                ref = stream_ref[f"frame.{k}.layer.{layer}"]
                assert (out2[layer][0:1] - ref).abs().max().item() <= 2e-5
    # The second stream's last frame is the first stream's first frame seen after three others.
    assert (out2[1][1] - out_a[1][0]).abs().max().item() > 1e-5


def test_stream_rejects_inconsistent_frames(tiny_model):
    with torch.no_grad():
        _, cache = tiny_model.stream_step(torch.rand(1, 1, 3, 28, 28), None, layers=(0,))
        with pytest.raises(ValueError, match="start a new StreamCache"):
            tiny_model.stream_step(torch.rand(2, 1, 3, 28, 28), cache, layers=(0,))
        with pytest.raises(ValueError, match="caches 1 layers"):
            tiny_model.stream_step(torch.rand(1, 1, 3, 28, 28), cache, layers=(1,))
        with pytest.raises(ValueError, match="one frame per stream"):
            tiny_model.stream_step(torch.rand(1, 2, 3, 28, 28), None)
