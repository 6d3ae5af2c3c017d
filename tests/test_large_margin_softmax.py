"""LargeMarginSoftmax head against a loop reference and PML 2.9's LargeMarginSoftmaxLoss."""

from __future__ import annotations

import doctest
import math

import keras
import numpy as np
import pytest
from conftest import loss_gradient

from keras_dml.heads import LargeMarginSoftmax, large_margin_softmax

B, D, C = 10, 6, 5


def ref_logits(x, kernel, labels, margin, scale):
    """Loops: |x| |W_j| cos θ_j, the target's cos replaced by (-1)^k cos(mθ) - 2k."""
    out = np.zeros((len(x), kernel.shape[1]))
    for i in range(len(x)):
        for j in range(kernel.shape[1]):
            w = kernel[:, j]
            norms = np.linalg.norm(x[i]) * np.linalg.norm(w)
            cosine = min(max(x[i] @ w / norms, -1.0), 1.0)
            if labels is not None and j == labels[i]:
                theta = math.acos(cosine)
                k = math.floor(theta / (math.pi / margin))
                cosine = (-1) ** k * math.cos(margin * theta) - 2 * k
            out[i, j] = scale * norms * cosine
    return out


def setup(seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(B, D)), rng.integers(0, C, size=B), rng.normal(size=(D, C))


def head_with(kernel, **kwargs):
    head = LargeMarginSoftmax(C, dtype="float64", **kwargs)
    head.build((None, D))
    head.kernel.assign(kernel)
    return head


@pytest.mark.parametrize("margin", [1, 2, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_logits_match_reference(seed, margin):
    x, labels, kernel = setup(seed)
    head = head_with(kernel, margin=margin, scale=1.5)
    np.testing.assert_allclose(
        np.asarray(head(x, labels)), ref_logits(x, kernel, labels, margin, 1.5), rtol=1e-9
    )
    np.testing.assert_allclose(
        np.asarray(head(x)), ref_logits(x, kernel, None, margin, 1.5), rtol=1e-9
    )


@pytest.mark.parametrize(("margin", "scale"), [(4, 1.0), (2, 0.5), (3, 2.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_pml_parity_value_and_gradients(seed, margin, scale):
    torch = pytest.importorskip("torch")
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    x, labels, kernel = setup(seed)
    x = 0.3 * x  # moderate logits: the softmax is not saturated
    head = head_with(kernel, margin=margin, scale=scale)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    value, grad_x = loss_gradient(lambda v: ce(labels, head(v, labels)), x)
    pml = pml_losses.LargeMarginSoftmaxLoss(C, D, margin=margin, scale=scale).double()
    with torch.no_grad():
        pml.W.copy_(torch.tensor(kernel))  # same (D, C) layout, unnormalised
    tx = torch.tensor(x, requires_grad=True)
    expected = pml(tx, torch.tensor(labels))
    expected.backward()
    assert float(value) == pytest.approx(expected.item(), rel=1e-5)
    np.testing.assert_allclose(grad_x, tx.grad.numpy(), rtol=1e-5, atol=1e-10)
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = ce(labels, head(x, labels))
    grad_w = tape.gradient(loss, head.kernel.value).numpy()
    np.testing.assert_allclose(grad_w, pml.W.grad.numpy(), rtol=1e-5, atol=1e-10)


def test_margin_one_is_a_plain_linear_classifier():
    x, labels, kernel = setup(0)
    head = head_with(kernel, margin=1)
    np.testing.assert_allclose(np.asarray(head(x, labels)), x @ kernel, rtol=1e-9)


def test_finite_gradients_at_cos_plus_minus_one_and_zero_embedding():
    kernel = np.array([[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]])
    head = LargeMarginSoftmax(3, dtype="float64")
    head.build((None, 2))
    head.kernel.assign(kernel)
    x = np.array([[2.0, 0.0], [-3.0, 0.0], [0.0, 0.0]])
    labels = np.array([0, 0, 1])
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    value, grad = loss_gradient(lambda v: ce(labels, head(v, labels)), x)
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad))


def test_config_and_bad_arguments():
    head = LargeMarginSoftmax(C)
    assert (head.margin, head.scale) == (4, 1.0)
    assert LargeMarginSoftmax.from_config(head.get_config()).get_config() == head.get_config()
    for bad in (0, 2.5, "4"):
        with pytest.raises(ValueError, match="margin"):
            LargeMarginSoftmax(C, margin=bad)
    with pytest.raises(ValueError, match="scale"):
        LargeMarginSoftmax(C, scale=0.0)


def test_docstring_examples():
    assert doctest.testmod(large_margin_softmax, optionflags=doctest.ELLIPSIS).failed == 0
