"""GeneralizedLiftedStructureLoss against a NumPy loop reference and pytorch-metric-learning 2.9."""

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

from keras_dml.losses.generalized_lifted_structure import (
    GeneralizedLiftedStructureLoss,
    generalized_lifted_structure_loss,
)


def ref_gls(labels, x, neg_margin=1.0, pos_margin=0.0, distance="euclidean", ref_labels=None,
            ref_x=None):
    """Per query: relu(lse_P(d - pos_margin) + lse_N(neg_margin - d)), empty lse = 0; mean."""
    refs = x if ref_x is None else ref_x
    positives, negatives = pairs(labels, ref_labels)
    sign = -1.0 if distance in ("cosine", "dot") else 1.0

    def lse(values):
        return math.log(sum(math.exp(v) for v in values)) if values else 0.0

    losses = []
    for i in range(len(labels)):
        pos = [sign * (pair_value(x[i], refs[j], distance) - pos_margin) for j in positives[i]]
        neg = [sign * (neg_margin - pair_value(x[i], refs[j], distance)) for j in negatives[i]]
        losses.append(max(lse(pos) + lse(neg), 0.0))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("case", BATCHES, ids=BATCH_IDS)
@pytest.mark.parametrize("distance,neg_margin,pos_margin", [
    ("euclidean", 1.0, 0.0), ("squared_euclidean", 2.0, 0.5), ("cosine", 0.3, 0.8)])
def test_matches_numpy_reference(case, distance, neg_margin, pos_margin):
    _, labels, x = case
    loss = GeneralizedLiftedStructureLoss(neg_margin=neg_margin, pos_margin=pos_margin,
                                          distance=distance, dtype="float64")
    assert_same(float(loss(labels, x)),
                ref_gls(labels, x, neg_margin, pos_margin, distance))


@pytest.mark.parametrize("case", BATCHES, ids=BATCH_IDS)
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_matches_pml_value_and_gradient(case, distance):
    from pytorch_metric_learning import distances as pml_distances
    from pytorch_metric_learning import losses as pml_losses

    _, labels, x = case
    # PML's LpDistance normalises by default; keras-dml's "euclidean" does not (documented).
    pml_distance = (pml_distances.CosineSimilarity() if distance == "cosine"
                    else pml_distances.LpDistance(normalize_embeddings=False))
    margins = dict(neg_margin=0.4, pos_margin=0.7) if distance == "cosine" else {}
    pml = pml_losses.GeneralizedLiftedStructureLoss(distance=pml_distance, **margins)
    want, (want_grad,) = pml_value_and_grads(pml_loss_fn(pml, labels), x)
    loss = GeneralizedLiftedStructureLoss(distance=distance, dtype="float64", **margins)
    got, (grad,) = keras_value_and_grads(lambda v: loss(labels, v), x)
    assert_same(got, want)
    assert_same(grad, want_grad)


def test_references_match_reference_and_pml():
    from pytorch_metric_learning import distances as pml_distances
    from pytorch_metric_learning import losses as pml_losses

    _, labels, x = BATCHES[0]
    ref_labels, ref_x, references = other_references(np.random.default_rng(1))
    labels = labels.astype("int32")
    got, (grad,) = keras_value_and_grads(
        lambda v: generalized_lifted_structure_loss(labels, v, references=references), x
    )
    assert_same(got, ref_gls(labels, x, ref_labels=ref_labels, ref_x=ref_x))
    pml = pml_losses.GeneralizedLiftedStructureLoss(
        distance=pml_distances.LpDistance(normalize_embeddings=False))
    want, (want_grad,) = pml_value_and_grads(pml_loss_fn(pml, labels, ref_labels, ref_x), x)
    assert_same(got, want)
    assert_same(grad, want_grad)


def test_no_positive_pair_keeps_the_negative_term():
    # As in PML, a query without positives still pays its soft-min negative term.
    x = np.random.default_rng(3).normal(size=(5, 4))
    labels = np.arange(5)
    got = float(GeneralizedLiftedStructureLoss(dtype="float64")(labels, x))
    assert_same(got, ref_gls(labels, x))
    assert got > 0
