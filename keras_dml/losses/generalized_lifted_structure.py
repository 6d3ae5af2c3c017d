"""Generalized lifted structure loss (Hermans, Beyer & Leibe, arXiv:1703.07737, 2017)."""

from __future__ import annotations

import keras
from keras import ops

from keras_dml import distances
from keras_dml import miners as miners_lib
from keras_dml import reducers as reducers_lib
from keras_dml.losses._pair_terms import (
    logsumexp_or_zero,
    mean_over,
    oriented_matrix,
)
from keras_dml.losses.base import MetricLoss, References, resolve_references


def generalized_lifted_structure_loss(
    labels,
    embeddings,
    *,
    neg_margin: float = 1.0,
    pos_margin: float = 0.0,
    distance: str | distances.Distance = "euclidean",
    miner=None,
    reducer=None,
    references: References | None = None,
):
    """A soft maximum over each sample's positives against a soft minimum over its negatives.

    For query `i` with distances `d` to its positives `P_i` and negatives `N_i`:

    `loss_i = relu(log sum_{P_i} exp(d_ip - pos_margin) + log sum_{N_i} exp(neg_margin - d_in))`

    (for a similarity `s`: `pos_margin - s_ip` and `s_in - neg_margin`); an
    empty sum counts 0, as in PML. The loss is the mean over the queries
    (PML's default `MeanReducer`).

    Args:
        labels: `(B,)` int32 class labels.
        embeddings: `(B, D)` float embeddings.
        neg_margin: margin of the negatives.
        pos_margin: margin of the positives.
        distance: a name accepted by `keras_dml.distances.get`.
        miner: a `keras_dml.miners.Miner`: only its pairs are used (PML's
            `indices_tuple`; a triplet miner's (a, p) and (a, n) pairs, each once).
        reducer: a `keras_dml.reducers.Reducer` of the per-element terms;
            None: the reduction described above.
        references: what the queries take positives and negatives from; the
            batch itself by default.

    Returns:
        A scalar loss.
    """
    references = resolve_references(labels, embeddings, references)
    matrix, sign = oriented_matrix(references, embeddings, distance)
    positive, negative = miners_lib.mined_pairs(miner, labels, embeddings, references)
    positive_part = logsumexp_or_zero(sign * (matrix - pos_margin), positive)
    negative_part = logsumexp_or_zero(sign * (neg_margin - matrix), negative)
    per_query = ops.relu(positive_part + negative_part)
    return mean_over(references, per_query, ops.ones_like(per_query, dtype="bool"), reducer, labels)


@keras.saving.register_keras_serializable(package="keras_dml")
class GeneralizedLiftedStructureLoss(MetricLoss):
    """Trains embeddings with a smooth hardest-positive versus hardest-negative term per sample.

    pytorch-metric-learning's `GeneralizedLiftedStructureLoss` (same
    defaults `neg_margin=1`, `pos_margin=0`, same mean over the
    queries). Difference: PML's `LpDistance`
    L2-normalises the embeddings first by default; here `"euclidean"` is
    measured on the embeddings as given (end the model with
    `keras.layers.UnitNormalization()` for PML's default). See
    `generalized_lifted_structure_loss`.

    Args:
        neg_margin: margin of the negatives. Defaults to `1.0`.
        pos_margin: margin of the positives. Defaults to `0.0`.
        distance: a name accepted by `keras_dml.distances.get`. Defaults to `"euclidean"`.
        miner: a `keras_dml.miners.Miner` choosing the pairs (see the function).
        reducer: a `keras_dml.reducers.Reducer` of the per-element terms (see the function).
        cross_replica: under `tf.distribute`, compare with all replicas' batches.
        name: name of the loss instance.
        reduction: kept for Keras compatibility; the loss is already a scalar.
        dtype: dtype of the loss computation.

    Example:

    >>> import numpy as np
    >>> from keras_dml.losses.generalized_lifted_structure import GeneralizedLiftedStructureLoss
    >>> labels = np.array([0, 0, 1, 1])
    >>> embeddings = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]], "float32")
    >>> round(float(GeneralizedLiftedStructureLoss()(labels, embeddings)), 4)
    1.8919

    Reference:
        Hermans, Beyer & Leibe, "In Defense of the Triplet Loss for Person
        Re-Identification", arXiv:1703.07737, 2017 (section 2).
    """

    def __init__(
        self,
        neg_margin: float = 1.0,
        pos_margin: float = 0.0,
        distance: str = "euclidean",
        miner=None,
        reducer=None,
        cross_replica: bool = True,
        name: str = "generalized_lifted_structure_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        super().__init__(
            generalized_lifted_structure_loss,
            name=name,
            reduction=reduction,
            dtype=dtype,
            cross_replica=cross_replica,
            neg_margin=neg_margin,
            pos_margin=pos_margin,
            distance=distance,
            miner=miners_lib.get(miner),
            reducer=reducers_lib.get(reducer),
        )
