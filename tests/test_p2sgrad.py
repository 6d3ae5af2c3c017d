"""P2SGrad head and P2SGradLoss against a loop reference and PML 2.9's P2SGradLoss."""

from __future__ import annotations

import doctest

import keras
import numpy as np
import pytest
from conftest import loss_gradient

from keras_dml.heads import P2SGrad, P2SGradLoss, p2sgrad
from keras_dml.models import MarginModel

B, D, C = 10, 6, 5


def ref_loss(x, kernel, labels):
    """Loops: mean over samples and classes of (cos θ_ij - [j = y_i])^2."""
    total = 0.0
    for i in range(len(x)):
        for j in range(kernel.shape[1]):
            w = kernel[:, j]
            cosine = x[i] @ w / (np.linalg.norm(x[i]) * np.linalg.norm(w))
            total += (cosine - (1.0 if j == labels[i] else 0.0)) ** 2
    return total / (len(x) * kernel.shape[1])


def setup(seed):
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(D, C))
    kernel /= np.linalg.norm(kernel, axis=0, keepdims=True)  # PML keeps unit columns
    return rng.normal(size=(B, D)), rng.integers(0, C, size=B), kernel


def head_with(kernel):
    head = P2SGrad(C, dtype="float64")
    head.build((None, D))
    head.kernel.assign(kernel)
    return head


@pytest.mark.parametrize("seed", [0, 1])
def test_loss_matches_reference(seed):
    x, labels, kernel = setup(seed)
    head = head_with(2.0 * kernel)  # the head normalises the columns itself
    loss = P2SGradLoss(dtype="float64")
    assert float(loss(labels, head(x, labels))) == pytest.approx(
        ref_loss(x, kernel, labels), rel=1e-9
    )
    np.testing.assert_allclose(np.asarray(head(x)), np.asarray(head(x, labels)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pml_parity_value_and_gradients(seed):
    torch = pytest.importorskip("torch")
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    x, labels, kernel = setup(seed)
    head = head_with(kernel)
    loss = P2SGradLoss(dtype="float64")
    value, grad_x = loss_gradient(lambda v: loss(labels, head(v, labels)), x)
    pml = pml_losses.P2SGradLoss(D, C).double()
    with torch.no_grad():
        pml.weight.copy_(torch.tensor(kernel))  # same (D, C) layout, unit columns
    tx = torch.tensor(x, requires_grad=True)
    expected = pml(tx, torch.tensor(labels))
    expected.backward()
    assert float(value) == pytest.approx(expected.item(), rel=1e-5)
    np.testing.assert_allclose(grad_x, tx.grad.numpy(), rtol=1e-5, atol=1e-10)
    # On purpose: PML renormalises W in place outside the graph, the head inside it,
    # so the head's weight gradient is PML's projected on each column's tangent plane.
    import tensorflow as tf

    with tf.GradientTape() as tape:
        value = loss(labels, head(x, labels))
    grad_w = tape.gradient(value, head.kernel.value).numpy()
    pml_grad_w = pml.weight.grad.numpy()
    projected = pml_grad_w - kernel * np.sum(kernel * pml_grad_w, axis=0, keepdims=True)
    np.testing.assert_allclose(grad_w, projected, rtol=1e-5, atol=1e-10)
    assert not np.allclose(grad_w, pml_grad_w, rtol=1e-3)


def test_margin_model_uses_the_default_loss_and_fits():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8)).astype("float32")
    labels = rng.integers(0, C, size=32)
    model = MarginModel(keras.Sequential([keras.Input((8,)), keras.layers.Dense(D)]), P2SGrad(C))
    model.compile(optimizer="adam")
    history = model.fit(x, labels, batch_size=16, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert history.history["loss"][-1] <= history.history["loss"][0] + 1e-6


def test_config():
    head = P2SGrad(C)
    assert P2SGrad.from_config(head.get_config()).get_config() == head.get_config()
    loss = P2SGradLoss()
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is P2SGradLoss and restored.get_config() == loss.get_config()


def test_docstring_examples():
    assert doctest.testmod(p2sgrad, optionflags=doctest.ELLIPSIS).failed == 0
