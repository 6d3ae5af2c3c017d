"""SignalToNoiseRatioContrastiveLoss against a NumPy loop reference and PML 2.9."""

from __future__ import annotations

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

from keras_dml.losses.snr_contrastive import (
    SignalToNoiseRatioContrastiveLoss,
    snr_contrastive_loss,
    snr_distance,
)


def ref_snr(a, b):
    return float(np.var(np.asarray(b, np.float64) - a) / np.var(np.asarray(a, np.float64)))


def ref_snr_contrastive(labels, x, pos_margin=0.0, neg_margin=1.0, normalize=True,
                        ref_labels=None, ref_x=None):
    """Contrastive hinges on var(x_j - x_i) / var(x_i); mean of the non-zero terms of each kind."""
    refs = x if ref_x is None else ref_x
    prep = unit if normalize else (lambda v: np.asarray(v, np.float64))
    positives, negatives = pairs(labels, ref_labels)
    pos, neg = [], []
    for i in range(len(labels)):
        pos += [max(ref_snr(prep(x[i]), prep(refs[j])) - pos_margin, 0.0) for j in positives[i]]
        neg += [max(neg_margin - ref_snr(prep(x[i]), prep(refs[j])), 0.0) for j in negatives[i]]
    pos, neg = [v for v in pos if v > 0], [v for v in neg if v > 0]
    return (sum(pos) / len(pos) if pos else 0.0) + (sum(neg) / len(neg) if neg else 0.0)


def test_snr_distance_matches_the_variance_ratio():
    x = np.random.default_rng(0).normal(size=(5, 6))
    y = np.random.default_rng(1).normal(size=(4, 6))
    got = np.asarray(snr_distance(x, y))
    want = [[ref_snr(a, b) for b in y] for a in x]
    assert_same(got, want)


@pytest.mark.parametrize("case", BATCHES, ids=BATCH_IDS)
@pytest.mark.parametrize("pos_margin,neg_margin,normalize", [
    (0.0, 1.0, True), (0.3, 1.5, True), (0.0, 1.0, False)])
def test_matches_numpy_reference(case, pos_margin, neg_margin, normalize):
    _, labels, x = case
    loss = SignalToNoiseRatioContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin,
                                             normalize=normalize, dtype="float64")
    assert_same(float(loss(labels, x)),
                ref_snr_contrastive(labels, x, pos_margin, neg_margin, normalize))


@pytest.mark.parametrize("case", BATCHES, ids=BATCH_IDS)
@pytest.mark.parametrize("margins", [{}, dict(pos_margin=0.3, neg_margin=1.5)])
def test_matches_pml_value_and_gradient(case, margins):
    from pytorch_metric_learning import losses as pml_losses

    _, labels, x = case
    want, (want_grad,) = pml_value_and_grads(
        pml_loss_fn(pml_losses.SignalToNoiseRatioContrastiveLoss(**margins), labels), x
    )
    loss = SignalToNoiseRatioContrastiveLoss(dtype="float64", **margins)
    got, (grad,) = keras_value_and_grads(lambda v: loss(labels, v), x)
    assert_same(got, want)
    assert_same(grad, want_grad)


def test_references_match_reference_and_pml():
    from pytorch_metric_learning import losses as pml_losses

    _, labels, x = BATCHES[0]
    ref_labels, ref_x, references = other_references(np.random.default_rng(1))
    labels = labels.astype("int32")
    got, (grad,) = keras_value_and_grads(
        lambda v: snr_contrastive_loss(labels, v, references=references), x
    )
    assert_same(got, ref_snr_contrastive(labels, x, ref_labels=ref_labels, ref_x=ref_x))
    want, (want_grad,) = pml_value_and_grads(
        pml_loss_fn(pml_losses.SignalToNoiseRatioContrastiveLoss(), labels, ref_labels, ref_x), x
    )
    assert_same(got, want)
    assert_same(grad, want_grad)


def test_no_positive_pair_keeps_the_negative_part():
    x = np.random.default_rng(3).normal(size=(6, 4))
    labels = np.arange(6)
    got = float(SignalToNoiseRatioContrastiveLoss(dtype="float64")(labels, x))
    assert_same(got, ref_snr_contrastive(labels, x))
