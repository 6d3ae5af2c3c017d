"""Angular loss (Wang et al., "Deep Metric Learning with Angular Loss", ICCV 2017)."""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_dml import distances
from keras_dml import miners as miners_lib
from keras_dml import ops as dml_ops
from keras_dml import reducers as reducers_lib
from keras_dml.losses._pair_terms import mean_over
from keras_dml.losses.base import MetricLoss, References, resolve_references


def angular_loss(
    labels,
    embeddings,
    *,
    alpha: float = 40.0,
    miner=None,
    reducer=None,
    references: References | None = None,
):
    """Bounds the angle at each negative of the triangle it forms with a positive pair.

    With L2-normalised `x_a`, `x_p` (a positive pair) and `x_n` (a negative
    of `a`), `t = tan(radians(alpha))^2`:

    `loss_ap = log(1 + sum_n exp(4 t (x_a + x_p) . x_n - 2 (1 + t) x_a . x_p))`

    (the paper's eq. 8). The sum over negatives is a matrix product of the
    `(B, R)` and `(R, R)` exponentials, shifted so they stay `<= 1`: no
    `(B, R, R)` tensor is built. The loss is the mean over all positive
    pairs (PML's default `MeanReducer`); a pair whose anchor has no negative
    counts 0.

    Differs from PML on purpose: PML normalises anchors and positives but
    uses the negatives as given; here every embedding is normalised, as in
    the paper. On unit-norm inputs both agree.

    Args:
        labels: `(B,)` int32 class labels.
        embeddings: `(B, D)` float embeddings.
        alpha: the angle bound, in degrees (typically 36 to 55).
        miner: a `keras_dml.miners.Miner`: only its pairs are used (PML's
            `indices_tuple`; a triplet miner's (a, p) and (a, n) pairs, each once).
        reducer: a `keras_dml.reducers.Reducer` of the per-element terms;
            None: the reduction described above.
        references: what the anchors take positives and negatives from; the
            batch itself by default.

    Returns:
        A scalar loss; 0 when the batch has no positive pair or no negative.
    """
    references = resolve_references(labels, embeddings, references)
    queries = distances.l2_normalize(embeddings)
    refs = queries if references._is_query_batch else distances.l2_normalize(
        ops.cast(references.embeddings, queries.dtype))
    positive, negative = references.masks(labels)
    if miner is not None:
        # PML: the miner picks the (a, p) pairs; the negatives stay every other label, and
        # a batch without any mined negative pair gives 0.
        positive, mined_negative = miners_lib.mined_pairs(miner, labels, embeddings, references)
        positive = ops.logical_and(positive, ops.any(mined_negative))
    t = math.tan(math.radians(alpha)) ** 2
    anchor_ref = ops.matmul(queries, ops.transpose(refs))  # x_a . x_r, (B, R)
    ref_ref = ops.matmul(refs, ops.transpose(refs))  # x_p . x_n, (R, R)
    # sum_n [neg_an] exp(4t x_a.x_n) exp(4t x_p.x_n), each factor shifted by its row maximum.
    a_logits = 4.0 * t * anchor_ref
    a_shift = ops.stop_gradient(dml_ops.masked_max(a_logits, negative, keepdims=True))
    a_exp = ops.where(negative, ops.exp(ops.minimum(a_logits - a_shift, 0.0)), 0.0)
    r_logits = 4.0 * t * ref_ref
    r_shift = ops.stop_gradient(ops.max(r_logits, axis=1, keepdims=True))
    r_exp = ops.exp(r_logits - r_shift)
    sums = ops.matmul(a_exp, ops.transpose(r_exp))  # (B, R): [a, p]
    has_negative = ops.any(negative, axis=1, keepdims=True)
    log_sums = ops.log(ops.maximum(ops.where(has_negative, sums, 1.0), 1e-30))
    exponent = log_sums + a_shift + ops.transpose(r_shift) - 2.0 * (1.0 + t) * anchor_ref
    per_pair = ops.softplus(exponent)
    return mean_over(
        references, ops.where(has_negative, per_pair, 0.0), positive, reducer, labels
    )


@keras.saving.register_keras_serializable(package="keras_dml")
class AngularLoss(MetricLoss):
    """Trains embeddings by bounding the angle at the negative of each triplet's triangle.

    pytorch-metric-learning's `AngularLoss` (same default `alpha=40` degrees,
    same mean over the positive pairs), except that the
    negatives are L2-normalised too, as in the paper (PML uses them as
    given). See `angular_loss`.

    Args:
        alpha: angle bound in degrees. Defaults to `40.0`.
        miner: a `keras_dml.miners.Miner` choosing the pairs (see the function).
        reducer: a `keras_dml.reducers.Reducer` of the per-element terms (see the function).
        cross_replica: under `tf.distribute`, compare with all replicas' batches.
        name: name of the loss instance.
        reduction: kept for Keras compatibility; the loss is already a scalar.
        dtype: dtype of the loss computation.

    Example:

    >>> import numpy as np
    >>> from keras_dml.losses.angular import AngularLoss
    >>> labels = np.array([0, 0, 1, 1])
    >>> embeddings = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]], "float32")
    >>> round(float(AngularLoss()(labels, embeddings)), 4)
    3.0264

    Reference:
        Wang, Zhou, Wen, Liu & Lin, "Deep Metric Learning with Angular Loss",
        ICCV 2017.
    """

    def __init__(
        self,
        alpha: float = 40.0,
        miner=None,
        reducer=None,
        cross_replica: bool = True,
        name: str = "angular_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        if not (isinstance(alpha, int | float) and 0 < alpha < 90):
            raise ValueError(f"`alpha` must be an angle in degrees in (0, 90), got {alpha!r}.")
        super().__init__(
            angular_loss,
            name=name,
            reduction=reduction,
            dtype=dtype,
            cross_replica=cross_replica,
            alpha=alpha,
            miner=miners_lib.get(miner),
            reducer=reducers_lib.get(reducer),
        )
