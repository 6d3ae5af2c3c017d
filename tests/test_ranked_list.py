"""RankedListLoss against a NumPy loop reference and pytorch-metric-learning 2.9."""

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

from keras_dml.losses.ranked_list import RankedListLoss, ranked_list_loss


def ref_rll(labels, x, margin=0.4, Tn=10.0, imbalance=0.5, alpha=None, Tp=0.0,  # noqa: N803
            distance="euclidean", ref_labels=None, ref_x=None):
    """Weighted hinges of the violating positives and negatives per query; mean over queries."""
    refs = x if ref_x is None else ref_x
    alpha = 1 + margin / 2 if alpha is None else alpha
    positives, negatives = pairs(labels, ref_labels)
    losses = []
    for i in range(len(labels)):
        d = {j: pair_value(x[i], refs[j], distance) for j in positives[i] + negatives[i]}
        pos = [d[j] for j in positives[i] if d[j] > alpha - margin and d[j] > 0]
        neg = [d[j] for j in negatives[i] if d[j] < alpha and d[j] > 0]
        slack = 1e-5 * len(refs)  # PML adds 1e-5 to every entry of the row
        w_p = [math.exp(Tp * (v - (alpha - margin))) for v in pos]
        w_n = [math.exp(Tn * (alpha - v)) for v in neg]
        loss_p = sum(w * (v - (alpha - margin)) for w, v in zip(w_p, pos, strict=True))
        loss_p /= sum(w_p) + slack
        loss_n = sum(w * (alpha - v) for w, v in zip(w_n, neg, strict=True))
        loss_n /= sum(w_n) + slack
        losses.append((1 - imbalance) * loss_p + imbalance * loss_n)
    return sum(losses) / len(losses)


CONFIGS = [dict(), dict(margin=0.6, Tn=2.0, Tp=1.0, imbalance=0.3),
           dict(margin=1.0, Tn=1.0, alpha=2.0, distance="squared_euclidean")]


@pytest.mark.parametrize("case", BATCHES, ids=BATCH_IDS)
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_numpy_reference(case, config):
    _, labels, x = case
    loss = RankedListLoss(dtype="float64", **config)
    assert_same(float(loss(labels, x)), ref_rll(labels, x, **config))


@pytest.mark.filterwarnings("ignore:Values of Tp or Tn are too high")  # PML's, for Tn = 10
@pytest.mark.parametrize("case", BATCHES, ids=BATCH_IDS)
@pytest.mark.parametrize("config", CONFIGS[:2])
def test_matches_pml_value_and_gradient(case, config):
    from pytorch_metric_learning import distances as pml_distances
    from pytorch_metric_learning import losses as pml_losses

    _, labels, x = case
    # PML requires margin and Tn; its LpDistance normalises by default (documented).
    pml_config = {"margin": 0.4, "Tn": 10.0, **config}
    pml = pml_losses.RankedListLoss(
        distance=pml_distances.LpDistance(normalize_embeddings=False), **pml_config)
    want, (want_grad,) = pml_value_and_grads(pml_loss_fn(pml, labels), x)
    loss = RankedListLoss(dtype="float64", **config)
    got, (grad,) = keras_value_and_grads(lambda v: loss(labels, v), x)
    assert_same(got, want)
    assert_same(grad, want_grad)


def test_references_match_reference():
    # PML supports no references for this loss; the loop reference defines them.
    _, labels, x = BATCHES[0]
    ref_labels, ref_x, references = other_references(np.random.default_rng(1))
    labels = labels.astype("int32")
    got = float(ranked_list_loss(labels, x, references=references))
    assert_same(got, ref_rll(labels, x, ref_labels=ref_labels, ref_x=ref_x))


def test_bad_options():
    with pytest.raises(ValueError, match="imbalance"):
        RankedListLoss(imbalance=1.5)
    with pytest.raises(ValueError, match="Tn"):
        RankedListLoss(Tn=-1.0)
    with pytest.raises(ValueError, match="distance"):
        RankedListLoss(distance="cosine")
