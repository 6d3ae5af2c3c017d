"""NormalizedSoftmax head against a loop reference and PML 2.9's NormalizedSoftmaxLoss."""

from __future__ import annotations

import doctest
import math

import keras
import numpy as np
import pytest
from conftest import loss_gradient

from keras_dml.heads import NormalizedSoftmax, normalized_softmax

B, D, C = 10, 6, 5


def ref_logits(x, kernel, temperature):
    out = np.zeros((len(x), kernel.shape[1]))
    for i in range(len(x)):
        for j in range(kernel.shape[1]):
            w = kernel[:, j]
            out[i, j] = x[i] @ w / (np.linalg.norm(x[i]) * np.linalg.norm(w)) / temperature
    return out


def ref_cross_entropy(logits, labels):
    total = 0.0
    for row, y in zip(logits, labels, strict=True):
        top = max(row)
        total += top + math.log(sum(math.exp(v - top) for v in row)) - row[y]
    return total / len(labels)


def setup(seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(B, D)), rng.integers(0, C, size=B), rng.normal(size=(D, C))


def head_with(kernel, **kwargs):
    head = NormalizedSoftmax(C, dtype="float64", **kwargs)
    head.build((None, D))
    head.kernel.assign(kernel)
    return head


@pytest.mark.parametrize("seed", [0, 1])
def test_logits_match_reference_with_and_without_labels(seed):
    x, labels, kernel = setup(seed)
    head = head_with(kernel, temperature=0.1)
    expected = ref_logits(x, kernel, 0.1)
    np.testing.assert_allclose(np.asarray(head(x, labels)), expected, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(head(x)), expected, rtol=1e-10)


@pytest.mark.parametrize("temperature", [0.05, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_pml_parity_value_and_gradients(seed, temperature):
    torch = pytest.importorskip("torch")
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    x, labels, kernel = setup(seed)
    head = head_with(kernel, temperature=temperature)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    value, grad_x = loss_gradient(lambda v: ce(labels, head(v, labels)), x)
    pml = pml_losses.NormalizedSoftmaxLoss(C, D, temperature=temperature).double()
    with torch.no_grad():
        pml.W.copy_(torch.tensor(kernel))  # same (D, C) layout
    tx = torch.tensor(x, requires_grad=True)
    expected = pml(tx, torch.tensor(labels))
    expected.backward()
    assert float(value) == pytest.approx(expected.item(), rel=1e-5)
    assert float(value) == pytest.approx(ref_cross_entropy(ref_logits(x, kernel, temperature),
                                                           labels), rel=1e-9)
    np.testing.assert_allclose(grad_x, tx.grad.numpy(), rtol=1e-5, atol=1e-10)
    # The class weights' gradient too (both normalise W inside the forward pass).
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = ce(labels, head(x, labels))
    grad_w = tape.gradient(loss, head.kernel.value).numpy()
    np.testing.assert_allclose(grad_w, pml.W.grad.numpy(), rtol=1e-5, atol=1e-10)


def test_defaults_and_config():
    head = NormalizedSoftmax(C)
    assert head.temperature == 0.05
    clone = NormalizedSoftmax.from_config(head.get_config())
    assert clone.get_config() == head.get_config()
    with pytest.raises(ValueError, match="temperature"):
        NormalizedSoftmax(C, temperature=0.0)
    with pytest.raises(ValueError, match="num_classes"):
        NormalizedSoftmax(1)


def test_docstring_examples():
    assert doctest.testmod(normalized_softmax, optionflags=doctest.ELLIPSIS).failed == 0
