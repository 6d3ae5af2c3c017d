"""Ranked list loss (Wang et al., "Ranked List Loss for Deep Metric Learning", CVPR 2019)."""

from __future__ import annotations

import keras
from keras import ops

from keras_dml import distances
from keras_dml import ops as dml_ops
from keras_dml._checks import check_non_negative, check_positive
from keras_dml.losses._pair_terms import mean_over
from keras_dml.losses.base import MetricLoss, References, resolve_references

# PML adds this to every weight of a row before summing them (not only the non-zero ones).
_WEIGHT_EPSILON = 1e-5


def ranked_list_loss(
    labels,
    embeddings,
    *,
    margin: float = 0.4,
    Tn: float = 10.0,  # noqa: N803 (the paper's and PML's name)
    imbalance: float = 0.5,
    alpha: float | None = None,
    Tp: float = 0.0,  # noqa: N803
    distance: str | distances.Distance = "euclidean",
    references: References | None = None,
):
    """Pushes each sample's negatives beyond `alpha`, pulls its positives within `alpha - margin`.

    For query `i`: the violating negatives (`d_in < alpha`) are weighted by
    `w_n = exp(Tn (alpha - d_in))`, the violating positives
    (`d_ip > alpha - margin`) by `w_p = exp(Tp (d_ip - alpha + margin))`,
    and

    `loss_i = (1 - imbalance) * sum w_p (d_ip - alpha + margin) / (sum w_p + R eps)
    + imbalance * sum w_n (alpha - d_in) / (sum w_n + R eps)`

    with `eps = 1e-5` and `R` the number of references (PML adds `eps` to
    every entry of the row). Pairs at distance exactly 0 are not weighted
    (as in PML). The weights carry gradient, as in PML. The loss is the mean
    over the queries (PML's default `MeanReducer`).

    Args:
        labels: `(B,)` int32 class labels.
        embeddings: `(B, D)` float embeddings.
        margin: gap between the positive and negative boundaries.
        Tn: temperature of the negative weights.
        imbalance: weight of the negative part, in `[0, 1]`.
        alpha: the negative boundary; `1 + margin / 2` when None.
        Tp: temperature of the positive weights (0: uniform, "RLL-Simpler").
        distance: a name accepted by `keras_dml.distances.get` (a distance).
        references: what the queries rank; the batch itself by default (PML
            supports no references for this loss).

    Returns:
        A scalar loss.
    """
    references = resolve_references(labels, embeddings, references)
    alpha = 1.0 + margin / 2.0 if alpha is None else alpha
    matrix = references.pairwise(embeddings, distance)
    positive, negative = references.masks(labels)
    nonzero = matrix > 0
    pos_boundary = alpha - margin
    positive_kept = ops.logical_and(ops.logical_and(positive, matrix > pos_boundary), nonzero)
    negative_kept = ops.logical_and(ops.logical_and(negative, matrix < alpha), nonzero)
    # Unselected entries go through exp as 0 (no overflow, no NaN in the gradient of `where`).
    positive_excess = ops.where(positive_kept, matrix - pos_boundary, 0.0)
    positive_weights = ops.where(positive_kept, ops.exp(Tp * positive_excess), 0.0)
    negative_shortfall = ops.where(negative_kept, alpha - matrix, 0.0)
    negative_weights = ops.where(negative_kept, ops.exp(Tn * negative_shortfall), 0.0)
    slack = _WEIGHT_EPSILON * ops.cast(ops.shape(matrix)[1], matrix.dtype)
    positive_part = dml_ops.masked_sum(
        positive_weights * (matrix - pos_boundary), positive_kept, axis=1
    ) / (ops.sum(positive_weights, axis=1) + slack)
    negative_part = dml_ops.masked_sum(
        negative_weights * (alpha - matrix), negative_kept, axis=1
    ) / (ops.sum(negative_weights, axis=1) + slack)
    per_query = (1.0 - imbalance) * positive_part + imbalance * negative_part
    return mean_over(references, per_query, ops.ones_like(per_query, dtype="bool"))


@keras.saving.register_keras_serializable(package="keras_dml")
class RankedListLoss(MetricLoss):
    """Trains embeddings so that each sample ranks its positives before its negatives by a margin.

    pytorch-metric-learning's `RankedListLoss` (same formula, `imbalance=0.5`,
    `Tp=0`, `alpha = 1 + margin / 2` by default, same mean over the
    queries). PML has no default for `margin` and `Tn`;
    here they default to `0.4` (so `alpha = 1.2`) and `10`. PML's
    `LpDistance` L2-normalises embeddings first by default; here
    `"euclidean"` is measured on the embeddings as given (end the model with
    `keras.layers.UnitNormalization()`, for which `alpha = 1.2` is meant).
    See `ranked_list_loss`.

    Args:
        margin: gap between the positive and negative boundaries. Defaults to `0.4`.
        Tn: temperature of the negative weights. Defaults to `10.0`.
        imbalance: weight of the negative part, in `[0, 1]`. Defaults to `0.5`.
        alpha: the negative boundary; `1 + margin / 2` when None (default).
        Tp: temperature of the positive weights. Defaults to `0.0`.
        distance: a name accepted by `keras_dml.distances.get`. Defaults to `"euclidean"`.
        cross_replica: under `tf.distribute`, compare with all replicas' batches.
        name: name of the loss instance.
        reduction: kept for Keras compatibility; the loss is already a scalar.
        dtype: dtype of the loss computation.

    Example:

    >>> import numpy as np
    >>> from keras_dml.losses.ranked_list import RankedListLoss
    >>> labels = np.array([0, 0, 1, 1])
    >>> embeddings = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]], "float32")
    >>> round(float(RankedListLoss()(labels, embeddings)), 4)
    0.4158

    Reference:
        Wang, Hua, Kodirov, Hu, Garnier & Robertson, "Ranked List Loss for
        Deep Metric Learning", CVPR 2019.
    """

    def __init__(
        self,
        margin: float = 0.4,
        Tn: float = 10.0,  # noqa: N803
        imbalance: float = 0.5,
        alpha: float | None = None,
        Tp: float = 0.0,  # noqa: N803
        distance: str = "euclidean",
        cross_replica: bool = True,
        name: str = "ranked_list_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        check_non_negative(margin, "margin")
        check_non_negative(Tn, "Tn")
        check_non_negative(Tp, "Tp")
        if not (isinstance(imbalance, int | float) and 0 <= imbalance <= 1):
            raise ValueError(f"`imbalance` must be in [0, 1], got {imbalance!r}.")
        if alpha is not None:
            check_positive(alpha, "alpha")
        if distances.get(distance).is_similarity:
            raise ValueError(
                f"`distance` must be a distance (euclidean, squared_euclidean, angular) for "
                f"RankedListLoss, got {distance!r}."
            )
        super().__init__(
            ranked_list_loss,
            name=name,
            reduction=reduction,
            dtype=dtype,
            cross_replica=cross_replica,
            margin=margin,
            Tn=Tn,
            imbalance=imbalance,
            alpha=alpha,
            Tp=Tp,
            distance=distance,
        )
