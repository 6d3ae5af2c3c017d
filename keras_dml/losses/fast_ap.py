"""FastAP (Cakir et al., CVPR 2019): average precision from soft distance histograms."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_dml import ops as dml_ops
from keras_dml._checks import check_positive_int
from keras_dml.distances import l2_normalize, squared_euclidean_distance
from keras_dml.losses.base import MetricLoss, label_masks, validate_inputs

# Squared euclidean distances between unit vectors lie in [0, 4].
_HISTOGRAM_MAX = 4.0


def fast_ap_loss(labels, embeddings, num_bins: int = 10):
    """`1 - FastAP`, averaged over the anchors that have a positive.

    With `x` the L2-normalised embeddings, `d_ij = |x_i - x_j|^2` in `[0, 4]`
    and `L = num_bins + 1` bin centres `c_l = 4 l / num_bins`, each pair
    votes softly into its two nearest bins,
    `pulse_ijl = max(0, 1 - |d_ij - c_l| / (4 / num_bins))`. Per anchor `i`,
    `h+_il = sum_{j positive} pulse_ijl`, `h_il = sum_{j != i} pulse_ijl`
    (positives and negatives), `H+` and `H` their cumulative sums over the
    bins, and
    `FastAP_i = (1 / N+_i) sum_l h+_il H+_il / H_il` (bins where
    `h+ H+ = 0` or `H = 0` contribute 0), `N+_i` the anchor's positives.

    Args:
        labels: `(B,)` int class labels.
        embeddings: `(B, D)` embeddings (normalised inside the loss).
        num_bins: number of histogram bins over `[0, 4]`. Defaults to `10`.

    Returns:
        The mean of `1 - FastAP_i` over anchors with at least one positive;
        0 when no anchor has one.

    Example:

    >>> import numpy as np
    >>> labels = np.array([0, 0, 1, 1])
    >>> x = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]], "float32")
    >>> round(float(fast_ap_loss(labels, x)), 4)
    0.0

    Reference:
        Cakir, He, Xia, Kulis & Sclaroff, "Deep Metric Learning to Rank",
        CVPR 2019; code: kunhe/FastAP-metric-learning.
    """
    num_bins = check_positive_int(num_bins, "num_bins")
    labels, embeddings = validate_inputs(labels, embeddings, "labels", "embeddings")
    dtype = embeddings.dtype
    distance = squared_euclidean_distance(l2_normalize(embeddings))
    positive, negative = label_masks(labels)
    width = _HISTOGRAM_MAX / num_bins
    centres = ops.convert_to_tensor(np.linspace(0.0, _HISTOGRAM_MAX, num_bins + 1), dtype=dtype)
    pulse = ops.relu(1.0 - ops.abs(ops.expand_dims(distance, -1) - centres) / width)  # (B, B, L)
    positive_histogram = ops.sum(pulse * ops.cast(positive, dtype)[:, :, None], axis=1)
    negative_histogram = ops.sum(pulse * ops.cast(negative, dtype)[:, :, None], axis=1)
    positive_cumulative = ops.cumsum(positive_histogram, axis=1)
    total_cumulative = ops.cumsum(positive_histogram + negative_histogram, axis=1)
    product = positive_histogram * positive_cumulative
    used = ops.logical_and(product > 0, total_cumulative > 0)
    ratio = ops.where(used, product / ops.where(used, total_cumulative, 1.0), 0.0)
    num_positives = dml_ops.masked_count(positive, axis=1, dtype=dtype)
    fast_ap = ops.sum(ratio, axis=1) / ops.maximum(num_positives, 1.0)
    has_positive = num_positives > 0
    total = dml_ops.masked_sum(1.0 - fast_ap, has_positive)
    return total / ops.maximum(dml_ops.masked_count(has_positive, dtype=dtype), 1.0)


@keras.saving.register_keras_serializable(package="keras_dml")
class FastAPLoss(MetricLoss):
    """Trains embeddings to maximise a histogram approximation of average precision.

    Each anchor ranks the rest of the batch by squared euclidean distance of
    the L2-normalised embeddings; the distances are binned softly into
    `num_bins` bins over `[0, 4]`, and average precision is computed from the
    positive and total histograms (see `fast_ap_loss`). The loss is
    `1 - FastAP` averaged over anchors that have a positive; a batch with no
    positive pair gives 0. As in pytorch-metric-learning the distance is
    fixed (normalised squared euclidean). Memory is `O(B^2 num_bins)`.

    Args:
        num_bins: number of histogram bins. Defaults to `10` (as PML).
        name: name of the loss instance.
        reduction: kept for Keras compatibility; the loss is already a scalar.
        dtype: dtype of the loss computation; defaults to `keras.backend.floatx()`.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> labels = np.array([0, 0, 1, 1])
    >>> x = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [-0.6, 0.8]], "float32")
    >>> round(float(FastAPLoss()(labels, x)), 4)
    0.5833
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model.compile(optimizer="adam", loss=FastAPLoss(num_bins=20))

    Reference:
        Cakir, He, Xia, Kulis & Sclaroff, "Deep Metric Learning to Rank",
        CVPR 2019.
    """

    def __init__(
        self,
        num_bins: int = 10,
        name: str = "fast_ap_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        num_bins = check_positive_int(num_bins, "num_bins")
        super().__init__(
            fast_ap_loss, name=name, reduction=reduction, dtype=dtype, num_bins=num_bins
        )
