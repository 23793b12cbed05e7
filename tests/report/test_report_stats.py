"""Every statistic the report plots, against numpy computed independently; the record choice is seeded."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from featstore.formats.record import Record, decode_record, encode_record
from featstore.report.select import choose_records, stats_records
from featstore.report.stats import ChannelMoments, codec_bound, record_stats, summary


def _features(seed: int, tokens: int = 50, channels: int = 12, nan: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(0.5, 2.0, (1, tokens, channels)).astype(np.float32)
    flat = x.reshape(-1)
    flat[np.random.default_rng(seed + 100).choice(flat.size, nan, replace=False)] = np.nan
    if nan:
        flat[0] = np.inf
    return x


@pytest.mark.parametrize("nan", [0, 7])
def test_record_stats_match_numpy(nan):
    x = _features(0, nan=nan)
    got = record_stats("k", torch.from_numpy(x))
    tokens = x[0].astype(np.float64)
    ok = np.isfinite(tokens).all(axis=1)
    norms = np.linalg.norm(tokens[ok], axis=1)
    assert got.tokens == 50
    assert got.norm_mean == pytest.approx(norms.mean(), rel=1e-12)
    assert got.norm_max == pytest.approx(norms.max(), rel=1e-12)
    assert got.nonfinite_fraction == pytest.approx((~np.isfinite(x)).mean(), abs=0)
    assert (got.nonfinite_fraction > 0) == (nan > 0)


def test_record_stats_of_bfloat16_features():
    x = torch.randn(1, 40, 8).to(torch.bfloat16)
    got = record_stats("k", x)
    assert got.norm_max == pytest.approx(float(np.linalg.norm(x.float().numpy()[0], axis=1).max()), rel=1e-6)


def test_channel_moments_over_records_match_numpy():
    records = [_features(s, tokens=20 + s, nan=3 * s) for s in range(4)]
    m = ChannelMoments()
    for r in records:
        assert m.add(torch.from_numpy(r))
    allx = np.concatenate([r[0] for r in records]).astype(np.float64)
    allx[~np.isfinite(allx)] = np.nan
    np.testing.assert_allclose(m.mean(), np.nanmean(allx, axis=0), rtol=1e-10)
    np.testing.assert_allclose(m.std(), np.nanstd(allx, axis=0), rtol=1e-8)
    assert not m.add(torch.zeros(1, 3, 5)) and m.shapes_skipped == 1


def test_stored_int8_bound_is_the_error_numpy_measures():
    x = torch.from_numpy(_features(3, tokens=64, channels=32))
    rec = decode_record(encode_record(Record("k", "p", {"features": x}), codec="int8"))
    bound = codec_bound("k", rec.bounds)
    assert bound is not None and bound.codec == "int8"
    orig, back = x.numpy().astype(np.float64), rec.features.numpy().astype(np.float64)
    assert bound.rel_l2 == pytest.approx(np.linalg.norm(back - orig) / np.linalg.norm(orig), rel=1e-4)
    assert bound.max_abs == pytest.approx(np.abs(back - orig).max(), rel=1e-4)
    lossless = decode_record(encode_record(Record("k", "p", {"features": x}), codec="zstd"))
    assert codec_bound("k", lossless.bounds) is None


def test_summary_matches_numpy_and_skips_non_finite():
    v = [3.0, 1.0, float("nan"), 10.0, 2.0]
    finite = np.array([3.0, 1.0, 10.0, 2.0])
    assert summary(v) == {"min": 1.0, "median": float(np.median(finite)), "mean": float(finite.mean()), "max": 10.0}
    assert summary([math.inf]) == {}


def test_record_choice_is_seeded_sorted_and_bounded():
    keys = [f"k{i:03d}" for i in range(100)]
    a, b = choose_records(keys[::-1], 8, seed=5), choose_records(keys, 8, seed=5)
    assert a == b == sorted(a) and len(set(a)) == 8 and set(a) <= set(keys)
    assert choose_records(keys, 8, seed=6) != a
    assert choose_records(keys[:3], 8, seed=0) == keys[:3]
    sample, sampled = stats_records(keys, seed=0, limit=10)
    assert len(sample) == 10 and sampled
    assert stats_records(keys, seed=0, limit=500) == (keys, False)
