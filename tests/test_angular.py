"""AngularLoss against a NumPy loop reference and pytorch-metric-learning 2.9."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pml_parity import (
    BATCH_IDS,
    BATCHES,
    assert_same,
    keras_value_and_grads,
    other_references,
    pairs,
    pml_loss_fn,
    pml_value_and_grads,
    unit,
)

from keras_dml.losses.angular import AngularLoss, angular_loss


def ref_angular(labels, x, alpha=40.0, ref_labels=None, ref_x=None):
    """Per positive pair: log(1 + sum_n exp(4t (a+p).n - 2(1+t) a.p)), all unit; mean over pairs."""
    refs = x if ref_x is None else ref_x
    positives, negatives = pairs(labels, ref_labels)
    t = math.tan(math.radians(alpha)) ** 2
    losses = []
    for a in range(len(labels)):
        xa = unit(x[a])
        for p in positives[a]:
            xp = unit(refs[p])
            terms = [4 * t * float(np.dot(xa + xp, unit(refs[n]))) - 2 * (1 + t) * float(
                np.dot(xa, xp)) for n in negatives[a]]
            losses.append(math.log1p(sum(math.exp(v) for v in terms)))
    return sum(losses) / len(losses) if losses else 0.0


@pytest.mark.parametrize("case", BATCHES, ids=BATCH_IDS)
@pytest.mark.parametrize("alpha", [40.0, 55.0, 30.0])
def test_matches_numpy_reference(case, alpha):
    _, labels, x = case
    loss = AngularLoss(alpha=alpha, dtype="float64")
    assert_same(float(loss(labels, x)), ref_angular(labels, x, alpha))


@pytest.mark.parametrize("case", BATCHES, ids=BATCH_IDS)
def test_matches_pml_on_unit_inputs(case):
    # The one difference: PML uses the negatives as given, here they are normalised too.
    # With PML fed L2-normalised embeddings (inside the torch graph) both agree, gradients too.
    from pytorch_metric_learning import losses as pml_losses

    _, labels, x = case
    want, (want_grad,) = pml_value_and_grads(
        pml_loss_fn(pml_losses.AngularLoss(), labels, normalize=True), x
    )
    loss = AngularLoss(dtype="float64")
    got, (grad,) = keras_value_and_grads(lambda v: loss(labels, v), x)
    assert_same(got, want)
    assert_same(grad, want_grad)


def test_differs_from_pml_on_raw_negatives():
    from pytorch_metric_learning import losses as pml_losses

    _, labels, x = BATCHES[0]
    raw, _ = pml_value_and_grads(pml_loss_fn(pml_losses.AngularLoss(), labels), 3.0 * x)
    got = float(AngularLoss(dtype="float64")(labels, 3.0 * x))
    assert_same(got, ref_angular(labels, x))  # scale-free here
    assert abs(raw - got) > 1e-3  # PML's value depends on the negatives' norm


def test_references_match_reference_and_pml():
    from pytorch_metric_learning import losses as pml_losses

    _, labels, x = BATCHES[0]
    ref_labels, ref_x, references = other_references(np.random.default_rng(1))
    labels = labels.astype("int32")
    got, (grad,) = keras_value_and_grads(
        lambda v: angular_loss(labels, v, references=references), x
    )
    assert_same(got, ref_angular(labels, x, ref_labels=ref_labels, ref_x=ref_x))
    want, (want_grad,) = pml_value_and_grads(
        pml_loss_fn(pml_losses.AngularLoss(), labels, ref_labels, ref_x, normalize=True), x
    )
    assert_same(got, want)
    assert_same(grad, want_grad)


def test_no_positive_pair_gives_zero():
    x = np.random.default_rng(3).normal(size=(5, 4)).astype("float32")
    assert float(AngularLoss()(np.arange(5), x)) == 0.0


def test_bad_options():
    for alpha in (0.0, 90.0, -5.0):
        with pytest.raises(ValueError, match="alpha"):
            AngularLoss(alpha=alpha)
