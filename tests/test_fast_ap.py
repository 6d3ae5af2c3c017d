"""FastAPLoss against a loop reference and pytorch-metric-learning 2.9 (value and gradient)."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from conftest import loss_gradient

from keras_dml.losses import fast_ap
from keras_dml.losses.fast_ap import FastAPLoss, fast_ap_loss


def ref_fast_ap(labels, x, num_bins=10):
    """Loops: soft histograms of normalised squared distances per anchor, 1 - FastAP."""
    x = np.asarray(x, "float64")
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(labels)
    width = 4.0 / num_bins
    centres = [4.0 * b / num_bins for b in range(num_bins + 1)]
    losses = []
    for i in range(n):
        positives = [j for j in range(n) if j != i and labels[j] == labels[i]]
        if not positives:
            continue
        h_pos = [0.0] * (num_bins + 1)
        h_all = [0.0] * (num_bins + 1)
        for j in range(n):
            if j == i:
                continue
            d = float(np.sum((x[i] - x[j]) ** 2))
            for b, c in enumerate(centres):
                vote = max(0.0, 1.0 - abs(d - c) / width)
                h_all[b] += vote
                if labels[j] == labels[i]:
                    h_pos[b] += vote
        total, cum_pos, cum_all = 0.0, 0.0, 0.0
        for b in range(num_bins + 1):
            cum_pos += h_pos[b]
            cum_all += h_all[b]
            if h_pos[b] * cum_pos > 0 and cum_all > 0:
                total += h_pos[b] * cum_pos / cum_all
        losses.append(1.0 - total / len(positives))
    return sum(losses) / len(losses) if losses else 0.0


def batch(seed, n=12, dim=5, classes=4):
    rng = np.random.default_rng(seed)
    return rng.integers(0, classes, size=n), rng.normal(size=(n, dim))


@pytest.mark.parametrize("num_bins", [10, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_loop_reference(seed, num_bins):
    labels, x = batch(seed)
    got = float(fast_ap_loss(labels, x, num_bins=num_bins))
    assert got == pytest.approx(ref_fast_ap(labels, x, num_bins), rel=1e-9)


def test_no_positive_pair_gives_zero_and_a_zero_gradient():
    labels = np.arange(6)
    x = np.random.default_rng(0).normal(size=(6, 3))
    value, grad = loss_gradient(lambda v: fast_ap_loss(labels, v), x)
    assert float(value) == 0.0 and np.all(grad == 0.0)


@pytest.mark.parametrize("num_bins", [10, 25])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pml_parity_value_and_gradient(seed, num_bins):
    torch = pytest.importorskip("torch")
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    labels, x = batch(seed, n=16, dim=6)
    loss = FastAPLoss(num_bins=num_bins, dtype="float64")
    value, grad = loss_gradient(lambda v: loss(labels, v), x)
    tx = torch.tensor(x, requires_grad=True)
    expected = pml_losses.FastAPLoss(num_bins=num_bins)(tx, torch.tensor(labels))
    expected.backward()
    assert float(value) == pytest.approx(expected.item(), rel=1e-5)
    np.testing.assert_allclose(grad, tx.grad.numpy(), rtol=1e-5, atol=1e-10)


def test_bad_arguments():
    for bad in (0, -3, 2.5, "10"):
        with pytest.raises(ValueError, match="num_bins"):
            FastAPLoss(num_bins=bad)


def test_docstring_examples():
    assert doctest.testmod(fast_ap, optionflags=doctest.ELLIPSIS).failed == 0
