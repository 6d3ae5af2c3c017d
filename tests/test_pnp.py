"""PNPLoss against a loop reference and pytorch-metric-learning 2.9 (value and gradient)."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
from conftest import loss_gradient

from keras_dml.losses import pnp
from keras_dml.losses.pnp import VARIANTS, PNPLoss, pnp_loss


def clipped_sigmoid(t, anneal):
    return 1.0 / (1.0 + math.exp(min(max(-t / anneal, -50.0), 50.0)))


def ref_pnp(labels, x, b=2.0, alpha=1.0, anneal=0.01, variant="O"):
    """Loops: negatives ranked above each positive (and the anchor), the variant's g, mean."""
    x = np.asarray(x, "float64")
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    n = len(labels)
    per_anchor = []
    for i in range(n):
        positives = [j for j in range(n) if j != i and labels[j] == labels[i]]
        if not positives:
            continue
        terms = []
        for j in [i, *positives]:
            r = sum(
                clipped_sigmoid(s[i, k] - s[i, j], anneal)
                for k in range(n)
                if labels[k] != labels[i]
            )
            g = {
                "O": r,
                "Ds": math.log(1 + r),
                "Dq": 1 / (1 + r) ** alpha,
                "Iu": (1 + r) * math.log(1 + r),
                "Ib": (b * r - math.log(1 + b * r)) / b**2,
            }[variant]
            terms.append(g)
        per_anchor.append(sum(terms) / len(terms))
    if not per_anchor:
        return 0.0
    loss = sum(per_anchor) / len(per_anchor)
    return 1.0 - loss if variant == "Dq" else loss


def batch(seed, n=12, dim=5, classes=4):
    rng = np.random.default_rng(seed)
    return rng.integers(0, classes, size=n), rng.normal(size=(n, dim))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_loop_reference(seed, variant):
    labels, x = batch(seed)
    kwargs = {"b": 3.0, "alpha": 2.0, "anneal": 0.05, "variant": variant}
    got = float(pnp_loss(labels, x, **kwargs))
    assert got == pytest.approx(ref_pnp(labels, x, **kwargs), rel=1e-9)


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_positive_pair_gives_zero(variant):
    labels = np.arange(5)
    x = np.random.default_rng(0).normal(size=(5, 3))
    value, grad = loss_gradient(lambda v: pnp_loss(labels, v, variant=variant), x)
    assert float(value) == 0.0 and np.all(grad == 0.0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_pml_parity_value_and_gradient(seed, variant):
    torch = pytest.importorskip("torch")
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    labels, x = batch(seed, n=16, dim=6)
    kwargs = {"b": 2.0, "alpha": 1.5, "anneal": 0.05, "variant": variant}
    loss = PNPLoss(dtype="float64", **kwargs)
    value, grad = loss_gradient(lambda v: loss(labels, v), x)
    tx = torch.tensor(x, requires_grad=True)
    expected = pml_losses.PNPLoss(**kwargs)(tx, torch.tensor(labels))
    expected.backward()
    assert float(value) == pytest.approx(expected.item(), rel=1e-5)
    np.testing.assert_allclose(grad, tx.grad.numpy(), rtol=1e-5, atol=1e-10)


def test_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        PNPLoss(variant="X")
    for arg in ("b", "alpha", "anneal"):
        with pytest.raises(ValueError, match=arg):
            PNPLoss(**{arg: 0.0})


def test_docstring_examples():
    assert doctest.testmod(pnp, optionflags=doctest.ELLIPSIS).failed == 0
