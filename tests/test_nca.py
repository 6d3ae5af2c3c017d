"""NCALoss against a NumPy loop reference and pytorch-metric-learning 2.9."""

from __future__ import annotations

import math

import numpy as np
import pytest
from keras import ops
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

from keras_dml.losses.nca import NCALoss, nca_loss


def ref_nca(labels, x, softmax_scale=1.0, distance="squared_euclidean", ref_labels=None,
            ref_x=None, weights=None):
    """Softmax over the other references; -log of the positives' mass; mean over queries.

    `weights`: one factor per query (a miner's, `ref_mined_weights`); the mean still
    runs over every query with a positive.
    """
    refs = x if ref_x is None else ref_x
    positives, negatives = pairs(labels, ref_labels)
    sign = 1.0 if distance in ("cosine", "dot") else -1.0
    losses = []
    for i in range(len(labels)):
        if not positives[i]:
            continue
        logits = {j: softmax_scale * sign * pair_value(x[i], refs[j], distance)
                  for j in positives[i] + negatives[i]}
        top = max(logits.values())
        total = sum(math.exp(v - top) for v in logits.values())
        mass = sum(math.exp(logits[j] - top) for j in positives[i]) / total
        losses.append(-math.log(mass) * (1.0 if weights is None else weights[i]))
    return sum(losses) / len(losses) if losses else 0.0


def ref_mined_weights(mined, in_batch=True):
    """PML's `convert_to_weights` by loops over a `Mined`'s masks, written as PML's tuples.

    A pair miner's masks are the 4-tuple `(a1, p, a2, n)`, a triplet miner's the 3-tuple
    `(a, p, n)`; each index counts once per array it appears in. `in_batch=False`: only
    the anchors count (PML with `ref_emb`).
    """
    if mined.triplets is not None:
        triplets = ops.convert_to_numpy(mined.triplets)
        arrays = [[], [], []]
        for a, p, n in zip(*np.nonzero(triplets), strict=True):
            for array, index in zip(arrays, (a, p, n), strict=True):
                array.append(int(index))
        num_queries = triplets.shape[0]
    else:
        positive = ops.convert_to_numpy(mined.positive)
        negative = ops.convert_to_numpy(mined.negative)
        a1, p = np.nonzero(positive)
        a2, n = np.nonzero(negative)
        arrays = [a1.tolist(), p.tolist(), a2.tolist(), n.tolist()]
        num_queries = positive.shape[0]
    if not any(arrays):
        return [1.0] * num_queries
    counted = arrays if in_batch else [arrays[0]] + ([arrays[2]] if len(arrays) == 4 else [])
    counts = [0] * num_queries
    for array in counted:
        for index in array:
            if index < num_queries:
                counts[index] += 1
    largest = max(counts)
    return [c / largest for c in counts]


@pytest.mark.parametrize("case", BATCHES, ids=BATCH_IDS)
@pytest.mark.parametrize("distance,scale", [("squared_euclidean", 1.0), ("euclidean", 2.0),
                                            ("cosine", 4.0)])
def test_matches_numpy_reference(case, distance, scale):
    _, labels, x = case
    loss = NCALoss(softmax_scale=scale, distance=distance, dtype="float64")
    assert_same(float(loss(labels, x)), ref_nca(labels, x, scale, distance))


@pytest.mark.parametrize("case", BATCHES, ids=BATCH_IDS)
@pytest.mark.parametrize("distance", ["squared_euclidean", "cosine"])
def test_matches_pml_value_and_gradient(case, distance):
    from pytorch_metric_learning import distances as pml_distances
    from pytorch_metric_learning import losses as pml_losses

    _, labels, x = case
    # PML's LpDistance normalises by default; keras-dml's distances do not (documented).
    pml_distance = (pml_distances.CosineSimilarity() if distance == "cosine"
                    else pml_distances.LpDistance(power=2, normalize_embeddings=False))
    pml = pml_losses.NCALoss(softmax_scale=2.0, distance=pml_distance)
    want, (want_grad,) = pml_value_and_grads(pml_loss_fn(pml, labels), x)
    loss = NCALoss(softmax_scale=2.0, distance=distance, dtype="float64")
    got, (grad,) = keras_value_and_grads(lambda v: loss(labels, v), x)
    assert_same(got, want)
    assert_same(grad, want_grad)


def test_references_match_reference_and_pml():
    from pytorch_metric_learning import distances as pml_distances
    from pytorch_metric_learning import losses as pml_losses

    _, labels, x = BATCHES[0]
    ref_labels, ref_x, references = other_references(np.random.default_rng(1))
    labels = labels.astype("int32")
    got, (grad,) = keras_value_and_grads(lambda v: nca_loss(labels, v, references=references), x)
    assert_same(got, ref_nca(labels, x, ref_labels=ref_labels, ref_x=ref_x))
    pml = pml_losses.NCALoss(distance=pml_distances.LpDistance(power=2,
                                                                normalize_embeddings=False))
    want, (want_grad,) = pml_value_and_grads(pml_loss_fn(pml, labels, ref_labels, ref_x), x)
    assert_same(got, want)
    assert_same(grad, want_grad)


def test_no_positive_pair_gives_zero_where_pml_gives_nan():
    from pytorch_metric_learning import losses as pml_losses

    x = np.random.default_rng(3).normal(size=(5, 4))
    labels = np.arange(5)
    assert float(NCALoss()(labels, x.astype("float32"))) == 0.0
    want, _ = pml_value_and_grads(pml_loss_fn(pml_losses.NCALoss(), labels), x)
    assert math.isnan(want)  # PML: the mean of no terms


def test_bad_options():
    with pytest.raises(ValueError, match="softmax_scale"):
        NCALoss(softmax_scale=0.0)
    with pytest.raises(ValueError, match="distance"):
        NCALoss(distance="manhattan")

