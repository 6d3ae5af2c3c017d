"""Tuplet margin loss (Yu & Tao, "Deep Metric Learning with Tuplet Margin Loss", ICCV 2019)."""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_dml import distances
from keras_dml import miners as miners_lib
from keras_dml import reducers as reducers_lib
from keras_dml._checks import check_non_negative, check_positive
from keras_dml.losses._pair_terms import logsumexp_or_zero, mean_over
from keras_dml.losses.base import MetricLoss, References, resolve_references


def tuplet_margin_loss(
    labels,
    embeddings,
    *,
    margin: float = 5.73,
    scale: float = 64.0,
    miner=None,
    reducer=None,
    references: References | None = None,
):
    """A softmax over each positive pair against its anchor's negatives, the positive angle shrunk.

    For each positive pair `(a, p)` with angle `theta_ap` (cosine similarity
    of the L2-normalised embeddings):

    `loss_ap = log(1 + sum_{n negative of a} exp(scale * (cos theta_an - cos(theta_ap - m))))`

    with `m = radians(margin)`. `cos(theta - m)` is computed as
    `cos theta cos m + sin theta sin m` with a zero-gradient square root at
    `theta = 0` (PML's `acos` has an infinite slope there). The loss is the mean
    over all positive pairs (PML's default `MeanReducer`); a pair whose
    anchor has no negative counts 0.

    Args:
        labels: `(B,)` int32 class labels.
        embeddings: `(B, D)` float embeddings.
        margin: the angular margin `m`, in degrees.
        scale: the softmax scale `s`.
        miner: a `keras_dml.miners.Miner`: only its pairs are used (PML's
            `indices_tuple`; a triplet miner's (a, p) and (a, n) pairs, each once).
        reducer: a `keras_dml.reducers.Reducer` of the per-element terms;
            None: the reduction described above.
        references: what the anchors take positives and negatives from; the
            batch itself by default.

    Returns:
        A scalar loss; 0 when the batch has no positive pair.
    """
    references = resolve_references(labels, embeddings, references)
    cosine = references.pairwise(embeddings, "cosine", kind="similarity")
    positive, negative = miners_lib.mined_pairs(miner, labels, embeddings, references)
    m = math.radians(margin)
    sine = distances.safe_sqrt(ops.maximum(1.0 - ops.square(cosine), 0.0))
    shifted = cosine * math.cos(m) + sine * math.sin(m)
    negatives = logsumexp_or_zero(scale * cosine, negative, keepdims=True)
    per_pair = ops.softplus(negatives - scale * shifted)
    has_negative = ops.any(negative, axis=1, keepdims=True)
    return mean_over(
        references, ops.where(has_negative, per_pair, 0.0), positive, reducer, labels
    )


@keras.saving.register_keras_serializable(package="keras_dml")
class TupletMarginLoss(MetricLoss):
    """Trains embeddings with a scaled softmax per positive pair and an angular margin.

    pytorch-metric-learning's `TupletMarginLoss` (cosine similarity, same
    defaults `margin=5.73` degrees and `scale=64`, same mean over the
    positive pairs). See `tuplet_margin_loss`.

    Args:
        margin: angular margin in degrees. Defaults to `5.73` (0.1 radian).
        scale: softmax scale. Defaults to `64.0`.
        miner: a `keras_dml.miners.Miner` choosing the pairs (see the function).
        reducer: a `keras_dml.reducers.Reducer` of the per-element terms (see the function).
        cross_replica: under `tf.distribute`, compare with all replicas' batches.
        name: name of the loss instance.
        reduction: kept for Keras compatibility; the loss is already a scalar.
        dtype: dtype of the loss computation.

    Example:

    >>> import numpy as np
    >>> from keras_dml.losses.tuplet_margin import TupletMarginLoss
    >>> labels = np.array([0, 0, 1, 1])
    >>> embeddings = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]], "float32")
    >>> round(float(TupletMarginLoss()(labels, embeddings)), 4)
    13.0002

    Reference:
        Yu & Tao, "Deep Metric Learning with Tuplet Margin Loss", ICCV 2019.
    """

    def __init__(
        self,
        margin: float = 5.73,
        scale: float = 64.0,
        miner=None,
        reducer=None,
        cross_replica: bool = True,
        name: str = "tuplet_margin_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        check_non_negative(margin, "margin")
        check_positive(scale, "scale")
        super().__init__(
            tuplet_margin_loss,
            name=name,
            reduction=reduction,
            dtype=dtype,
            cross_replica=cross_replica,
            margin=margin,
            scale=scale,
            miner=miners_lib.get(miner),
            reducer=reducers_lib.get(reducer),
        )
