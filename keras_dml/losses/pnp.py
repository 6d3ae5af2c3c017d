"""PNP loss (Li et al., AAAI 2022): rank positives before negatives, with chosen rank weights."""

from __future__ import annotations

import keras
from keras import ops

from keras_dml import ops as dml_ops
from keras_dml._checks import check_positive
from keras_dml.distances import cosine_similarity
from keras_dml.losses.base import MetricLoss, label_masks, validate_inputs

VARIANTS = ("Ds", "Dq", "Iu", "Ib", "O")


def _check_variant(variant):
    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}.")
    return variant


def pnp_loss(labels, embeddings, b: float = 2.0, alpha: float = 1.0, anneal: float = 0.01,
             variant: str = "O"):
    """The PNP loss: a function of how many negatives rank before each positive.

    With cosine similarities `s_ij` and
    `sig(t) = 1 / (1 + exp(-clip(t / anneal, -50, 50)))`, anchor `i` counts
    for each `j` in `P_i` (its positives and itself) the negatives ranked
    above it, `r_ij = sum_{k: y_k != y_j} sig(s_ik - s_ij)`, maps it through
    the variant's `g` and averages: `l_i = (1 / |P_i|) sum_{j in P_i} g(r_ij)`.
    `g`: `"O"` `r`; `"Ds"` `log(1 + r)`; `"Dq"` `1 / (1 + r)^alpha` (the
    loss is then `1 - mean`); `"Iu"` `(1 + r) log(1 + r)`; `"Ib"`
    `(b r - log(1 + b r)) / b^2`.

    Args:
        labels: `(B,)` int class labels.
        embeddings: `(B, D)` embeddings.
        b: `b` of variant `"Ib"`. Defaults to `2`.
        alpha: exponent of variant `"Dq"`. Defaults to `1`.
        anneal: sigmoid temperature `> 0`. Defaults to `0.01`.
        variant: one of `"Ds", "Dq", "Iu", "Ib", "O"`. Defaults to `"O"`.

    Returns:
        The mean of `l_i` over anchors with at least one positive (`1 -` it
        for `"Dq"`); 0 when no anchor has a positive. Memory is `O(B^3)`.

    Example:

    >>> import numpy as np
    >>> labels = np.array([0, 0, 1, 1])
    >>> x = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [-0.6, 0.8]], "float32")
    >>> round(float(pnp_loss(labels, x)), 4)
    0.75

    Reference:
        Li, Si, Li, Hsieh & Sun, "Rethinking the Optimization of Average
        Precision: Only Penalizing Negative Instances before Positive Ones is
        Enough", AAAI 2022; code: interestingzhuo/PNPloss.
    """
    check_positive(anneal, "anneal")
    _check_variant(variant)
    labels, embeddings = validate_inputs(labels, embeddings, "labels", "embeddings")
    dtype = embeddings.dtype
    similarity = cosine_similarity(embeddings)
    positive, negative = label_masks(labels)
    has_positive = ops.any(positive, axis=1)
    n = ops.shape(similarity)[0]
    is_self = ops.cast(ops.eye(n), "bool")
    relevant = ops.logical_or(positive, ops.logical_and(is_self, has_positive[:, None]))
    # z[i, j, k] = (s_ik - s_ij) / anneal
    z = (ops.expand_dims(similarity, 1) - ops.expand_dims(similarity, 2)) / anneal
    above = ops.sigmoid(ops.clip(z, -50.0, 50.0))
    rank = ops.sum(above * ops.cast(negative, dtype)[None], axis=2)  # (B, B)
    if variant == "Ds":
        rank = ops.log1p(rank)
    elif variant == "Dq":
        rank = ops.power(1.0 + rank, -alpha)
    elif variant == "Iu":
        rank = (1.0 + rank) * ops.log1p(rank)
    elif variant == "Ib":
        rank = (b * rank - ops.log1p(b * rank)) / (b * b)
    per_anchor = dml_ops.masked_mean(rank, relevant, axis=1)
    anchors = dml_ops.masked_count(has_positive, dtype=dtype)
    loss = dml_ops.masked_sum(per_anchor, has_positive) / ops.maximum(anchors, 1.0)
    if variant == "Dq":
        loss = ops.where(anchors > 0, 1.0 - loss, 0.0)
    return loss


@keras.saving.register_keras_serializable(package="keras_dml")
class PNPLoss(MetricLoss):
    """Trains embeddings by penalising only the negatives ranked before each positive.

    A smooth average-precision surrogate: each anchor counts, for each of
    its positives, the negatives whose cosine similarity is (softly, with a
    sigmoid of temperature `anneal`) above it, and the variant turns that
    count into a loss (see `pnp_loss`). Anchors with no positive are left
    out; a batch without a positive pair gives 0. Memory is `O(B^3)`.

    Args:
        b: `b` of variant `"Ib"`. Defaults to `2`.
        alpha: exponent of variant `"Dq"`. Defaults to `1`.
        anneal: sigmoid temperature `> 0`. Defaults to `0.01`.
        variant: `"O"` (default, PNP-O), `"Ds"`, `"Dq"`, `"Iu"` or `"Ib"`.
        name: name of the loss instance.
        reduction: kept for Keras compatibility; the loss is already a scalar.
        dtype: dtype of the loss computation; defaults to `keras.backend.floatx()`.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> labels = np.array([0, 0, 1, 1])
    >>> x = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [-0.6, 0.8]], "float32")
    >>> round(float(PNPLoss(variant="Ds")(labels, x)), 4)
    0.4479
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model.compile(optimizer="adam", loss=PNPLoss())

    Reference:
        Li, Si, Li, Hsieh & Sun, "Rethinking the Optimization of Average
        Precision: Only Penalizing Negative Instances before Positive Ones is
        Enough", AAAI 2022.
    """

    def __init__(
        self,
        b: float = 2.0,
        alpha: float = 1.0,
        anneal: float = 0.01,
        variant: str = "O",
        name: str = "pnp_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        b = check_positive(b, "b")
        alpha = check_positive(alpha, "alpha")
        anneal = check_positive(anneal, "anneal")
        super().__init__(
            pnp_loss, name=name, reduction=reduction, dtype=dtype,
            b=b, alpha=alpha, anneal=anneal, variant=_check_variant(variant),
        )
