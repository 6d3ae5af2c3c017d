"""SmoothAPLoss against a loop reference and pytorch-metric-learning 2.9 (value and gradient)."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
from conftest import loss_gradient
from pml_parity import pml_loss_fn, pml_value_and_grads

from keras_dml.losses import smooth_ap
from keras_dml.losses.smooth_ap import SmoothAPLoss, smooth_ap_loss


def sigmoid(t):
    return 1.0 / (1.0 + math.exp(-t))


def ref_smooth_ap(labels, x, temperature=0.01):
    """Loops: relaxed ranks among all and among the positives (anchor included)."""
    x = np.asarray(x, "float64")
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    n = len(labels)
    total = 0.0
    for i in range(n):
        positives = [j for j in range(n) if labels[j] == labels[i]]  # i itself included
        ap = 0.0
        for j in positives:
            rank_all = 1.0 + sum(
                sigmoid((s[i, k] - s[i, j]) / temperature) for k in range(n) if k != j
            )
            rank_pos = 1.0 + sum(
                sigmoid((s[i, k] - s[i, j]) / temperature) for k in positives if k != j
            )
            ap += rank_pos / rank_all
        total += 1.0 - ap / len(positives)
    return total / n


@pytest.mark.parametrize("temperature", [0.01, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_loop_reference_on_any_batch(seed, temperature):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=11)  # unequal, unsorted classes; singletons allowed
    x = rng.normal(size=(11, 5))
    got = float(smooth_ap_loss(labels, x, temperature=temperature))
    assert got == pytest.approx(ref_smooth_ap(labels, x, temperature), rel=1e-9)


def pml_value_and_grad(x, labels, **kwargs):
    from pytorch_metric_learning import losses

    value, (grad,) = pml_value_and_grads(pml_loss_fn(losses.SmoothAPLoss(**kwargs), labels), x)
    return value, grad


@pytest.mark.parametrize("temperature", [0.01, 0.1])
@pytest.mark.parametrize("seed", [0, 1])
def test_pml_parity_value_and_gradient(seed, temperature):
    pytest.importorskip("pytorch_metric_learning")
    # PML's grouping is right for contiguous classes with as many samples per class
    # as there are classes: 4 classes x 4 samples.
    labels = np.repeat(np.arange(4), 4)
    x = np.random.default_rng(seed).normal(size=(16, 6))
    loss = SmoothAPLoss(temperature=temperature, dtype="float64")
    value, grad = loss_gradient(lambda v: loss(labels, v), x)
    expected, expected_grad = pml_value_and_grad(x, labels, temperature=temperature)
    assert float(value) == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-10)


def test_differs_from_pml_on_purpose_where_pml_groups_wrongly():
    # 2 classes x 4 samples: PML reshapes the batch into 4 groups of 2 (its
    # `num_classes_batch` is the number of samples per class), so it scores pairs
    # of rows as classes; keras-dml uses the labels and matches the loop reference.
    pytest.importorskip("pytorch_metric_learning")
    labels = np.repeat(np.arange(2), 4)
    x = np.random.default_rng(0).normal(size=(8, 5))
    ours = float(smooth_ap_loss(labels, x, temperature=0.1))
    assert ours == pytest.approx(ref_smooth_ap(labels, x, 0.1), rel=1e-9)
    pml, _ = pml_value_and_grad(x, labels, temperature=0.1)
    pairs_as_classes = np.repeat(np.arange(4), 2)
    assert pml == pytest.approx(ref_smooth_ap(pairs_as_classes, x, 0.1), rel=1e-6)
    assert abs(pml - ours) > 1e-3


def test_gradient_is_finite_for_identical_embeddings():
    labels = np.array([0, 0, 1, 1])
    x = np.ones((4, 3))
    value, grad = loss_gradient(lambda v: smooth_ap_loss(labels, v), x)
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad))


def test_bad_arguments():
    for bad in (0.0, -1.0, "x"):
        with pytest.raises(ValueError, match="temperature"):
            SmoothAPLoss(temperature=bad)


def test_docstring_examples():
    assert doctest.testmod(smooth_ap, optionflags=doctest.ELLIPSIS).failed == 0
