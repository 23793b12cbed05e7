"""The PCA colour map: known token structures map to the colours they must, on the right cells."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featstore.report.pca import fit_basis, infer_grid, to_rgb, token_maps


def _two_halves(h: int, w: int, split: int, c: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal(c), rng.standard_normal(c)
    grid = np.empty((h, w, c), dtype=np.float32)
    grid[:, :split], grid[:, split:] = a, b
    return grid


@pytest.mark.parametrize("h,w,split", [(6, 10, 5), (7, 9, 3), (28, 37, 20)])
def test_left_and_right_halves_get_two_colours_split_at_the_column(h, w, split):
    maps = token_maps(torch.from_numpy(_two_halves(h, w, split).reshape(1, h * w, -1)), (h, w))
    rgb = to_rgb(maps, fit_basis([maps]))[0]
    assert rgb.shape == (h, w, 3) and rgb.dtype == np.uint8
    left, right = rgb[:, :split].reshape(-1, 3), rgb[:, split:].reshape(-1, 3)
    assert (left == left[0]).all() and (right == right[0]).all()  # one colour per half
    assert not (left[0] == right[0]).all()
    # The halves differ along one direction only: the first component spans its whole range, the others are flat.
    assert sorted([int(left[0][0]), int(right[0][0])]) == [0, 255]
    assert (rgb[..., 1:] == rgb[0, 0, 1:]).all()


def test_one_basis_for_all_records_makes_colours_comparable():
    c = 16
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(c), rng.standard_normal(c)
    first, second = np.tile(a, (1, 4, 5, 1)), np.tile(b, (1, 4, 5, 1))
    basis = fit_basis([first, second])
    ra, rb = to_rgb(first, basis), to_rgb(second, basis)
    assert (ra == ra[0, 0, 0]).all() and (rb == rb[0, 0, 0]).all()
    assert not (ra[0, 0, 0] == rb[0, 0, 0]).all()  # each record alone would be one flat grey
    alone = to_rgb(first, fit_basis([first]))
    assert (alone == 128).all()


def test_colours_are_repeatable_and_non_finite_tokens_black():
    x = np.random.default_rng(2).standard_normal((1, 5, 6, 24)).astype(np.float32)
    x[0, 2, 3, 7] = np.nan
    one, two = to_rgb(x, fit_basis([x])), to_rgb(x.copy(), fit_basis([x.copy()]))
    assert (one == two).all()
    assert (one[0, 2, 3] == 0).all() and one.reshape(-1, 3).std(axis=0).min() > 0


def test_token_maps_take_the_last_grid_tokens_and_refuse_too_few():
    patch = torch.arange(12 * 3, dtype=torch.float32).reshape(1, 12, 3)
    extra = torch.cat([torch.full((1, 5, 3), -1.0), patch], dim=1)  # camera + register tokens first
    assert np.array_equal(token_maps(extra, (3, 4)), patch.numpy().reshape(1, 3, 4, 3))
    assert token_maps(patch[0], (3, 4)).shape == (1, 3, 4, 3)
    with pytest.raises(ValueError, match="cannot fill"):
        token_maps(patch, (4, 4))


def test_infer_grid_from_token_count_and_aspect():
    assert infer_grid(28 * 37, 518 / 392) == (28, 37)
    assert infer_grid(28 * 37, 392 / 518) == (37, 28)
    assert infer_grid(37 * 37, 1.0) == (37, 37)
