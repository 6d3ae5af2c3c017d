"""TupletMarginLoss against a NumPy loop reference and pytorch-metric-learning 2.9."""

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
    pair_value,
    pairs,
    pml_loss_fn,
    pml_value_and_grads,
)

from keras_dml.losses.tuplet_margin import TupletMarginLoss, tuplet_margin_loss


def ref_tuplet(labels, x, margin=5.73, scale=64.0, ref_labels=None, ref_x=None):
    """Per positive pair: log(1 + sum_n exp(s (cos_an - cos(theta_ap - m)))); mean over pairs."""
    refs = x if ref_x is None else ref_x
    positives, negatives = pairs(labels, ref_labels)
    m = math.radians(margin)
    losses = []
    for a in range(len(labels)):
        for p in positives[a]:
            shifted = math.cos(math.acos(pair_value(x[a], refs[p], "cosine")) - m)
            terms = [scale * (pair_value(x[a], refs[n], "cosine") - shifted) for n in negatives[a]]
            losses.append(math.log1p(sum(math.exp(t) for t in terms)))
    return sum(losses) / len(losses) if losses else 0.0


@pytest.mark.parametrize("case", BATCHES, ids=BATCH_IDS)
@pytest.mark.parametrize("margin,scale", [(5.73, 64.0), (10.0, 16.0)])
def test_matches_numpy_reference(case, margin, scale):
    _, labels, x = case
    loss = TupletMarginLoss(margin=margin, scale=scale, dtype="float64")
    assert_same(float(loss(labels, x)), ref_tuplet(labels, x, margin, scale))


@pytest.mark.parametrize("case", BATCHES, ids=BATCH_IDS)
def test_matches_pml_value_and_gradient(case):
    from pytorch_metric_learning import losses as pml_losses

    _, labels, x = case
    want, (want_grad,) = pml_value_and_grads(pml_loss_fn(pml_losses.TupletMarginLoss(), labels), x)
    loss = TupletMarginLoss(dtype="float64")
    got, (grad,) = keras_value_and_grads(lambda v: loss(labels, v), x)
    assert_same(got, want)
    assert_same(grad, want_grad)


def test_references_match_reference_and_pml():
    from pytorch_metric_learning import losses as pml_losses

    _, labels, x = BATCHES[0]
    ref_labels, ref_x, references = other_references(np.random.default_rng(1))
    labels = labels.astype("int32")
    got, (grad,) = keras_value_and_grads(
        lambda v: tuplet_margin_loss(labels, v, scale=16.0, references=references), x
    )
    assert_same(got, ref_tuplet(labels, x, scale=16.0, ref_labels=ref_labels, ref_x=ref_x))
    want, (want_grad,) = pml_value_and_grads(
        pml_loss_fn(pml_losses.TupletMarginLoss(scale=16.0), labels, ref_labels, ref_x), x
    )
    assert_same(got, want)
    assert_same(grad, want_grad)


def test_identical_positive_pair_has_finite_gradient():
    # theta = 0: PML's acos has an infinite slope there; the loss here stays finite.
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], "float64")
    labels = np.array([0, 0, 1], "int32")
    value, (grad,) = keras_value_and_grads(lambda v: tuplet_margin_loss(labels, v), x)
    assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_no_positive_pair_gives_zero():
    x = np.random.default_rng(3).normal(size=(5, 4)).astype("float32")
    assert float(TupletMarginLoss()(np.arange(5), x)) == 0.0


def test_bad_options():
    with pytest.raises(ValueError, match="margin"):
        TupletMarginLoss(margin=-1.0)
    with pytest.raises(ValueError, match="scale"):
        TupletMarginLoss(scale=0.0)
