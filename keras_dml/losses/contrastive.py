"""Contrastive loss (Chopra, Hadsell & LeCun, 2005) over every pair of a batch."""

from __future__ import annotations

import keras
from keras import ops

from keras_dml import distances
from keras_dml import miners as miners_lib
from keras_dml import ops as dml_ops
from keras_dml import reducers as reducers_lib
from keras_dml import regularizers as regularizers_lib
from keras_dml.losses.base import (
    MetricLoss,
    References,
    check_multi_label,
    resolve_references,
)


def contrastive_hinges(distances, pos_margin: float, neg_margin: float, squared: bool):
    """`(max(d - pos_margin, 0), max(neg_margin - d, 0))`, squared with `squared=True`.

    The costs of a distance `d` as a positive and as a negative pair, the
    terms of `contrastive_loss` (every pair of a batch) and of
    `contrastive_pair_loss` (given pairs).
    """
    positive = ops.relu(distances - pos_margin)
    negative = ops.relu(neg_margin - distances)
    if squared:
        positive, negative = ops.square(positive), ops.square(negative)
    return positive, negative


def contrastive_loss(
    labels,
    embeddings,
    *,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    squared: bool = False,
    distance: str | distances.Distance = "euclidean",
    references: References | None = None,
    multi_label: str = "any",
    miner: miners_lib.Miner | None = None,
    reducer: reducers_lib.Reducer | None = None,
    embedding_regularizer=None,
):
    """Pulls same-label pairs within `pos_margin` and pushes other pairs beyond `neg_margin`.

    Every pair `(i, j)` with `i != j` is used. A positive pair costs
    `max(d_ij - pos_margin, 0)`, a negative pair `max(neg_margin - d_ij, 0)`;
    with `squared=True` both hinge terms are squared, which with the default
    `pos_margin=0` is the classic `z * d^2 + (1 - z) * max(0, neg_margin - d)^2`.

    The result is `mean over positive pairs + mean over negative pairs`, each
    mean being 0 when the batch has no such pair. Averaging the two kinds
    separately keeps the balance between pulling and pushing independent of
    the number of classes in the batch (pytorch-metric-learning does the same
    with its default reducer); it also means a batch without positive pairs
    still gives a finite loss.

    Args:
        labels: `(B,)` int32 class labels.
        embeddings: `(B, D)` float embeddings.
        pos_margin: distance below which a positive pair costs nothing.
        neg_margin: distance beyond which a negative pair costs nothing.
        squared: square each hinge term.
        distance: a name accepted by `keras_dml.distances.get`; similarities
            are turned into distances (`1 - cos` for `"cosine"`).
        references: what the samples are paired with; the batch itself by
            default. Each of the two means runs over the pairs of all queries
            (across replicas: of the global batch).
        multi_label: with multi-hot `(B, C)` labels, positives are the pairs
            sharing a label; `"any"` weighs them equally, `"jaccard"` weighs
            each positive pair's term by the Jaccard overlap of the two
            label sets (a weighted mean). Both equal the single-label loss
            for one label per sample.
        miner: a `keras_dml.miners.Miner`: only its pairs are used (a
            triplet miner's (a, p) and (a, n) pairs, each once; PML counts a
            pair once per triplet it comes from).
        reducer: a `keras_dml.reducers.Reducer` applied to the positive
            pairs' terms and to the negative pairs' terms, the two results
            added (PML's way); None: the two means above. PML's default is
            `AvgNonZeroReducer()`.
        embedding_regularizer: a regularizer of `keras_dml.regularizers`
            whose value on `embeddings` is added to the loss.

    Returns:
        A scalar loss.
    """
    references = resolve_references(labels, embeddings, references)
    distance_matrix = references.pairwise(embeddings, distance)
    positive_mask, negative_mask = miners_lib.mined_pairs(miner, labels, embeddings, references)
    positive_terms, negative_terms = contrastive_hinges(
        distance_matrix, pos_margin, neg_margin, squared
    )
    reducer = reducers_lib.MeanReducer() if reducer is None else reducer
    if check_multi_label(multi_label) == "jaccard":
        weights = references.jaccard(labels)
        positive_mean = references.weighted_mean(
            dml_ops.masked_sum(weights * positive_terms, positive_mask),
            dml_ops.masked_sum(weights, positive_mask),
        )
    else:
        positive_mean = references.mean(*reducer.reduce(positive_terms, positive_mask, labels))
    negative_mean = references.mean(*reducer.reduce(negative_terms, negative_mask, labels))
    loss = positive_mean + negative_mean
    return regularizers_lib.add_embedding_regularizer(loss, embeddings, embedding_regularizer)


@keras.saving.register_keras_serializable(package="keras_dml")
class ContrastiveLoss(MetricLoss):
    """Trains embeddings so that same-label pairs are close and other pairs at least a margin apart.

    Positive pairs cost `max(d - pos_margin, 0)` and negative pairs
    `max(neg_margin - d, 0)` (squared with `squared=True`); the loss is the mean
    over positive pairs plus the mean over negative pairs of the batch, each 0
    when there is no such pair. Pairs are all `(i, j)` with `i != j`.

    Args:
        pos_margin: distance below which a positive pair costs nothing.
            Defaults to `0.0`.
        neg_margin: distance beyond which a negative pair costs nothing.
            Defaults to `1.0`.
        squared: square both hinge terms, as in Hadsell et al. (2006).
            Defaults to `False`.
        distance: `"euclidean"` (default), `"squared_euclidean"`, `"cosine"`
            (used as `1 - cos`), `"angular"` or `"dot"` (used as `-dot`).
        multi_label: `"any"` (default) or `"jaccard"`: how positive pairs of
            multi-hot `(B, C)` labels are weighted (see `contrastive_loss`).
        miner: a `keras_dml.miners.Miner` choosing the pairs (a triplet
            miner's (a, p) and (a, n) pairs); see the function.
        reducer: a `keras_dml.reducers.Reducer` of the per-element terms;
            None keeps the reduction described above.
        embedding_regularizer: a `keras_dml.regularizers` regularizer of
            the embeddings, added to the loss.
        cross_replica: under `tf.distribute`, compare each sample with the
            batches of all replicas, so that the loss equals the one of the
            global batch (a no-op elsewhere). Defaults to `True`.
        name: name of the loss instance.
        reduction: kept for Keras compatibility; the loss is already a scalar.
        dtype: dtype of the loss computation; defaults to `keras.backend.floatx()`.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> from keras_dml.losses.contrastive import ContrastiveLoss
    >>> labels = np.array([0, 0, 1, 1])
    >>> embeddings = np.array([[0.0, 0.0], [0.0, 0.5], [0.0, 0.6], [0.0, 1.2]], "float32")
    >>> round(float(ContrastiveLoss()(labels, embeddings)), 4)
    0.95
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model.compile(optimizer="adam", loss=ContrastiveLoss(neg_margin=0.5))

    Reference:
        Chopra, Hadsell & LeCun, "Learning a Similarity Metric Discriminatively,
        with Application to Face Verification", CVPR 2005.
    """

    supports_multi_label = True

    def __init__(
        self,
        pos_margin: float = 0.0,
        neg_margin: float = 1.0,
        squared: bool = False,
        distance: str = "euclidean",
        multi_label: str = "any",
        miner=None,
        reducer=None,
        embedding_regularizer=None,
        cross_replica: bool = True,
        name: str = "contrastive_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        check_multi_label(multi_label)
        super().__init__(
            contrastive_loss,
            name=name,
            reduction=reduction,
            dtype=dtype,
            cross_replica=cross_replica,
            pos_margin=pos_margin,
            neg_margin=neg_margin,
            squared=squared,
            distance=distance,
            multi_label=multi_label,
            miner=miners_lib.get(miner),
            reducer=reducers_lib.get(reducer),
            embedding_regularizer=regularizers_lib.get(embedding_regularizer),
        )
