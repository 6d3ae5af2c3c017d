"""Histogram loss (Ustinova & Lempitsky, NeurIPS 2016): overlap of the similarity histograms."""

from __future__ import annotations

import keras
from keras import ops

from keras_dml._checks import check_positive_int
from keras_dml.distances import cosine_similarity
from keras_dml.losses.base import MetricLoss, label_masks, validate_inputs


def _density(similarity, mask, num_bins: int):
    """Soft histogram of the masked similarities on `num_bins + 1` nodes over [-1, 1].

    A similarity between nodes `r` and `r + 1` gives each node the weight of
    its linear interpolation (the paper's `delta_{i,j,r}`); the histogram is
    normalised by the number of masked pairs.
    """
    dtype = similarity.dtype
    width = 2.0 / num_bins
    position = (ops.reshape(similarity, (-1,)) + 1.0) / width
    # A similarity of exactly 1 (whose node r + 1 would lie past the last) counts
    # wholly in the last node.
    node = ops.clip(ops.floor(ops.stop_gradient(position)), 0, num_bins - 1)
    upper = position - node
    weight = ops.cast(ops.reshape(mask, (-1,)), dtype)
    node = ops.cast(node, "int32")
    density = ops.segment_sum((1.0 - upper) * weight, node, num_segments=num_bins + 1)
    density = density + ops.segment_sum(upper * weight, node + 1, num_segments=num_bins + 1)
    return density / ops.maximum(ops.sum(weight), 1.0)


def histogram_loss(labels, embeddings, num_bins: int = 100):
    """The probability that a negative pair is more similar than a positive pair.

    With cosine similarities, `p+` and `p-` the soft histograms (see the
    paper) of the positive and negative pairs on `num_bins + 1` nodes over
    [-1, 1] and `Phi+` the cumulative sum of `p+`, the loss is
    `sum_r p-_r Phi+_r`. Each unordered pair counts once. As in
    pytorch-metric-learning, the pairs are those of the batch's triplets: a
    positive pair needs its class to have a negative, a negative pair needs
    one of its samples to have a positive.

    Args:
        labels: `(B,)` int class labels.
        embeddings: `(B, D)` embeddings.
        num_bins: number of bins (PML's `delta` is `2 / num_bins`). Defaults
            to `100`.

    Returns:
        A scalar in [0, 1]; 0 when the batch has no triplet (no positive pair,
        or a single class).

    Example:

    >>> import numpy as np
    >>> labels = np.array([0, 0, 1, 1])
    >>> x = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [-0.6, 0.8]], "float32")
    >>> round(float(histogram_loss(labels, x, num_bins=10)), 4)
    0.75

    Reference:
        Ustinova & Lempitsky, "Learning Deep Embeddings with Histogram Loss",
        NeurIPS 2016.
    """
    num_bins = check_positive_int(num_bins, "num_bins")
    labels, embeddings = validate_inputs(labels, embeddings, "labels", "embeddings")
    similarity = cosine_similarity(embeddings)
    positive, negative = label_masks(labels)
    has_positive = ops.any(positive, axis=1)
    has_negative = ops.any(negative, axis=1)
    n = ops.shape(similarity)[0]
    rows = ops.arange(n)
    upper = rows[:, None] < rows[None, :]
    positive_pairs = ops.logical_and(
        ops.logical_and(positive, upper), has_negative[:, None]
    )
    negative_pairs = ops.logical_and(
        ops.logical_and(negative, upper),
        ops.logical_or(has_positive[:, None], has_positive[None, :]),
    )
    positive_density = _density(similarity, positive_pairs, num_bins)
    negative_density = _density(similarity, negative_pairs, num_bins)
    loss = ops.sum(negative_density * ops.cumsum(positive_density))
    has_triplet = ops.logical_and(ops.any(positive_pairs), ops.any(negative_pairs))
    return ops.where(has_triplet, loss, ops.zeros_like(loss))


@keras.saving.register_keras_serializable(package="keras_dml")
class HistogramLoss(MetricLoss):
    """Trains embeddings so that positive-pair similarities rise above negative-pair ones.

    The cosine similarities of the batch's positive and negative pairs are
    binned into two soft histograms over [-1, 1]; the loss is the estimated
    probability that a random negative pair is more similar than a random
    positive pair (see `histogram_loss`). It has no margin to tune, only the
    number of bins. A batch without a triplet gives 0.

    Args:
        num_bins: number of histogram bins. Defaults to `100` (PML's default;
            PML's `delta` is `2 / num_bins`).
        name: name of the loss instance.
        reduction: kept for Keras compatibility; the loss is already a scalar.
        dtype: dtype of the loss computation; defaults to `keras.backend.floatx()`.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> labels = np.array([0, 0, 1, 1])
    >>> x = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [-0.6, 0.8]], "float32")
    >>> round(float(HistogramLoss(num_bins=10)(labels, x)), 4)
    0.75
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model.compile(optimizer="adam", loss=HistogramLoss())

    Reference:
        Ustinova & Lempitsky, "Learning Deep Embeddings with Histogram Loss",
        NeurIPS 2016.
    """

    def __init__(
        self,
        num_bins: int = 100,
        name: str = "histogram_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        num_bins = check_positive_int(num_bins, "num_bins")
        super().__init__(
            histogram_loss, name=name, reduction=reduction, dtype=dtype, num_bins=num_bins
        )
