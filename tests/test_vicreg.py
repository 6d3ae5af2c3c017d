"""VICRegLoss against a loop reference and pytorch-metric-learning 2.9 (value and gradient)."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
from conftest import loss_gradient

from keras_dml.losses import vicreg
from keras_dml.losses.vicreg import VICRegLoss, vicreg_loss


def ref_vicreg(a, b, lam=25.0, mu=25.0, nu=1.0, eps=1e-4):
    """Loops over rows and dimensions, float64."""
    a, b = np.asarray(a, "float64"), np.asarray(b, "float64")
    n, d = a.shape
    invariance = sum((a[i, k] - b[i, k]) ** 2 for i in range(n) for k in range(d)) / (n * d)

    def variance(z):
        total = 0.0
        for k in range(d):
            mean = sum(z[i, k] for i in range(n)) / n
            var = sum((z[i, k] - mean) ** 2 for i in range(n)) / (n - 1)
            total += max(0.0, 1.0 - math.sqrt(var + eps))
        return total / d / 2.0

    def covariance(z):
        means = [sum(z[i, k] for i in range(n)) / n for k in range(d)]
        total = 0.0
        for k in range(d):
            for m in range(d):
                if k != m:
                    c = sum((z[i, k] - means[k]) * (z[i, m] - means[m]) for i in range(n))
                    total += (c / (n - 1)) ** 2
        return total / d

    return (
        lam * invariance
        + mu * (variance(a) + variance(b))
        + nu * (covariance(a) + covariance(b))
    )


def views(seed, n=8, dim=5, scale=0.3):
    rng = np.random.default_rng(seed)
    a = scale * rng.normal(size=(n, dim))
    return a, a + 0.1 * rng.normal(size=(n, dim))


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_loop_reference(seed):
    a, b = views(seed)
    kwargs = {"invariance_lambda": 3.0, "variance_mu": 7.0, "covariance_v": 2.0, "epsilon": 1e-3}
    got = float(vicreg_loss(a, b, **kwargs))
    assert got == pytest.approx(ref_vicreg(a, b, 3.0, 7.0, 2.0, 1e-3), rel=1e-9)


def test_class_takes_stacked_views_and_ignores_labels():
    a, b = views(0)
    y_pred = np.concatenate([a, b]).astype("float32")
    expected = ref_vicreg(a.astype("float32"), b.astype("float32"))
    for y_true in (np.zeros(8), np.arange(16)):
        assert float(VICRegLoss()(y_true, y_pred)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("scale", [0.3, 2.0])  # variance hinge active / inactive
def test_pml_parity_value_and_gradient(seed, scale):
    torch = pytest.importorskip("torch")
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    a, b = views(seed, n=10, dim=6, scale=scale)
    y_pred = np.concatenate([a, b])
    value, grad = loss_gradient(lambda v: VICRegLoss(dtype="float64")(np.zeros(10), v), y_pred)
    ta = torch.tensor(a, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    expected = pml_losses.VICRegLoss()(ta, ref_emb=tb)
    expected.backward()
    assert float(value) == pytest.approx(expected.item(), rel=1e-5)
    expected_grad = np.concatenate([ta.grad.numpy(), tb.grad.numpy()])
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-10)


def test_bad_inputs():
    a, b = views(0)
    with pytest.raises(ValueError, match="same shape"):
        vicreg_loss(a, b[:4])
    with pytest.raises(ValueError, match="at least 2"):
        vicreg_loss(a[:1], b[:1])
    with pytest.raises(ValueError, match="even"):
        VICRegLoss()(np.zeros(5), np.zeros((5, 3), "float32"))
    with pytest.raises(ValueError, match="at least 2 inputs"):
        VICRegLoss()(np.zeros(2), np.ones((2, 3), "float32"))
    bad = a.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="embeddings_a"):
        vicreg_loss(bad, b)
    with pytest.raises(ValueError, match="variance_mu"):
        VICRegLoss(variance_mu=-1.0)
    with pytest.raises(ValueError, match="epsilon"):
        VICRegLoss(epsilon=0.0)


def test_docstring_examples():
    assert doctest.testmod(vicreg, optionflags=doctest.ELLIPSIS).failed == 0
