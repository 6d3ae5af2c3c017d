"""Neighbourhood components analysis loss (Goldberger et al., NeurIPS 2004)."""

from __future__ import annotations

import keras
from keras import ops

from keras_dml import distances
from keras_dml import miners as miners_lib
from keras_dml import ops as dml_ops
from keras_dml._checks import check_positive
from keras_dml.losses._pair_terms import mean_over
from keras_dml.losses.base import MetricLoss, References, resolve_references


def nca_loss(
    labels,
    embeddings,
    *,
    softmax_scale: float = 1.0,
    distance: str | distances.Distance = "squared_euclidean",
    miner=None,
    references: References | None = None,
):
    """Maximises each sample's probability of picking a same-label neighbour by softmax.

    For query `i`, `p_ij = softmax_j(softmax_scale * s_ij)` over the
    references `j != i` (`s = -d` for a distance); the loss of `i` is
    `-log(sum_{j positive} p_ij)`, computed in log space. The loss averages
    the queries that have a positive (PML's default `MeanReducer` over the
    queries it keeps); a query without positives is left out, and a batch
    without any positive pair gives 0 (PML returns NaN, the mean of no
    terms).

    With a `miner`, each query's term is multiplied by its weight
    `miners.mined_query_weights` (how often the miner picks it, over the
    largest such count: PML's `NCALoss` with `indices_tuple`); the softmax
    still runs over every reference and the mean over every query that has
    a positive.

    Args:
        labels: `(B,)` int32 class labels.
        embeddings: `(B, D)` float embeddings.
        softmax_scale: inverse temperature of the softmax.
        distance: a name accepted by `keras_dml.distances.get`.
        miner: a `keras_dml.miners.Miner` whose picks weigh the queries (see above).
        references: the neighbours to pick from; the batch itself by default.

    Returns:
        A scalar loss; 0 when no query has a positive.
    """
    references = resolve_references(labels, embeddings, references)
    logits = softmax_scale * references.pairwise(embeddings, distance, kind="similarity")
    positive, negative = references.masks(labels)
    others = ops.logical_or(positive, negative)
    log_probability = dml_ops.masked_logsumexp(logits, positive) - dml_ops.masked_logsumexp(
        logits, others
    )
    has_positive = ops.any(positive, axis=1)
    per_query = ops.where(has_positive, -log_probability, ops.zeros_like(log_probability))
    if miner is not None:
        per_query = per_query * ops.cast(
            miners_lib.mined_query_weights(miner, labels, embeddings, references), per_query.dtype
        )
    return mean_over(references, per_query, has_positive)


@keras.saving.register_keras_serializable(package="keras_dml")
class NCALoss(MetricLoss):
    """Trains embeddings so that a softmax over distances picks same-label neighbours.

    pytorch-metric-learning's `NCALoss` (same default `softmax_scale=1` and
    squared-euclidean distance, same mean over the queries that have a
    positive). Difference: PML's `LpDistance` L2-normalises the embeddings
    first by default; here the distance is taken on the embeddings as given
    (end the model with `keras.layers.UnitNormalization()` for PML's
    default). With `miner=`, each query is weighed by how often the miner
    picks it (PML's `NCALoss` given the miner's `indices_tuple`; see
    `nca_loss`).

    Args:
        softmax_scale: inverse temperature of the softmax. Defaults to `1.0`.
        distance: a name accepted by `keras_dml.distances.get`. Defaults to
            `"squared_euclidean"`.
        miner: a `keras_dml.miners.Miner` weighing the queries. Defaults to None.
        cross_replica: under `tf.distribute`, compare with all replicas' batches.
        name: name of the loss instance.
        reduction: kept for Keras compatibility; the loss is already a scalar.
        dtype: dtype of the loss computation.

    Example:

    >>> import numpy as np
    >>> from keras_dml.losses.nca import NCALoss
    >>> labels = np.array([0, 0, 1, 1])
    >>> embeddings = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]], "float32")
    >>> round(float(NCALoss()(labels, embeddings)), 4)
    1.2707

    Reference:
        Goldberger, Roweis, Hinton & Salakhutdinov, "Neighbourhood Components
        Analysis", NeurIPS 2004.
    """

    def __init__(
        self,
        softmax_scale: float = 1.0,
        distance: str = "squared_euclidean",
        miner=None,
        cross_replica: bool = True,
        name: str = "nca_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        check_positive(softmax_scale, "softmax_scale")
        super().__init__(
            nca_loss,
            name=name,
            reduction=reduction,
            dtype=dtype,
            cross_replica=cross_replica,
            softmax_scale=softmax_scale,
            distance=distance,
            miner=miners_lib.get(miner),
        )
