"""Threshold-consistent margin loss (Zhang et al., ICLR 2024)."""

from __future__ import annotations

import keras
from keras import ops

from keras_dml import ops as dml_ops
from keras_dml._checks import check_non_negative
from keras_dml.losses.base import MetricLoss, References, resolve_references


def threshold_consistent_margin_loss(
    labels,
    embeddings,
    *,
    lambda_plus: float = 1.0,
    lambda_minus: float = 1.0,
    margin_plus: float = 0.9,
    margin_minus: float = 0.5,
    references: References | None = None,
):
    """Penalises positive pairs below `margin_plus`, negative pairs above `margin_minus` (cosine).

    `loss = lambda_plus * mean_{positives with s <= margin_plus} (margin_plus - s)
    + lambda_minus * mean_{negatives with s >= margin_minus} (s - margin_minus)`,

    each mean over the pairs that violate their margin (0 when none does),
    `s` the cosine similarity. A regulariser meant to be added to another
    loss.

    Args:
        labels: `(B,)` int32 class labels.
        embeddings: `(B, D)` float embeddings.
        lambda_plus: weight of the positive part.
        lambda_minus: weight of the negative part.
        margin_plus: similarity a positive pair should reach.
        margin_minus: similarity a negative pair should stay below.
        references: what the queries are paired with; the batch itself by
            default (PML pairs the queries among themselves even when given
            references).

    Returns:
        A scalar loss.
    """
    references = resolve_references(labels, embeddings, references)
    similarity = references.pairwise(embeddings, "cosine", kind="similarity")
    positive, negative = references.masks(labels)
    positive_kept = ops.logical_and(positive, similarity <= margin_plus)
    negative_kept = ops.logical_and(negative, similarity >= margin_minus)
    positive_part = references.mean(
        dml_ops.masked_sum(margin_plus - similarity, positive_kept),
        dml_ops.masked_count(positive_kept),
    )
    negative_part = references.mean(
        dml_ops.masked_sum(similarity - margin_minus, negative_kept),
        dml_ops.masked_count(negative_kept),
    )
    return lambda_plus * positive_part + lambda_minus * negative_part


@keras.saving.register_keras_serializable(package="keras_dml")
class ThresholdConsistentMarginLoss(MetricLoss):
    """Regularises embeddings so that one similarity threshold works for every class.

    pytorch-metric-learning's `ThresholdConsistentMarginLoss` (cosine
    similarity, same defaults `lambda_plus=lambda_minus=1`,
    `margin_plus=0.9`, `margin_minus=0.5`). Add it to a main loss, e.g.
    `loss=lambda y, p: main(y, p) + tcm(y, p)`. See
    `threshold_consistent_margin_loss`.

    Args:
        lambda_plus: weight of the positive part. Defaults to `1.0`.
        lambda_minus: weight of the negative part. Defaults to `1.0`.
        margin_plus: similarity a positive pair should reach. Defaults to `0.9`.
        margin_minus: similarity a negative pair should stay below. Defaults to `0.5`.
        cross_replica: under `tf.distribute`, compare with all replicas' batches.
        name: name of the loss instance.
        reduction: kept for Keras compatibility; the loss is already a scalar.
        dtype: dtype of the loss computation.

    Example:

    >>> import numpy as np
    >>> from keras_dml.losses.threshold_consistent_margin import ThresholdConsistentMarginLoss
    >>> labels = np.array([0, 0, 1, 1])
    >>> embeddings = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]], "float32")
    >>> round(float(ThresholdConsistentMarginLoss()(labels, embeddings)), 4)
    0.6533

    Reference:
        Zhang, Liu, Zhang, Rao, Wang, Wang, Yao & Wu, "Threshold-Consistent
        Margin Loss for Open-World Deep Metric Learning", ICLR 2024.
    """

    def __init__(
        self,
        lambda_plus: float = 1.0,
        lambda_minus: float = 1.0,
        margin_plus: float = 0.9,
        margin_minus: float = 0.5,
        cross_replica: bool = True,
        name: str = "threshold_consistent_margin_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        check_non_negative(lambda_plus, "lambda_plus")
        check_non_negative(lambda_minus, "lambda_minus")
        super().__init__(
            threshold_consistent_margin_loss,
            name=name,
            reduction=reduction,
            dtype=dtype,
            cross_replica=cross_replica,
            lambda_plus=lambda_plus,
            lambda_minus=lambda_minus,
            margin_plus=margin_plus,
            margin_minus=margin_minus,
        )
