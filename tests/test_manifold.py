"""Manifold head and ManifoldLoss against a loop reference and PML 2.9's ManifoldLoss."""

from __future__ import annotations

import doctest
import math

import keras
import numpy as np
import pytest
from conftest import loss_gradient

from keras_dml.heads import Manifold, ManifoldLoss, manifold
from keras_dml.models import MarginModel

B, D, K = 10, 6, 4


def ref_manifold_loss(x, proxies, meta, alpha=0.8, lambda_c=1.0, margin=5e-4):
    """Loops (and one NumPy inverse): the random-walk manifold, then the two hinge terms."""
    nodes = np.concatenate([x, proxies]).astype("float64")
    nodes = nodes / np.linalg.norm(nodes, axis=1, keepdims=True)
    n = len(nodes)
    a = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                a[i, j] = math.exp(max(float(nodes[i] @ nodes[j]), 0.0) / 0.5)
    degree = a.sum(axis=1)
    s = np.array([[a[i, j] / math.sqrt(degree[i] * degree[j]) for j in range(n)]
                  for i in range(n)])
    m = (1 - alpha) * np.linalg.inv(np.eye(n) - alpha * s)
    b = len(x)

    def term(scores, y):
        total = 0.0
        for k, value in enumerate(scores):
            v = value - scores[y] + margin
            if k != y and v >= 0:
                total += math.exp(v)
        return math.log(1 + total)

    intrinsic = [term(m[i, b:], meta[i]) for i in range(b)]
    context = []
    for i in range(b):
        cos = [m[i] @ m[b + k] / (np.linalg.norm(m[i]) * np.linalg.norm(m[b + k]))
               for k in range(len(proxies))]
        context.append(term(cos, meta[i]))
    return float(np.mean(intrinsic) + lambda_c * np.mean(context))


def setup(seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(B, D)), rng.permutation(np.arange(B) % K), rng.normal(size=(K, D))


def head_with(proxies, **kwargs):
    head = Manifold(K, dtype="float64", **kwargs)
    head.build((None, D))
    head.kernel.assign(proxies.T)  # PML's proxies are (K, D); the kernel is (D, K)
    return head


@pytest.mark.parametrize(("alpha", "lambda_c", "margin"), [(0.8, 1.0, 5e-4), (0.5, 0.3, 0.01)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_loop_reference(seed, alpha, lambda_c, margin):
    x, meta, proxies = setup(seed)
    head = head_with(proxies, alpha=alpha, lambda_c=lambda_c, margin=margin)
    loss = head.default_loss()
    got = float(ManifoldLoss.from_config({**loss.get_config(), "dtype": "float64"})(
        meta, head(x, meta)))
    assert got == pytest.approx(
        ref_manifold_loss(x, proxies, meta, alpha, lambda_c, margin), rel=1e-9
    )


@pytest.mark.parametrize(("alpha", "lambda_c", "margin"), [(0.8, 1.0, 5e-4), (0.5, 0.3, 0.01)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pml_parity_value_and_gradient(seed, alpha, lambda_c, margin):
    torch = pytest.importorskip("torch")
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    x, meta, proxies = setup(seed)
    head = head_with(proxies, alpha=alpha, lambda_c=lambda_c, margin=margin)
    loss = ManifoldLoss(lambda_c=lambda_c, margin=margin, dtype="float64")
    value, grad = loss_gradient(lambda v: loss(meta, head(v, meta)), x)
    pml = pml_losses.ManifoldLoss(l=D, K=K, lambdaC=lambda_c, alpha=alpha, margin=margin).double()
    with torch.no_grad():
        pml.proxies.copy_(torch.tensor(proxies))
    tx = torch.tensor(x, requires_grad=True)
    expected = pml(tx, indices_tuple=torch.tensor(meta))  # the meta-classes, given
    expected.backward()
    assert float(value) == pytest.approx(expected.item(), rel=1e-5)
    # PML inverts the matrix in float32 (for half-precision support), so its float64
    # gradient carries float32 rounding: compared relative to the largest entry.
    expected_grad = tx.grad.numpy()
    np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=1e-5 * np.abs(expected_grad).max())


def test_margin_model_fits_with_the_default_loss():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8)).astype("float32")
    meta = rng.integers(0, K, size=32)
    model = MarginModel(keras.Sequential([keras.Input((8,)), keras.layers.Dense(D)]), Manifold(K))
    model.compile(optimizer="adam")
    history = model.fit(x, meta, batch_size=16, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_config_and_bad_arguments():
    head = Manifold(K, alpha=0.5)
    clone = Manifold.from_config(head.get_config())
    assert clone.get_config() == head.get_config() and clone.num_proxies == K
    loss = head.default_loss()
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is ManifoldLoss and restored.get_config() == loss.get_config()
    for bad in (0.0, 1.0, "x"):
        with pytest.raises(ValueError, match="alpha"):
            Manifold(K, alpha=bad)
    for bad in (-1.0, float("inf")):
        with pytest.raises(ValueError, match="lambda_c"):
            Manifold(K, lambda_c=bad)
    with pytest.raises(ValueError, match="labels"):
        Manifold(K)(np.ones((4, D), "float32"), np.array([0, 1, 2, K]))


def test_docstring_examples():
    assert doctest.testmod(manifold, optionflags=doctest.ELLIPSIS).failed == 0
