"""ThresholdConsistentMarginLoss against a NumPy loop reference and pytorch-metric-learning 2.9."""

from __future__ import annotations

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

from keras_dml.losses.threshold_consistent_margin import (
    ThresholdConsistentMarginLoss,
    threshold_consistent_margin_loss,
)


def ref_tcm(labels, x, lambda_plus=1.0, lambda_minus=1.0, margin_plus=0.9, margin_minus=0.5,
            ref_labels=None, ref_x=None):
    """Mean violation of the positive pairs below m+ and of the negative pairs above m-."""
    refs = x if ref_x is None else ref_x
    positives, negatives = pairs(labels, ref_labels)
    pos = [pair_value(x[i], refs[j], "cosine") for i in range(len(labels)) for j in positives[i]]
    neg = [pair_value(x[i], refs[j], "cosine") for i in range(len(labels)) for j in negatives[i]]
    pos = [margin_plus - s for s in pos if s <= margin_plus]
    neg = [s - margin_minus for s in neg if s >= margin_minus]
    return (lambda_plus * (sum(pos) / len(pos) if pos else 0.0)
            + lambda_minus * (sum(neg) / len(neg) if neg else 0.0))


CONFIGS = [dict(), dict(lambda_plus=0.5, lambda_minus=2.0, margin_plus=0.6, margin_minus=0.1)]


@pytest.mark.parametrize("case", BATCHES, ids=BATCH_IDS)
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_numpy_reference(case, config):
    _, labels, x = case
    loss = ThresholdConsistentMarginLoss(dtype="float64", **config)
    assert_same(float(loss(labels, x)), ref_tcm(labels, x, **config))


@pytest.mark.parametrize("case", BATCHES, ids=BATCH_IDS)
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_pml_value_and_gradient(case, config):
    from pytorch_metric_learning import losses as pml_losses

    _, labels, x = case
    want, (want_grad,) = pml_value_and_grads(
        pml_loss_fn(pml_losses.ThresholdConsistentMarginLoss(**config), labels), x
    )
    loss = ThresholdConsistentMarginLoss(dtype="float64", **config)
    got, (grad,) = keras_value_and_grads(lambda v: loss(labels, v), x)
    assert_same(got, want)
    assert_same(grad, want_grad)


def test_references_are_used_where_pml_ignores_them():
    # PML's loss pairs the queries among themselves even when given ref_emb; here the
    # queries are paired with the references.
    _, labels, x = BATCHES[0]
    ref_labels, ref_x, references = other_references(np.random.default_rng(1))
    labels = labels.astype("int32")
    got = float(threshold_consistent_margin_loss(labels, x, references=references))
    assert_same(got, ref_tcm(labels, x, ref_labels=ref_labels, ref_x=ref_x))
    assert abs(got - ref_tcm(labels, x)) > 1e-4


def test_bad_options():
    with pytest.raises(ValueError, match="lambda_plus"):
        ThresholdConsistentMarginLoss(lambda_plus=-1.0)
