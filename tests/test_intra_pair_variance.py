"""IntraPairVarianceLoss against a NumPy loop reference and pytorch-metric-learning 2.9."""

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

from keras_dml.losses.intra_pair_variance import IntraPairVarianceLoss, intra_pair_variance_loss


def ref_ipv(labels, x, pos_eps=0.01, neg_eps=0.01, distance="cosine", ref_labels=None,
            ref_x=None):
    """Squared hinge around the mean positive / negative pair; mean over each kind of pair."""
    refs = x if ref_x is None else ref_x
    positives, negatives = pairs(labels, ref_labels)
    pos = [pair_value(x[i], refs[j], distance) for i in range(len(labels)) for j in positives[i]]
    neg = [pair_value(x[i], refs[j], distance) for i in range(len(labels)) for j in negatives[i]]
    similarity = distance in ("cosine", "dot")
    total = 0.0
    if pos:
        mu = sum(pos) / len(pos)
        gaps = [(1 - pos_eps) * mu - s if similarity else s - (1 + pos_eps) * mu for s in pos]
        total += sum(max(g, 0.0) ** 2 for g in gaps) / len(gaps)
    if neg:
        mu = sum(neg) / len(neg)
        gaps = [s - (1 + neg_eps) * mu if similarity else (1 - neg_eps) * mu - s for s in neg]
        total += sum(max(g, 0.0) ** 2 for g in gaps) / len(gaps)
    return total


@pytest.mark.parametrize("case", BATCHES, ids=BATCH_IDS)
@pytest.mark.parametrize("distance,pos_eps,neg_eps", [
    ("cosine", 0.01, 0.01), ("cosine", 0.1, 0.0), ("euclidean", 0.05, 0.02)])
def test_matches_numpy_reference(case, distance, pos_eps, neg_eps):
    _, labels, x = case
    loss = IntraPairVarianceLoss(pos_eps=pos_eps, neg_eps=neg_eps, distance=distance,
                                 dtype="float64")
    assert_same(float(loss(labels, x)), ref_ipv(labels, x, pos_eps, neg_eps, distance))


@pytest.mark.parametrize("case", BATCHES, ids=BATCH_IDS)
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_matches_pml_value_and_gradient(case, distance):
    from pytorch_metric_learning import distances as pml_distances
    from pytorch_metric_learning import losses as pml_losses

    _, labels, x = case
    pml_distance = (pml_distances.CosineSimilarity() if distance == "cosine"
                    else pml_distances.LpDistance(normalize_embeddings=False))
    want, (want_grad,) = pml_value_and_grads(
        pml_loss_fn(pml_losses.IntraPairVarianceLoss(distance=pml_distance), labels), x
    )
    loss = IntraPairVarianceLoss(distance=distance, dtype="float64")
    got, (grad,) = keras_value_and_grads(lambda v: loss(labels, v), x)
    assert_same(got, want)
    assert_same(grad, want_grad)


def test_references_match_reference_and_pml():
    from pytorch_metric_learning import losses as pml_losses

    _, labels, x = BATCHES[0]
    ref_labels, ref_x, references = other_references(np.random.default_rng(1))
    labels = labels.astype("int32")
    got, (grad,) = keras_value_and_grads(
        lambda v: intra_pair_variance_loss(labels, v, references=references), x
    )
    assert_same(got, ref_ipv(labels, x, ref_labels=ref_labels, ref_x=ref_x))
    want, (want_grad,) = pml_value_and_grads(
        pml_loss_fn(pml_losses.IntraPairVarianceLoss(), labels, ref_labels, ref_x), x
    )
    assert_same(got, want)
    assert_same(grad, want_grad)


def test_no_positive_pair_keeps_the_negative_part():
    x = np.random.default_rng(3).normal(size=(6, 4))
    labels = np.arange(6)
    assert_same(float(IntraPairVarianceLoss(dtype="float64")(labels, x)), ref_ipv(labels, x))


def test_bad_options():
    with pytest.raises(ValueError, match="pos_eps"):
        IntraPairVarianceLoss(pos_eps=-0.1)
