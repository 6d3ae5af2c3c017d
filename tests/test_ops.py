"""Shared safe reductions in keras_dml.ops, against naive loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import loss_gradient

from keras_dml import ops as dml_ops


def test_masked_log_softmax_matches_loop_and_ignores_masked_entries():
    rng = np.random.default_rng(0)
    values = (10.0 * rng.normal(size=(4, 5))).astype("float32")
    mask = rng.random(size=(4, 5)) < 0.6
    mask[0] = False  # an empty row
    got = np.asarray(dml_ops.masked_log_softmax(values, mask, axis=1))
    assert np.all(np.isfinite(got))
    for i in range(4):
        kept = [float(values[i, j]) for j in range(5) if mask[i, j]]
        if not kept:
            continue
        top = max(kept)
        log_total = top + math.log(sum(math.exp(v - top) for v in kept))
        for j in range(5):
            if mask[i, j]:
                want = float(values[i, j]) - log_total
                np.testing.assert_allclose(got[i, j], want, rtol=1e-5, atol=1e-5)
    # A masked-out entry changes nothing in the selected ones.
    changed = values.copy()
    changed[~mask] = 1e4
    again = np.asarray(dml_ops.masked_log_softmax(changed, mask, axis=1))
    np.testing.assert_allclose(again[mask], got[mask], rtol=1e-6)


def test_masked_log_softmax_gradient_is_finite_for_empty_rows():
    mask = np.array([[True, True, False], [False, False, False]])
    values = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], "float32")
    value, grad = loss_gradient(
        lambda v: dml_ops.masked_sum(dml_ops.masked_log_softmax(v, mask, axis=1), mask), values
    )
    assert np.isfinite(value)
    np.testing.assert_array_equal(grad[1], 0.0)
    np.testing.assert_array_equal(grad[0, 2], 0.0)
    # d/dv_k sum_j log p_j over two kept entries = 1 - 2 p_k.
    p = np.exp([1.0, 2.0]) / np.exp([1.0, 2.0]).sum()
    np.testing.assert_allclose(grad[0, :2], 1.0 - 2.0 * p, rtol=1e-5)


def _searchsorted_case(seed, dtype="float32"):
    """Rows with ties, negative values, signed zeros and repeated query values."""
    rng = np.random.default_rng(seed)
    pool = np.array([-2.5, -1.0, -0.0, 0.0, 1e-30, 0.25, 0.25, 1.0, 3.0], dtype=dtype)
    rows = np.sort(rng.choice(pool, size=(6, 9)), axis=1)
    values = rng.choice(np.concatenate([pool, [-5.0, 0.5, 7.0]]).astype(dtype), size=(6, 11))
    return rows, values


def _numpy_searchsorted(rows, values, side):
    return np.stack([np.searchsorted(r, v, side=side) for r, v in zip(rows, values, strict=True)])


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_searchsorted_matches_numpy_row_by_row(side):
    for seed in range(5):
        rows, values = _searchsorted_case(seed)
        got = np.asarray(dml_ops.batched_searchsorted(rows, values, side=side))
        np.testing.assert_array_equal(got, _numpy_searchsorted(rows, values, side))


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_masked_batched_searchsorted_matches_numpy_under_the_mask(side, dtype):
    for seed in range(5):
        rows, values = _searchsorted_case(seed, dtype)
        mask = np.random.default_rng(seed + 100).random(values.shape) < 0.4
        mask[2] = False  # a row with no query
        got = np.asarray(dml_ops.masked_batched_searchsorted(rows, values, mask, side=side))
        want = np.where(mask, _numpy_searchsorted(rows, values, side), 0)
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.int32


def test_masked_batched_searchsorted_rejects_a_bad_side():
    rows, values = _searchsorted_case(0)
    with pytest.raises(ValueError, match="side"):
        dml_ops.masked_batched_searchsorted(rows, values, values > 0, side="middle")
