"""Quadruplet loss (Chen et al., CVPR 2017): a triplet loss plus a margin on pairs of negatives."""

from __future__ import annotations

import keras
from keras import ops

from keras_dml import mining
from keras_dml import ops as dml_ops
from keras_dml._checks import is_number
from keras_dml.losses.base import MetricLoss, References, resolve_references
from keras_dml.losses.triplet import triplet_loss


def hardest_negative_pair(distances, labels, references: References | None = None):
    """For every anchor, the closest pair of samples from two classes that are not the anchor's.

    The quadruplet term needs, per anchor of class `c`, a pair `(i, j)` with
    `y_i != y_j`, `y_i != c` and `y_j != c`. Masking the `(B, B)` pair matrix
    once per anchor would build a `(B, B, B)` tensor; instead each row `i`
    keeps its closest other-class sample (distance `m1_i`, class `k1_i`) and
    its closest sample from a third class (`m2_i`, any class but `y_i` and
    `k1_i`). For anchor class `c` and a row `i` with `y_i != c`, the closest
    valid partner of `i` is `m1_i` unless `k1_i == c`, in which case it is
    `m2_i`; the anchor's hardest pair is the minimum over such rows. This is
    exact, O(B²) time and memory.

    Args:
        distances: `(B, R)` distances from the anchors to the references: the
            symmetric `(B, B)` matrix of the batch by default.
        labels: `(B,)` int labels of the anchors.
        references: the references of the columns; None for the batch itself.
            With the gathered batches of all replicas, each replica computes
            `m1, k1, m2` for its own rows and gathers them, so that the pair
            ranges over the global batch.

    Returns:
        `(pair_distances, has_pair)`: `(B,)` the smallest valid `d(i, j)` per
        anchor (gradients reach that entry of `distances`), and `(B,)` bool,
        False when the batch holds fewer than two classes besides the anchor's.
    """
    ref_labels = labels if references is None else references.labels
    m1, has_m1, k1, m2, has_m2 = _closest_other_classes(distances, labels, ref_labels)
    if references is not None:
        # Every reference row's own m1, k1, m2 (computed by the replica holding it).
        m1, m2 = references.gather_rows(m1), references.gather_rows(m2)
        k1 = references.gather_rows(k1)
        has_m1 = references.gather_rows(ops.cast(has_m1, "int32")) > 0
        has_m2 = references.gather_rows(ops.cast(has_m2, "int32")) > 0
    different = ops.not_equal(ops.expand_dims(labels, 1), ops.expand_dims(ref_labels, 0))
    # (anchor a, row i): row i's best partner that avoids the anchor's class.
    row_uses_m2 = ops.equal(ops.expand_dims(labels, 1), ops.expand_dims(k1, 0))
    partner = ops.where(row_uses_m2, ops.expand_dims(m2, 0), ops.expand_dims(m1, 0))
    partner_exists = ops.where(row_uses_m2, ops.expand_dims(has_m2, 0), ops.expand_dims(has_m1, 0))
    valid = ops.logical_and(different, partner_exists)
    return dml_ops.masked_min(partner, valid, axis=1), ops.any(valid, axis=1)


def _closest_other_classes(distances, labels, ref_labels):
    """Per row: `(m1, has_m1, k1, m2, has_m2)` of `hardest_negative_pair`."""
    different = ops.not_equal(ops.expand_dims(labels, 1), ops.expand_dims(ref_labels, 0))
    # m1, k1: each row's closest sample of another class, and that sample's label.
    m1 = dml_ops.masked_min(distances, different, axis=1)
    has_m1 = ops.any(different, axis=1)
    big = ops.stop_gradient(ops.max(distances)) + 1.0
    closest = ops.argmin(ops.stop_gradient(ops.where(different, distances, big)), axis=1)
    k1 = ops.take(ref_labels, closest)
    # m2: the closest sample whose class is neither y_i nor k1_i.
    third_class = ops.logical_and(
        different, ops.not_equal(ops.expand_dims(ref_labels, 0), ops.expand_dims(k1, 1))
    )
    m2 = dml_ops.masked_min(distances, third_class, axis=1)
    has_m2 = ops.any(third_class, axis=1)
    return m1, has_m1, k1, m2, has_m2


def quadruplet_loss(
    labels,
    embeddings,
    margin: float = 0.2,
    pair_margin: float = 0.1,
    negative_mining: str = "semi-hard",
    positive_mining: str = "all",
    distance: str = "euclidean",
    references: References | None = None,
):
    """Triplet loss plus `max(d(a, p) - d(n1, n2) + pair_margin, 0)` over negative pairs.

    The first term is `keras_dml.losses.triplet_loss` with `margin`,
    `negative_mining` and `positive_mining`. The second term pushes, for every
    selected positive pair `(a, p)`, the pair of negatives `(n1, n2)` from two
    different classes, both unlike `a`, farther apart than `a` is from `p`.
    The pair is the hardest one (smallest `d(n1, n2)`) in the batch for the
    anchor's class, as in the paper's online hard-negative mining; see
    `hardest_negative_pair`. Nothing larger than `(B, B)` is built.

    Args:
        labels: `(B,)` integer labels.
        embeddings: `(B, D)` float embeddings.
        margin: the triplet margin α1.
        pair_margin: the margin α2 of the negative-pair term; the paper sets
            it to half of α1 ("weaker" than the triplet constraint).
        negative_mining: negatives of the triplet term, as in `triplet_loss`.
        positive_mining: positive pairs used by both terms, as in `triplet_loss`.
        distance: a name from `keras_dml.distances`; `"squared_euclidean"`
            gives the paper's squared distances.

    Returns:
        A scalar: the triplet term plus the mean of the pair term over the
        positive pairs whose anchor has a valid negative pair. A batch with
        fewer than three classes gives a zero pair term; no positive pair
        gives 0. Both means run over all queries (across replicas: the
        global batch).
    """
    references = resolve_references(labels, embeddings, references)
    first = triplet_loss(
        labels,
        embeddings,
        margin=margin,
        negative_mining=negative_mining,
        positive_mining=positive_mining,
        distance=distance,
        references=references,
    )
    distances = references.pairwise(embeddings, distance)
    positives, _ = references.masks(labels)
    pairs = mining.select_positives(distances, positives, positive_mining)
    pair_distance, has_pair = hardest_negative_pair(distances, labels, references)
    pairs = ops.logical_and(pairs, ops.expand_dims(has_pair, 1))
    hinge = ops.maximum(distances - ops.expand_dims(pair_distance, 1) + pair_margin, 0.0)
    return first + references.mean(dml_ops.masked_sum(hinge, pairs), dml_ops.masked_count(pairs))


@keras.saving.register_keras_serializable(package="keras_dml")
class QuadrupletLoss(MetricLoss):
    """Use this triplet loss when classes should also lie far apart, not only from each anchor.

    A triplet `(a, p, n1)` only asks that `a` be closer to `p` than to `n1`.
    The quadruplet loss adds a negative pair `(n1, n2)` from two other
    classes and asks that it, too, be farther apart than `(a, p)` by
    `pair_margin`: the smallest inter-class distance has to exceed the
    largest intra-class one, which reduces intra-class variation beyond what
    the triplet loss gives. Batches need at least three classes with two or
    more samples each for the pair term (see `keras_dml.data`).

    `loss = triplet_loss(margin) + mean_{(a, p)} max(d(a, p) - d(n1*, n2*) + pair_margin, 0)`,
    where `(n1*, n2*)` is, for the anchor's class, the closest pair of
    samples from two distinct other classes in the batch (hard mining, O(B²)
    memory).

    Args:
        margin: the triplet margin α1 (0.2, as `TripletLoss`, for
            L2-normalised embeddings).
        pair_margin: the negative-pair margin α2 (the paper uses α1 / 2).
        negative_mining: negatives of the triplet term: `"semi-hard"`,
            `"hard"`, `"easy"` or `"all"`.
        positive_mining: `"all"`, `"hard"` or `"easy"` positive pairs.
        distance: a name from `keras_dml.distances` (`"euclidean"` default;
            `"squared_euclidean"` for the paper's squared form).
        cross_replica: under `tf.distribute`, mine positives, negatives and
            negative pairs among the batches of all replicas, so that the loss
            equals the one of the global batch (a no-op elsewhere). Defaults
            to `True`.
        name: loss name.
        reduction: Keras reduction; the loss is already a scalar.
        dtype: the loss's compute dtype (float32 by default).

    Example:

    >>> import numpy as np, keras, keras_dml
    >>> from keras_dml.losses.quadruplet import QuadrupletLoss
    >>> labels = np.array([0, 0, 1, 1, 2, 2])
    >>> emb = np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1], [-1, 0], [-1, 0.1]], "float32")
    >>> float(QuadrupletLoss()(labels, emb))
    0.0
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4),
    ...                           keras.layers.UnitNormalization()])
    >>> model.compile(optimizer="adam", loss=QuadrupletLoss(negative_mining="hard"))

    Reference:
        Chen et al., "Beyond Triplet Loss: a Deep Quadruplet Network for
        Person Re-identification", CVPR 2017.
    """

    def __init__(
        self,
        margin: float = 0.2,
        pair_margin: float = 0.1,
        negative_mining: str = "semi-hard",
        positive_mining: str = "all",
        distance: str = "euclidean",
        cross_replica: bool = True,
        name: str = "quadruplet_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        mining.check_modes(negative_mining, positive_mining)
        for arg, value in (("margin", margin), ("pair_margin", pair_margin)):
            if not is_number(value) or value < 0:
                raise ValueError(f"`{arg}` must be a number >= 0, got {value!r}.")
        super().__init__(
            quadruplet_loss,
            name=name,
            reduction=reduction,
            dtype=dtype,
            cross_replica=cross_replica,
            margin=float(margin),
            pair_margin=float(pair_margin),
            negative_mining=negative_mining,
            positive_mining=positive_mining,
            distance=distance,
        )
