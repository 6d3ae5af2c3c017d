"""HistogramLoss against a loop reference and pytorch-metric-learning 2.9 (value and gradient)."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
from conftest import loss_gradient

from keras_dml.losses import histogram
from keras_dml.losses.histogram import HistogramLoss, histogram_loss

# PML 2.9 indexes with a list of lists, which torch 2.x deprecates with a warning.
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")


def ref_histogram(labels, x, num_bins=100):
    """Loops: the pairs of the batch's triplets, linear-interpolation histograms, sum p- Phi+."""
    x = np.asarray(x, "float64")
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(labels)
    has_pos = [any(labels[j] == labels[i] for j in range(n) if j != i) for i in range(n)]
    has_neg = [any(labels[j] != labels[i] for j in range(n)) for i in range(n)]
    pos, neg = [], []
    for i in range(n):
        for j in range(i + 1, n):
            s = float(x[i] @ x[j])
            if labels[i] == labels[j] and has_neg[i]:
                pos.append(s)
            if labels[i] != labels[j] and (has_pos[i] or has_pos[j]):
                neg.append(s)
    if not pos or not neg:
        return 0.0
    width = 2.0 / num_bins

    def density(values):
        h = [0.0] * (num_bins + 1)
        for s in values:
            r = min(int(math.floor((s + 1) / width)), num_bins - 1)
            upper = (s + 1 - r * width) / width
            h[r] += 1 - upper
            h[r + 1] += upper
        return [v / len(values) for v in h]

    p_pos, p_neg = density(pos), density(neg)
    cumulative, total = 0.0, 0.0
    for r in range(num_bins + 1):
        cumulative += p_pos[r]
        total += p_neg[r] * cumulative
    return total


def batch(seed, n=12, dim=5, classes=4):
    rng = np.random.default_rng(seed)
    return rng.integers(0, classes, size=n), rng.normal(size=(n, dim))


@pytest.mark.parametrize("num_bins", [100, 7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_reference(seed, num_bins):
    labels, x = batch(seed)
    got = float(histogram_loss(labels, x, num_bins=num_bins))
    assert got == pytest.approx(ref_histogram(labels, x, num_bins), rel=1e-9)


def test_pairs_follow_the_triplets():
    # Class 2 has one sample: its negative pairs count only through the other
    # sample's positive; the values check the pair selection via the reference.
    labels = np.array([0, 0, 1, 1, 1, 2])
    x = np.random.default_rng(3).normal(size=(6, 4))
    assert float(histogram_loss(labels, x, 10)) == pytest.approx(
        ref_histogram(labels, x, 10), rel=1e-9
    )


@pytest.mark.parametrize("labels", [np.arange(5), np.zeros(5, "int32")])
def test_no_triplet_gives_zero(labels):
    x = np.random.default_rng(0).normal(size=(5, 3))
    value, grad = loss_gradient(lambda v: histogram_loss(labels, v), x)
    assert float(value) == 0.0 and np.all(grad == 0.0)


def test_identical_embeddings_count_in_the_last_bin():
    # A similarity of exactly 1 (PML raises an index error there).
    labels = np.array([0, 0, 1, 1])
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert float(histogram_loss(labels, x, 10)) == pytest.approx(
        ref_histogram(labels, x, 10), rel=1e-9
    )


@pytest.mark.parametrize("num_bins", [100, 10])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pml_parity_value_and_gradient(seed, num_bins):
    torch = pytest.importorskip("torch")
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    labels, x = batch(seed, n=16, dim=6)
    loss = HistogramLoss(num_bins=num_bins, dtype="float64")
    value, grad = loss_gradient(lambda v: loss(labels, v), x)
    tx = torch.tensor(x, requires_grad=True)
    expected = pml_losses.HistogramLoss(n_bins=num_bins)(tx, torch.tensor(labels))
    expected.backward()
    assert float(value) == pytest.approx(expected.item(), rel=1e-5)
    # PML's float64 gradient is off the finite-difference one by up to ~1e-7
    # (ours by ~1e-9, see the next test): compared relative to the largest entry.
    expected_grad = tx.grad.numpy()
    np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=1e-5 * np.abs(expected_grad).max())


def test_gradient_matches_finite_differences():
    labels, x = batch(0, n=16, dim=6)
    _, grad = loss_gradient(lambda v: histogram_loss(labels, v), x)
    step = 1e-7
    for i, k in [(0, 0), (3, 2), (7, 5), (15, 1)]:
        plus, minus = x.copy(), x.copy()
        plus[i, k] += step
        minus[i, k] -= step
        numeric = (float(histogram_loss(labels, plus)) - float(histogram_loss(labels, minus))) / (
            2 * step
        )
        assert grad[i, k] == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_bad_arguments():
    for bad in (0, 1.5, None):
        with pytest.raises(ValueError, match="num_bins"):
            HistogramLoss(num_bins=bad)


def test_docstring_examples():
    assert doctest.testmod(histogram, optionflags=doctest.ELLIPSIS).failed == 0
