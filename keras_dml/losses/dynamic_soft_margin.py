"""Dynamic soft margin loss (Zhang & Rusinkiewicz, ICCV 2019): triplets weighted by a running CDF.

Every triplet `(a, p, n)` gives `x = d(a, p) - d(a, n)` (Euclidean distances
of L2-normalised embeddings, so `x` lies in `[-2, 2]`). A histogram of the
`x` values, kept from batch to batch with momentum, gives their cumulative
distribution `CDF`; the loss is the mean of `CDF(x) * x`: triplets that are
harder than most (large `x`) weigh more, a soft margin that follows the data.

No `(B, R, R)` tensor of triplets is built (unless a triplet miner gives
one): each anchor's negatives are sorted once, and each of its positives
binary-searches them for every bin edge, with the very float operations
that bin a difference, so the bins (and the value, histogram and gradient)
are those of the dense form (`method="dense"`, kept as the tests' reference)
up to rounding. The loss's sum over triplets becomes one weighted sum over
the (a, p) and (a, n) pairs. O(B R log R + B P num_bins log R) time for P
positives per anchor, O(B R) memory.

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

# How many positive slots of every anchor the sorted form searches at once: its loops run
# ceil(P / POSITIVE_CHUNK) times, P the most positives of an anchor (one pass for
# M-per-class batches of up to 17 per class). Memory is O(B * POSITIVE_CHUNK * num_bins).
POSITIVE_CHUNK = 16
METHODS = ("sorted", "dense")


def unit_distances(labels, embeddings, references: References | None = None):
    """`(d, embeddings, references)`: `(B, R)` Euclidean distances of the L2-normalised rows."""
    references = resolve_references(labels, embeddings, references)
    embeddings = distances.l2_normalize(embeddings)
    if not references._is_query_batch:
        references = dataclasses.replace(
            references, embeddings=distances.l2_normalize(references.embeddings)
        )
    return references.pairwise(embeddings, "euclidean"), embeddings, references


def _bins(x, min_val: float, num_bins: int):
    """`(index, fraction)` of each `x` on the grid `min_val + k * 2 |min_val| / num_bins`."""
    position = (x - min_val) / (2.0 * abs(min_val) / num_bins)
    index = ops.floor(position)
    return ops.cast(index, "int32"), position - index


def histogram_counts(x, mask, min_val: float, num_bins: int):
    """`(num_bins,)` linear-interpolation counts of the differences `x` where `mask`.

    Each `x` adds `1 - f` to its bin and `f` to the next one (`f` its
    fraction between the two grid points). Mass that falls outside the
    `num_bins` grid points (the top one, `x = -min_val`, and anything below
    `min_val`) is dropped, where PML raises an index error. No gradient.
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
    return counts


def mix_histogram(histogram, counts, momentum: float):
    """`(1 - momentum) * histogram + momentum * counts`, normalised to sum 1.

    Momentum is 1 while the histogram is empty (all zeros); counts that sum
    to 0 (a batch without triplets) leave the histogram as it is.
    """
    histogram = ops.cast(histogram, counts.dtype)
    momentum = ops.cast(ops.where(ops.sum(histogram) != 0, momentum, 1.0), counts.dtype)
    mixed = (1.0 - momentum) * histogram + momentum * counts
    total = ops.sum(mixed)
    return ops.where(total > 0, mixed / ops.where(total > 0, total, 1.0), histogram)


def update_histogram(histogram, x, mask, min_val: float, num_bins: int, momentum: float):
    """The running histogram after the batch's triplet differences `x` (where `mask`).

    `histogram_counts` of `x`, mixed in by `mix_histogram`. The histogram is
    state: no gradient flows into it. A batch without triplets leaves it as
    it is.
    """
    return mix_histogram(histogram, histogram_counts(x, mask, min_val, num_bins), momentum)


def _dense_terms(x, mask, histogram, min_val, num_bins, momentum):
    """`(total, count, histogram)` of the triplets `mask` over the dense `(B, R, R)` differences."""
    histogram = update_histogram(histogram, x, mask, min_val, num_bins, momentum)
    cdf = ops.cumsum(histogram)
    index, _ = _bins(ops.stop_gradient(x), min_val, num_bins)
    weight = ops.take(cdf, ops.clip(index, 0, num_bins - 1))
    total = dml_ops.masked_sum(ops.cast(weight, x.dtype) * x, mask)
    return total, dml_ops.masked_count(mask, dtype=x.dtype), histogram


def _count_at_least(sorted_negatives, num_negatives, anchor_positive, thresholds, min_val,
                    num_bins):
    """`(B, C, T)` int32: per anchor, positive slot and threshold `k`, `#{n : bin(x) >= k}`.

    `x = d(a, p) - d(a, n)` over the anchor's `num_negatives` negatives,
    `sorted_negatives` ascending. The bin index (`_bins`, the very float
    operations of the dense form) never increases along them, so these
    negatives are a prefix, found by a binary search that evaluates the
    index itself: the counts equal the dense form's exactly, ties and bin
    edges included.
    """
    chunk, count = anchor_positive.shape[1], len(thresholds)
    queries = ops.reshape(ops.repeat(anchor_positive, count, axis=1), (-1, chunk * count))
    wanted = ops.convert_to_tensor(np.tile(np.asarray(thresholds, "int32"), chunk)[None, :])
    width = ops.shape(sorted_negatives)[1]
    flat = ops.reshape(sorted_negatives, (-1,))
    # Row offsets into `flat`: one 1-D gather per step (cheaper than take_along_axis).
    offsets = ops.expand_dims(ops.arange(ops.shape(queries)[0], dtype="int32") * width, 1)
    low = ops.zeros_like(queries, dtype="int32")
    high = low + ops.expand_dims(ops.cast(num_negatives, "int32"), 1)

    def body(low, high):
        middle = (low + high) // 2
        value = ops.take(flat, offsets + ops.minimum(middle, width - 1), axis=0)
        index, _ = _bins(queries - value, min_val, num_bins)
        active = low < high
        right = ops.logical_and(active, index >= wanted)
        left = ops.logical_and(active, ops.logical_not(right))
        return ops.where(right, middle + 1, low), ops.where(left, middle, high)

    low, _ = ops.while_loop(lambda low, high: ops.any(low < high), body, (low, high))
    return ops.reshape(low, (-1, chunk, count))


def _sorted_terms(d, positive, negative, histogram, min_val, num_bins, momentum):
    """`(total, count, histogram)` of every positive times every negative, without `(B, R, R)`.

    Each anchor's negatives are sorted once; its positives are taken
    `POSITIVE_CHUNK` at a time (a loop) and `_count_at_least` gives, for
    each (a, p) and bin edge, how many of its triplets lie past that edge.
    The histogram's linear-interpolation counts are sums over those ranges
    (prefix sums of the sorted distances); a second loop turns the updated
    CDF into weights of the pairs, `w(a, p)` = sum over n of `CDF(x)` and
    `w(a, n)` = sum over p of `CDF(x)`, and the loss's numerator is
    `sum w(a, p) d(a, p) - sum w(a, n) d(a, n)`: the sum over triplets of
    `CDF(x) * x`, with the same gradient. O(B R log R + B P num_bins log R)
    time, O(B R + B POSITIVE_CHUNK num_bins) memory, P the most positives
    of an anchor.
    """
    sd = ops.stop_gradient(d)
    weights = _pair_weights(sd, positive, negative, histogram, min_val, num_bins, momentum)
    positive_weight, negative_weight, negative_order, count, histogram = (
        ops.stop_gradient(w) for w in weights
    )
    sorted_d = ops.take_along_axis(d, negative_order, axis=1)
    total = ops.sum(positive_weight * d) - ops.sum(negative_weight * sorted_d)
    return total, count, histogram


def _pair_weights(sd, positive, negative, histogram, min_val, num_bins, momentum):
    """The pair weights of `_sorted_terms` (no gradient).

    Returns:
        `(positive_weight (B, R), negative_weight (B, R), negative_order (B, R),
        count, histogram)`: `negative_weight[a, j]` is that of the anchor's
        `j`-th closest negative, column `negative_order[a, j]`; `count` the
        number of triplets; `histogram` the updated one.
    """
    dtype = sd.dtype
    num_anchors, num_refs = ops.shape(sd)[0], ops.shape(sd)[1]
    positive, negative = ops.cast(positive, "bool"), ops.cast(negative, "bool")
    num_positives = ops.sum(ops.cast(positive, "int32"), axis=1)
    num_negatives = ops.sum(ops.cast(negative, "int32"), axis=1)
    count = ops.sum(ops.cast(num_positives, dtype) * ops.cast(num_negatives, dtype))
    # Positive number s of an anchor (from 1) is at the first column where this reaches s.
    positives_so_far = ops.cumsum(ops.cast(positive, "int32"), axis=1)
    negative_order = ops.argsort(ops.where(negative, sd, ops.max(sd) + 1.0), axis=1)
    sorted_negatives = ops.take_along_axis(sd, negative_order, axis=1)
    is_negative = ops.expand_dims(ops.arange(num_refs, dtype="int32"), 0) < ops.expand_dims(
        num_negatives, 1
    )
    # Prefix sums of the sorted negatives about their mean (smaller sums, less rounding).
    center = dml_ops.masked_mean(sorted_negatives, is_negative, axis=1, keepdims=True)
    centered = ops.where(is_negative, sorted_negatives - center, ops.zeros_like(sd))
    prefix = ops.concatenate([ops.zeros_like(sd[:, :1]), ops.cumsum(centered, axis=1)], axis=1)
    chunk = POSITIVE_CHUNK
    num_chunks = (ops.max(num_positives) + chunk - 1) // chunk
    rows = ops.expand_dims(ops.arange(num_anchors, dtype="int32"), 1)

    def slots(i):
        """`(valid, columns, d(a, p))` `(B, C)` of the anchors' positive slots of chunk `i`."""
        slot = i * chunk + ops.arange(chunk, dtype="int32")
        valid = ops.expand_dims(slot, 0) < ops.expand_dims(num_positives, 1)
        wanted = ops.zeros_like(positives_so_far[:, :1]) + ops.expand_dims(slot + 1, 0)
        columns = dml_ops.batched_searchsorted(positives_so_far, wanted, side="left")
        columns = ops.minimum(ops.cast(columns, "int32"), num_refs - 1)
        return valid, columns, ops.take_along_axis(sd, columns, axis=1)

    edges = list(range(-1, num_bins + 1))  # bins -1 .. num_bins - 1, and the end of the last
    width = 2.0 * abs(min_val) / num_bins

    def count_chunk(i, counts):
        valid, _, anchor_positive = slots(i)
        at_least = _count_at_least(
            sorted_negatives, num_negatives, anchor_positive, edges, min_val, num_bins
        )
        sums = ops.take_along_axis(prefix, ops.reshape(at_least, (num_anchors, -1)), axis=1)
        sums = ops.reshape(sums, ops.shape(at_least))
        at_least = ops.cast(at_least, dtype)
        in_bin = at_least[..., :-1] - at_least[..., 1:]  # (B, C, num_bins + 1): bins -1 ..
        offset = ops.expand_dims(anchor_positive - min_val - center, 2)
        # Sum over each bin of the positions (x - min_val) / width, minus the bin's index:
        # the fractions `f` of the dense form.
        bin_index = ops.cast(ops.arange(-1, num_bins, dtype="int32"), dtype)
        fractions = (in_bin * offset - (sums[..., :-1] - sums[..., 1:])) / width
        fractions = fractions - bin_index * in_bin
        keep = ops.cast(ops.expand_dims(valid, 2), dtype)
        in_bin = ops.sum(in_bin * keep, axis=(0, 1))
        fractions = ops.sum(fractions * keep, axis=(0, 1))
        return i + 1, counts + (in_bin[1:] - fractions[1:]) + fractions[:-1]

    _, counts = ops.while_loop(
        lambda i, counts: i < num_chunks, count_chunk, (0, ops.zeros((num_bins,), dtype))
    )
    histogram = mix_histogram(histogram, ops.stop_gradient(counts), momentum)
    cdf = ops.cumsum(histogram)
    # weight(x) = CDF[clip(bin)] = cdf[0] + sum over k >= 1 of step[k] * [bin(x) >= k].
    step = cdf[1:] - cdf[:-1]
    positive_weight = ops.zeros((num_anchors * num_refs,), dtype)
    negative_steps = ops.zeros((num_anchors * (num_refs + 1),), dtype)
    if num_bins > 1:

        def weigh_chunk(i, positive_weight, negative_steps):
            valid, columns, anchor_positive = slots(i)
            at_least = _count_at_least(sorted_negatives, num_negatives, anchor_positive,
                                       list(range(1, num_bins)), min_val, num_bins)
            keep = ops.cast(valid, dtype)
            weight = cdf[0] * ops.cast(ops.expand_dims(num_negatives, 1), dtype)
            weight = (weight + ops.sum(ops.cast(at_least, dtype) * step, axis=2)) * keep
            positive_weight = positive_weight + ops.segment_sum(
                ops.reshape(weight, (-1,)), ops.reshape(rows * num_refs + columns, (-1,)),
                num_segments=num_anchors * num_refs,
            )
            # The negatives before position at_least[a, p, k] gain step[k] from (a, p):
            # -step[k] at that position of a running sum over the sorted negatives.
            negative_steps = negative_steps + ops.segment_sum(
                ops.reshape(step * ops.expand_dims(keep, 2), (-1,)),
                ops.reshape(ops.expand_dims(rows, 2) * (num_refs + 1) + at_least, (-1,)),
                num_segments=num_anchors * (num_refs + 1),
            )
            return i + 1, positive_weight, negative_steps

        _, positive_weight, negative_steps = ops.while_loop(
            lambda i, *_: i < num_chunks, weigh_chunk, (0, positive_weight, negative_steps)
        )
        top = cdf[0] + ops.sum(step)
    else:
        top = cdf[0]
        positive_weight = ops.reshape(
            cdf[0] * ops.cast(positive, dtype) * ops.cast(ops.expand_dims(num_negatives, 1), dtype),
            (-1,),
        )
    positive_weight = ops.reshape(positive_weight, (num_anchors, num_refs))
    passed = ops.cumsum(ops.reshape(negative_steps, (num_anchors, num_refs + 1)), axis=1)
    negative_weight = top * ops.cast(ops.expand_dims(num_positives, 1), dtype) - passed[:, :-1]
    negative_weight = ops.where(is_negative, negative_weight, ops.zeros_like(negative_weight))
    return positive_weight, negative_weight, negative_order, count, histogram


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
    method: str = "sorted",
):
    """The mean over triplets of `CDF(x) * x`, `x = d(a, p) - d(a, n)`, with a running CDF.

    `CDF` is the cumulative sum of the histogram after this batch's update
    (`update_histogram`), read at the bin of each `x` (bins below 0 read bin
    0, bins past the end the last one). It is a weight, computed without
    gradient: the gradient of a triplet is `CDF(x) * dx / #triplets`. (PML
    2.9 differentiates through the histogram it has just updated and, with
    momentum < 1, keeps that graph in its state, so its second `backward()`
    fails; see the parity test.)

    No `(B, R, R)` tensor is built unless a triplet miner gives one: each
    anchor's negatives are sorted and its positives binary-search them
    (`_sorted_terms`), O(B R log R + B P num_bins log R) time and
    O(B R) memory for P positives per anchor. `method="dense"` forms every
    triplet as `(B, R, R)` tensors instead (the same values up to rounding;
    kept as the tests' reference).

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
        method: `"sorted"` (default) or `"dense"`, see above.

    Returns:
        A scalar loss, 0 when the batch has no triplet (and the histogram
        unchanged); with `return_histogram=True`, `(loss, histogram)`.
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    d, embeddings, references = unit_distances(labels, embeddings, references)
    mined = miners_lib.mined_or_all(miner, labels, embeddings, references)
    positive, negative, triplets = mined.positive, mined.negative, mined.triplets
    if histogram is None:
        histogram = ops.zeros((num_bins,), d.dtype)
    if triplets is None and method == "sorted":
        total, count, histogram = _sorted_terms(
            d, positive, negative, histogram, min_val, num_bins, momentum
        )
    else:
        triplets = mined.triplet_mask()
        x = ops.expand_dims(d, 2) - ops.expand_dims(d, 1)
        total, count, histogram = _dense_terms(x, triplets, histogram, min_val, num_bins, momentum)
    loss = references.mean(total, count)
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

    Multi-hot `(B, C)` labels are accepted: a triplet's positive shares a
    label with the anchor, its negative none.

    Reference:
        Zhang & Rusinkiewicz, "Learning Local Descriptors with a CDF-Based
        Dynamic Soft Margin", ICCV 2019.
    """

    supports_multi_label = True

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
