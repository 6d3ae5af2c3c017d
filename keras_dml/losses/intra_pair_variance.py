"""Intra-pair variance loss (Yu & Tao, "Deep Metric Learning with Tuplet Margin Loss", 2019)."""

from __future__ import annotations

import keras
from keras import ops

from keras_dml import distances
from keras_dml import miners as miners_lib
from keras_dml import ops as dml_ops
from keras_dml import reducers as reducers_lib
from keras_dml._checks import check_non_negative
from keras_dml.losses._pair_terms import mean_over, oriented_matrix
from keras_dml.losses.base import MetricLoss, References, resolve_references


def intra_pair_variance_loss(
    labels,
    embeddings,
    *,
    pos_eps: float = 0.01,
    neg_eps: float = 0.01,
    distance: str | distances.Distance = "cosine",
    miner=None,
    reducer=None,
    references: References | None = None,
):
    """Penalises positive (negative) pairs that stray from the mean positive (negative) pair.

    With `mu_+` and `mu_-` the mean similarity of the batch's positive and
    negative pairs:

    - a positive pair costs `relu((1 - pos_eps) * mu_+ - s_ap)^2`,
    - a negative pair costs `relu(s_an - (1 + neg_eps) * mu_-)^2`,

    (for a distance: `relu(d_ap - (1 + pos_eps) mu_+)^2` and
    `relu((1 - neg_eps) mu_- - d_an)^2`). The loss is the mean over the
    positive pairs plus the mean over the negative pairs (PML's default
    `MeanReducer` on each part); the means `mu` carry gradient, as
    in PML.

    Args:
        labels: `(B,)` int32 class labels.
        embeddings: `(B, D)` float embeddings.
        pos_eps: relative slack of the positive pairs.
        neg_eps: relative slack of the negative pairs.
        distance: a name accepted by `keras_dml.distances.get`.
        miner: a `keras_dml.miners.Miner`: only its pairs are used (PML's
            `indices_tuple`; a triplet miner's (a, p) and (a, n) pairs, each once).
        reducer: a `keras_dml.reducers.Reducer` of the per-element terms;
            None: the reduction described above.
        references: what the queries are paired with; the batch itself by default.

    Returns:
        A scalar loss; a part without pairs counts 0.
    """
    references = resolve_references(labels, embeddings, references)
    matrix, sign = oriented_matrix(references, embeddings, distance)
    positive, negative = miners_lib.mined_pairs(miner, labels, embeddings, references)
    positive_mean = references.mean(
        dml_ops.masked_sum(matrix, positive), dml_ops.masked_count(positive)
    )
    negative_mean = references.mean(
        dml_ops.masked_sum(matrix, negative), dml_ops.masked_count(negative)
    )
    if sign < 0:  # a similarity: positives should not fall below their mean
        positive_gap = (1.0 - pos_eps) * positive_mean - matrix
        negative_gap = matrix - (1.0 + neg_eps) * negative_mean
    else:
        positive_gap = matrix - (1.0 + pos_eps) * positive_mean
        negative_gap = (1.0 - neg_eps) * negative_mean - matrix
    positive_terms = ops.square(ops.relu(positive_gap))
    negative_terms = ops.square(ops.relu(negative_gap))
    return mean_over(references, positive_terms, positive, reducer, labels) + mean_over(
        references, negative_terms, negative, reducer, labels
    )


@keras.saving.register_keras_serializable(package="keras_dml")
class IntraPairVarianceLoss(MetricLoss):
    """Trains embeddings so that all positive (and all negative) pairs are about equally similar.

    pytorch-metric-learning's `IntraPairVarianceLoss` (cosine similarity,
    same defaults `pos_eps=neg_eps=0.01`, same mean over the pairs of each
    part). Usually added to another loss (the paper pairs it
    with `TupletMarginLoss`). See `intra_pair_variance_loss`.

    Args:
        pos_eps: relative slack of the positive pairs. Defaults to `0.01`.
        neg_eps: relative slack of the negative pairs. Defaults to `0.01`.
        distance: a name accepted by `keras_dml.distances.get`. Defaults to `"cosine"`.
        miner: a `keras_dml.miners.Miner` choosing the pairs (see the function).
        reducer: a `keras_dml.reducers.Reducer` of the per-element terms (see the function).
        cross_replica: under `tf.distribute`, compare with all replicas' batches.
        name: name of the loss instance.
        reduction: kept for Keras compatibility; the loss is already a scalar.
        dtype: dtype of the loss computation.

    Example:

    >>> import numpy as np
    >>> from keras_dml.losses.intra_pair_variance import IntraPairVarianceLoss
    >>> labels = np.array([0, 0, 0, 1, 1, 1])
    >>> embeddings = np.array([[1.0, 0.0], [0.6, 0.8], [0.9, 0.1], [0.8, 0.6], [0.0, 1.0],
    ...                        [0.2, 0.9]], "float32")
    >>> round(float(IntraPairVarianceLoss()(labels, embeddings)), 4)
    0.0643

    Reference:
        Yu & Tao, "Deep Metric Learning with Tuplet Margin Loss", ICCV 2019.
    """

    def __init__(
        self,
        pos_eps: float = 0.01,
        neg_eps: float = 0.01,
        distance: str = "cosine",
        miner=None,
        reducer=None,
        cross_replica: bool = True,
        name: str = "intra_pair_variance_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        check_non_negative(pos_eps, "pos_eps")
        check_non_negative(neg_eps, "neg_eps")
        super().__init__(
            intra_pair_variance_loss,
            name=name,
            reduction=reduction,
            dtype=dtype,
            cross_replica=cross_replica,
            pos_eps=pos_eps,
            neg_eps=neg_eps,
            distance=distance,
            miner=miners_lib.get(miner),
            reducer=reducers_lib.get(reducer),
        )
