"""Dynamic soft margin loss (Zhang & Rusinkiewicz, ICCV 2019): triplets weighted by a running CDF.

Every triplet `(a, p, n)` gives `x = d(a, p) - d(a, n)` (Euclidean distances
of L2-normalised embeddings, so `x` lies in `[-2, 2]`). A histogram of the
`x` values, kept from batch to batch with momentum, gives their cumulative
distribution `CDF`; the loss is the mean of `CDF(x) * x`: triplets that are
harder than most (large `x`) weigh more, a soft margin that follows the data.

Where the running histogram lives: a `keras.losses.Loss` has no variables
that `fit` carries, so `DynamicSoftMarginLoss` owns one non-trainable
`keras.Variable` (`loss.histogram`) and assigns it at every call, eagerly, in
TensorFlow graphs (`model.fit` on TensorFlow) and on torch. A compiled JAX
step cannot update a variable its model does not track: there, and under
`tf.distribute` (untested), use `momentum=1.0`, the per-batch histogram (what
PML computes on its first batch). The histogram is not saved with the model
(`get_config` holds the hyperparameters only); a restored loss starts afresh.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
from keras import ops

from keras_dml import distances
from keras_dml import miners as miners_lib
from keras_dml import ops as dml_ops
from keras_dml._checks import check_positive_int, is_number
from keras_dml.losses.base import MetricLoss, References, resolve_references


def triplet_differences(labels, embeddings, references: References | None = None, miner=None):
    """`(x, mask)`: `x[a, p, n] = d(a, p) - d(a, n)` `(B, R, R)` on unit vectors, and the triplets.

    The triplets are every positive with every negative of each anchor
    (PML's `convert_to_triplets(..., t_per_anchor="all")`), or a miner's
    (`Mined.triplet_mask()`: a pair miner's positives times its negatives).
    """
    references = resolve_references(labels, embeddings, references)
    embeddings = distances.l2_normalize(embeddings)
    if not references._is_query_batch:
        references = dataclasses.replace(
            references, embeddings=distances.l2_normalize(references.embeddings)
        )
    d = references.pairwise(embeddings, "euclidean")
    if miner is None:
        positive, negative = references.masks(labels)
        mask = ops.logical_and(ops.expand_dims(positive, 2), ops.expand_dims(negative, 1))
    else:
        mask = miner.mine(labels, embeddings, references).triplet_mask()
    return ops.expand_dims(d, 2) - ops.expand_dims(d, 1), mask, references


def _bins(x, min_val: float, num_bins: int):
    """`(index, fraction)` of each `x` on the grid `min_val + k * 2 |min_val| / num_bins`."""
    position = (x - min_val) / (2.0 * abs(min_val) / num_bins)
    index = ops.floor(position)
    return ops.cast(index, "int32"), position - index


def update_histogram(histogram, x, mask, min_val: float, num_bins: int, momentum: float):
    """The running histogram after the batch's triplet differences `x` (where `mask`).

    Each `x` adds `1 - f` to its bin and `f` to the next one (`f` its
    fraction between the two grid points); the histogram becomes
    `(1 - momentum) * histogram + momentum * counts` (momentum 1 while the
    histogram is empty), normalised to sum 1. Mass that falls outside the
    `num_bins` grid points (the top one, `x = -min_val`, and anything below
    `min_val`) is dropped, where PML raises an index error. The histogram is
    state: no gradient flows into it. A batch without triplets leaves it as
    it is.
    """
    x = ops.stop_gradient(ops.reshape(x, (-1,)))
    mask = ops.reshape(mask, (-1,))
    index, fraction = _bins(x, min_val, num_bins)
    counts = 0.0
    for offset, weight in ((0, 1.0 - fraction), (1, fraction)):
        bin_id = index + offset
        inside = ops.logical_and(mask, ops.logical_and(bin_id >= 0, bin_id < num_bins))
        # Everything outside the grid goes to one extra segment, sliced off below.
        segment = ops.where(inside, bin_id, num_bins)
        weight = ops.where(inside, weight, 0.0)
        counts = counts + ops.segment_sum(weight, segment, num_segments=num_bins + 1)[:num_bins]
    histogram = ops.cast(histogram, counts.dtype)
    momentum = ops.cast(ops.where(ops.sum(histogram) != 0, momentum, 1.0), counts.dtype)
    mixed = (1.0 - momentum) * histogram + momentum * counts
    total = ops.sum(mixed)
    return ops.where(total > 0, mixed / ops.where(total > 0, total, 1.0), histogram)


def dynamic_soft_margin_loss(
    labels,
    embeddings,
    *,
    min_val: float = -2.0,
    num_bins: int = 10,
    momentum: float = 0.01,
    histogram=None,
    return_histogram: bool = False,
    miner: miners_lib.Miner | None = None,
    references: References | None = None,
):
    """The mean over triplets of `CDF(x) * x`, `x = d(a, p) - d(a, n)`, with a running CDF.

    `CDF` is the cumulative sum of the histogram after this batch's update
    (`update_histogram`), read at the bin of each `x` (bins below 0 read bin
    0, bins past the end the last one). It is a weight, computed without
    gradient: the gradient of a triplet is `CDF(x) * dx / #triplets`. (PML
    2.9 differentiates through the histogram it has just updated and, with
    momentum < 1, keeps that graph in its state, so its second `backward()`
    fails; see the parity test.)

    Args:
        labels: `(B,)` int32 class labels.
        embeddings: `(B, D)` float embeddings; L2-normalised here.
        min_val: the lowest difference the histogram covers; its bins are
            `2 |min_val| / num_bins` wide.
        num_bins: the number of bins.
        momentum: the weight of this batch's counts in the running histogram.
        histogram: the running `(num_bins,)` histogram; None or all zeros:
            none yet.
        return_histogram: also return the updated histogram.
        miner: a `keras_dml.miners.Miner`: only its triplets (a pair
            miner's positives times its negatives, per anchor) are used.
        references: what the anchors take positives and negatives from; the
            batch itself by default.

    Returns:
        A scalar loss, 0 when the batch has no triplet (and the histogram
        unchanged); with `return_histogram=True`, `(loss, histogram)`.
    """
    x, mask, references = triplet_differences(labels, embeddings, references, miner)
    if histogram is None:
        histogram = ops.zeros((num_bins,), x.dtype)
    histogram = update_histogram(histogram, x, mask, min_val, num_bins, momentum)
    cdf = ops.cumsum(histogram)
    index, _ = _bins(ops.stop_gradient(x), min_val, num_bins)
    weight = ops.take(cdf, ops.clip(index, 0, num_bins - 1))
    loss = references.mean(
        dml_ops.masked_sum(ops.cast(weight, x.dtype) * x, mask),
        dml_ops.masked_count(mask, dtype=x.dtype),
    )
    return (loss, histogram) if return_histogram else loss


def _keeps_state(embeddings) -> bool:
    """Whether an assigned variable persists: not in a JAX trace (jit, grad) or stateless scope."""
    if keras.backend.backend() != "jax":
        return True
    import jax
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    return not (isinstance(embeddings, jax.core.Tracer) or in_stateless_scope())


@keras.saving.register_keras_serializable(package="keras_dml")
class DynamicSoftMarginLoss(MetricLoss):
    """Weights each triplet by the running CDF of triplet difficulty: a margin that adapts.

    For every triplet `(a, p, n)` of the batch, `x = d(a, p) - d(a, n)` on
    L2-normalised embeddings; the loss is the mean of `CDF(x) * x`, `CDF`
    the cumulative distribution of a histogram of `x` kept over batches with
    `momentum` (see `dynamic_soft_margin_loss`). The value can be negative.

    The histogram is `loss.histogram`, a non-trainable `keras.Variable`
    updated at every call (TensorFlow, torch, and JAX run eagerly outside
    `fit`). Under a compiled JAX `fit` the loss cannot carry it from step to
    step: build it with `momentum=1.0` there (each batch's own histogram),
    otherwise calling it raises `ValueError`. It is not saved with the model.
    Differences from PML: no gradient through the histogram (PML's fails at
    its second step), and mass outside the grid is dropped where PML raises.

    Args:
        min_val: the lowest `x` the histogram covers (PML's default `-2.0`).
        num_bins: number of histogram bins. Defaults to `10`.
        momentum: weight of each batch in the running histogram, in
            `(0, 1]`. Defaults to `0.01`; `1.0` keeps no state.
        miner: a `keras_dml.miners.Miner` choosing the triplets (a pair
            miner's positives times its negatives).
        name: loss name.
        reduction: Keras reduction; the loss is already a scalar.
        dtype: the loss's compute dtype.

    Example:

    >>> import numpy as np, keras, keras_dml
    >>> labels = np.array([0, 0, 1, 1])
    >>> emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], "float32")
    >>> loss = keras_dml.DynamicSoftMarginLoss()
    >>> round(float(loss(labels, emb)), 4)
    -0.3618
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model.compile(optimizer="adam", loss=keras_dml.DynamicSoftMarginLoss(momentum=1.0))

    Reference:
        Zhang & Rusinkiewicz, "Learning Local Descriptors with a CDF-Based
        Dynamic Soft Margin", ICCV 2019.
    """

    def __init__(
        self,
        min_val: float = -2.0,
        num_bins: int = 10,
        momentum: float = 0.01,
        miner=None,
        name: str = "dynamic_soft_margin_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        if not is_number(min_val) or not min_val < 0:
            raise ValueError(f"`min_val` must be a negative number, got {min_val!r}.")
        check_positive_int(num_bins, "num_bins")
        if not is_number(momentum) or not 0 < momentum <= 1:
            raise ValueError(f"`momentum` must be in (0, 1], got {momentum!r}.")
        super().__init__(
            self._call_with_state,
            name=name,
            reduction=reduction,
            dtype=dtype,
            min_val=float(min_val),
            num_bins=int(num_bins),
            momentum=float(momentum),
            miner=miners_lib.get(miner),
        )
        self.histogram = keras.Variable(
            np.zeros((int(num_bins),), self.dtype or "float32"), trainable=False,
            name="histogram",
        )

    def _call_with_state(self, labels, embeddings, **options):
        keep = _keeps_state(embeddings)
        if not keep and self.momentum < 1.0:
            raise ValueError(
                "DynamicSoftMarginLoss keeps a running histogram, which a JAX transformation "
                "(`jit`, `grad`, a compiled `fit` step) cannot carry: the loss's variable is not "
                "the model's. Use momentum=1.0 (each batch's own histogram) or another backend."
            )
        loss, histogram = dynamic_soft_margin_loss(
            labels, embeddings, histogram=self.histogram.value, return_histogram=True, **options
        )
        if keep:
            self.histogram.assign(ops.cast(histogram, self.histogram.dtype))
        return loss

    def reset_state(self):
        """Empties the running histogram (the next batch starts it afresh)."""
        self.histogram.assign(ops.zeros_like(self.histogram.value))
