"""Lifted structured loss (Song et al., CVPR 2016) over every positive pair of a batch."""

from __future__ import annotations

import keras
from keras import ops

from keras_dml import distances, distributed
from keras_dml import miners as miners_lib
from keras_dml import ops as dml_ops
from keras_dml import reducers as reducers_lib
from keras_dml.losses.base import MetricLoss, References, resolve_references


def lifted_struct_loss(
    labels,
    embeddings,
    *,
    margin: float = 1.0,
    distance: str | distances.Distance = "euclidean",
    miner=None,
    reducer=None,
    references: References | None = None,
):
    """Pushes each positive pair closer than all negatives of both its members, by a margin.

    For every positive pair `(i, j)` (same label, `i != j`), with `N_i` the
    negatives of `i`:

    `J_ij = log(sum_{k in N_i} exp(m - D_ik) + sum_{l in N_j} exp(m - D_jl)) + D_ij`

    and `loss = 1 / (2 |P|) * sum_{(i, j) in P} max(J_ij, 0)^2`, where `P` holds
    each unordered pair once. `J` is symmetric, so this equals half the mean
    of `max(J_ij, 0)^2` over ordered pairs. The log-sum-exp over each row's
    negatives is computed once, so memory stays `O(B^2)`.

    A batch with no positive pair gives 0. In a batch of a single class no
    pair has negatives, `J_ij` is `-inf` in the formula and the loss is 0.

    Args:
        labels: `(B,)` int32 class labels.
        embeddings: `(B, D)` float embeddings.
        margin: margin `m`.
        distance: a name accepted by `keras_dml.distances.get`; similarities
            are turned into distances (`1 - cos` for `"cosine"`).
        miner: a `keras_dml.miners.Miner`: only its pairs are used (PML's
            `indices_tuple`; a triplet miner's (a, p) and (a, n) pairs, each once).
        reducer: a `keras_dml.reducers.Reducer` of the per-element terms;
            None: the reduction described above.
        references: the batch itself (default) or, under `tf.distribute`, the
            gathered batches of all replicas (`J_ij` needs the negatives of
            both members, so the references must be query rows of some
            replica). The mean runs over the positive pairs of the global batch.

    Returns:
        A scalar loss.
    """
    references = resolve_references(labels, embeddings, references)
    distance_matrix = references.pairwise(embeddings, distance)
    positive_mask, negative_mask = miners_lib.mined_pairs(miner, labels, embeddings, references)
    # A row without negatives gets a large negative stand-in for -inf, which
    # the relu below turns into 0 with a zero gradient.
    negative_lse = dml_ops.masked_logsumexp(margin - distance_matrix, negative_mask)
    # Each reference row's own log-sum-exp (computed by the replica holding it).
    reference_lse = references.gather_rows(negative_lse)
    pair_lse = ops.logaddexp(ops.expand_dims(negative_lse, 1), ops.expand_dims(reference_lse, 0))
    # A positive pair neither of whose members has a (mined) negative has an empty sum,
    # which counts 0 (PML's `logsumexp`); without any negative pair the loss is 0.
    row_empty = ops.logical_not(ops.any(negative_mask, axis=1))
    # Gathered across replicas as numbers (the collective takes no booleans).
    reference_empty = references.gather_rows(ops.cast(row_empty, "float32")) > 0
    both_empty = ops.logical_and(
        ops.expand_dims(row_empty, 1), ops.expand_dims(reference_empty, 0)
    )
    pair_lse = ops.where(both_empty, ops.zeros_like(pair_lse), pair_lse)
    negatives = dml_ops.masked_count(negative_mask)
    if references.across_replicas:
        negatives = distributed.sum_over_replicas(negatives)
    positive_mask = ops.logical_and(positive_mask, negatives > 0)
    half_squared_hinge = 0.5 * ops.square(ops.relu(pair_lse + distance_matrix))
    reducer = reducers_lib.MeanReducer() if reducer is None else reducer
    return references.mean(*reducer.reduce(half_squared_hinge, positive_mask, labels))


@keras.saving.register_keras_serializable(package="keras_dml")
class LiftedStructLoss(MetricLoss):
    """Trains embeddings with the lifted structured loss, using all negatives of each positive pair.

    For each positive pair `(i, j)`, `J_ij = log(sum_{N_i} exp(m - D_ik) +
    sum_{N_j} exp(m - D_jl)) + D_ij`; the loss is `1 / (2 |P|) * sum max(J_ij,
    0)^2` over the unordered positive pairs `P` of the batch (0 without any).

    Args:
        margin: margin `m`. Defaults to `1.0`.
        distance: `"euclidean"` (default, as in the paper),
            `"squared_euclidean"`, `"cosine"` (used as `1 - cos`), `"angular"`
            or `"dot"` (used as `-dot`).
        miner: a `keras_dml.miners.Miner` choosing the pairs (see the function).
        reducer: a `keras_dml.reducers.Reducer` of the per-element terms (see the function).
        cross_replica: under `tf.distribute`, compare each sample with the
            batches of all replicas, so that the loss equals the one of the
            global batch (a no-op elsewhere). Defaults to `True`.
        name: name of the loss instance.
        reduction: kept for Keras compatibility; the loss is already a scalar.
        dtype: dtype of the loss computation; defaults to `keras.backend.floatx()`.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> from keras_dml.losses.lifted_struct import LiftedStructLoss
    >>> labels = np.array([0, 0, 1, 1])
    >>> embeddings = np.array([[0.0, 0.0], [0.0, 0.5], [0.0, 0.6], [0.0, 1.2]], "float32")
    >>> round(float(LiftedStructLoss()(labels, embeddings)), 4)
    2.7897
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model.compile(optimizer="adam", loss=LiftedStructLoss(margin=0.5))

    Reference:
        Song, Xiang, Jegelka & Savarese, "Deep Metric Learning via Lifted
        Structured Feature Embedding", CVPR 2016.
    """

    def __init__(
        self,
        margin: float = 1.0,
        distance: str = "euclidean",
        miner=None,
        reducer=None,
        cross_replica: bool = True,
        name: str = "lifted_struct_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        super().__init__(
            lifted_struct_loss,
            name=name,
            reduction=reduction,
            dtype=dtype,
            cross_replica=cross_replica,
            margin=margin,
            distance=distance,
            miner=miners_lib.get(miner),
            reducer=reducers_lib.get(reducer),
        )
