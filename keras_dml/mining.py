"""Positive and negative mining on a pairwise distance matrix.

Every miner takes the `(B, R)` distance matrix between anchors and references
plus boolean positive/negative masks and returns distances (so gradients flow
through them) together with a validity mask. Nothing larger than `(B, R)` is
built: batch-all mining sorts each anchor's negatives once and binary-searches
the positives, O(B·R log R) time and O(B·R) memory; semi-hard mining
(`semi_hard_terms`) does the same for anchors with many positives and, in
M-per-class batches (few positives per anchor), buckets the negatives between
the positives' distances instead of sorting, O(B·R log P), or on TensorFlow
with at most 16 positives takes an XLA-fused masked minimum, O(B·R·P).

Example:

>>> import numpy as np
>>> from keras_dml import mining
>>> from keras_dml.losses.base import label_masks
>>> d = np.array([[0.0, 1.0, 2.0], [1.0, 0.0, 3.0], [2.0, 3.0, 0.0]], "float32")
>>> pos, neg = label_masks(np.array([0, 0, 1]))
>>> neg_d, valid = mining.hardest_negative(d, neg)
>>> np.asarray(neg_d).tolist(), np.asarray(valid).tolist()
([2.0, 3.0, 2.0], [True, True, True])
"""

from __future__ import annotations

import keras
from keras import ops

from keras_dml import ops as dml_ops

NEGATIVE_MINING = ("semi-hard", "hard", "easy", "all")
POSITIVE_MINING = ("all", "hard", "easy")


def check_modes(negative_mining: str, positive_mining: str = "all") -> None:
    """Raises `ValueError` for a mining mode not in `NEGATIVE_MINING` / `POSITIVE_MINING`."""
    for arg, value, allowed in (
        ("negative_mining", negative_mining, NEGATIVE_MINING),
        ("positive_mining", positive_mining, POSITIVE_MINING),
    ):
        if value not in allowed:
            raise ValueError(f"`{arg}` must be one of {allowed}, got {value!r}.")


def _filler(distances, at_least=None):
    """A constant above every distance (and above `at_least`), to sort masked entries last."""
    top = ops.max(distances)
    if at_least is not None:
        top = ops.maximum(top, ops.max(at_least))
    return ops.stop_gradient(top) + 1.0


def sorted_negatives(distances, negative_mask, at_least=None):
    """Sorts each anchor's negative distances ascending, non-negatives last.

    Returns:
        `(sorted_values, num_negatives)`: `(B, R)` each row's negative
        distances ascending, followed by a constant filler larger than every
        distance and than `at_least`; gradients flow through the sort to the
        distances. `num_negatives` is `(B,)` int32.
    """
    filler = ops.ones_like(distances) * _filler(distances, at_least)
    sorted_values = ops.sort(ops.where(negative_mask, distances, filler), axis=1)
    num_negatives = ops.sum(ops.cast(negative_mask, "int32"), axis=1)
    return sorted_values, num_negatives


def semi_hard_negatives(distances, negative_mask, query_mask=None):
    """For every (anchor a, column p): the smallest negative distance d(a, n) > d(a, p).

    This is FaceNet's semi-hard rule as tensorflow-addons implements it: the
    closest negative that is farther than the positive; where none exists, the
    farthest negative of the anchor (the easiest one) is used instead.

    Each anchor's negatives are sorted once (O(B·R log R) time, O(B·R)
    memory); gradients reach the chosen negative's distance through a gather,
    not through the sort.

    Args:
        distances: `(B, R)` anchor-to-reference distances.
        negative_mask: `(B, R)` bool, True where the reference is a negative.
        query_mask: optional `(B, R)` bool, the (a, p) entries the caller will
            use (usually the positives); other entries of the result are then
            arbitrary. Lets the TensorFlow backend search only those.

    Returns:
        `(negative_distances, has_negative)`: `(B, R)` distances of the chosen
        negative for each (a, p), and `(B,)` bool, False for anchors without
        any negative (their row holds the anchor's minimum distance, as in
        tensorflow-addons).
    """
    num_refs = ops.shape(distances)[1]
    masked = ops.stop_gradient(
        ops.where(negative_mask, distances, ops.ones_like(distances) * _filler(distances))
    )
    order = ops.argsort(masked, axis=1)
    sorted_values = ops.take_along_axis(masked, order, axis=1)
    num_negatives = ops.sum(ops.cast(negative_mask, "int32"), axis=1)
    # Number of negatives with d(a, n) <= d(a, p): the next one is the semi-hard negative.
    if query_mask is None:
        position = dml_ops.batched_searchsorted(sorted_values, distances, side="right")
    else:
        position = dml_ops.masked_batched_searchsorted(
            sorted_values, distances, query_mask, side="right"
        )
    has_semi_hard = position < ops.expand_dims(num_negatives, 1)
    column = ops.take_along_axis(order, ops.minimum(position, num_refs - 1), axis=1)
    semi_hard = ops.take_along_axis(distances, column, axis=1)
    easiest, has_negative = easiest_negative(distances, negative_mask)
    # tensorflow-addons' masked maximum over an empty mask is the row minimum.
    fallback = ops.where(has_negative, easiest, ops.min(distances, axis=1))
    chosen = ops.where(has_semi_hard, semi_hard, ops.expand_dims(fallback, 1))
    return chosen, has_negative


def hardest_negative(distances, negative_mask):
    """Per anchor, the smallest negative distance; `(values (B,), has_negative (B,))`."""
    has = ops.any(negative_mask, axis=1)
    return dml_ops.masked_min(distances, negative_mask, axis=1), has


def easiest_negative(distances, negative_mask):
    """Per anchor, the largest negative distance; `(values (B,), has_negative (B,))`."""
    has = ops.any(negative_mask, axis=1)
    return dml_ops.masked_max(distances, negative_mask, axis=1), has


def select_positives(distances, positive_mask, mode: str = "all"):
    """The (anchor, positive) pairs a triplet loss uses, as a `(B, R)` bool mask.

    Args:
        distances: `(B, R)` distances.
        positive_mask: `(B, R)` bool.
        mode: `"all"` keeps every positive pair; `"hard"` keeps, per anchor,
            the farthest positive; `"easy"` the closest one.
    """
    if mode not in POSITIVE_MINING:
        raise ValueError(f"`positive_mining` must be one of {POSITIVE_MINING}, got {mode!r}.")
    if mode == "all":
        return ops.cast(positive_mask, "bool")
    scores = distances if mode == "hard" else -distances
    masked = ops.where(positive_mask, scores, ops.full_like(scores, dml_ops._NEG_LARGE))
    best = ops.argmax(ops.stop_gradient(masked), axis=1)
    one_hot = ops.cast(ops.one_hot(best, ops.shape(distances)[1]), "bool")
    return ops.logical_and(one_hot, ops.any(positive_mask, axis=1, keepdims=True))


def sum_of_hinges_over_negatives(distances, negative_mask, thresholds):
    """For each (a, p): `sum_n max(thresholds[a, p] - d(a, n), 0)` over negatives n, and the count.

    Used by batch-all triplet mining with `thresholds = d(a, p) + margin`.
    Sorting the negatives once and using prefix sums keeps it O(B·R log R)
    instead of the B·R·R tensor of the direct formula.

    Returns:
        `(sums, counts)`, both `(B, R)`; `counts` (float) is the number of
        negatives with a positive hinge.
    """
    sorted_values, _ = sorted_negatives(distances, negative_mask, at_least=thresholds)
    count = dml_ops.batched_searchsorted(sorted_values, thresholds, side="left")
    zeros = ops.zeros_like(sorted_values[:, :1])
    prefix = ops.concatenate([zeros, ops.cumsum(sorted_values, axis=1)], axis=1)
    prefix_at_count = ops.take_along_axis(prefix, count, axis=1)
    count = ops.cast(count, distances.dtype)
    return count * thresholds - prefix_at_count, count


# Largest number of queries (positives) per anchor for which `semi_hard_terms`
# uses bucketed segment minima instead of sorting every row of the distance matrix.
SEMI_HARD_MAX_QUERIES = 64
# Largest number of queries per anchor for which `semi_hard_terms` picks the
# semi-hard negatives by a compiled (XLA) masked minimum over (B, R, K) on
# TensorFlow, instead of bucketing; 0 turns it off. (On JAX the same masked
# minimum was slower than bucketing at B=1024, so JAX always buckets.)
SEMI_HARD_FUSED_QUERIES = 16


def semi_hard_terms(distances, negative_mask, query_mask, term, max_queries=None):
    """`(sum, count)` of `term(d(a, p), d(a, n*))` over the (a, p) in `query_mask`.

    `n*` is the semi-hard negative of `semi_hard_negatives` (the closest
    negative strictly farther than p, else the anchor's farthest negative, else
    the row minimum), with the same values and the same gradient routing.

    When every anchor has at most `max_queries` (default
    `SEMI_HARD_MAX_QUERIES`) queries, which is the case of M-per-class batches,
    no row is sorted: each anchor's K query distances are taken with `top_k`,
    every negative is put into the bucket between two consecutive query
    distances (a search in K values), and a segment minimum per bucket plus a
    suffix minimum over the K + 1 buckets give every query its semi-hard
    negative: O(B·R log K) time, O(B·R) memory. Otherwise each row's negatives
    are sorted (`semi_hard_negatives`). On TensorFlow, when every anchor has
    at most `SEMI_HARD_FUSED_QUERIES` queries, the semi-hard columns come
    instead from one masked minimum over `(B, R, K)` compiled by XLA (fused
    into loops, nothing of that size is built; no gradient is needed for an
    index), and the loss gathers the chosen distances as in the other paths.
    The choice is made at run time (`ops.cond`) from the batch's largest
    query count.

    Args:
        distances: `(B, R)` anchor-to-reference distances.
        negative_mask: `(B, R)` bool.
        query_mask: `(B, R)` bool, the (a, p) pairs to sum over.
        term: `term(positive_distances, negative_distances)`, elementwise.
        max_queries: the K above; `0` always sorts.

    Returns:
        `(sum, count)`: float scalars.
    """
    distances = ops.convert_to_tensor(distances)
    query_mask = ops.cast(query_mask, "bool")
    negative_mask = ops.cast(negative_mask, "bool")
    cap = SEMI_HARD_MAX_QUERIES if max_queries is None else int(max_queries)

    def sorted_path():
        negative_distances, _ = semi_hard_negatives(distances, negative_mask, query_mask)
        values = term(distances, negative_distances)
        return dml_ops.masked_sum(values, query_mask), dml_ops.masked_count(query_mask)

    num_refs = distances.shape[1]
    # k: queries kept per anchor, at most `cap` (static) and the number of columns,
    # which is a tensor only in TensorFlow graphs of unknown shape.
    static_k = cap if num_refs is None else min(cap, num_refs)
    if static_k < 1:
        return sorted_path()
    k = ops.minimum(cap, ops.shape(distances)[1]) if num_refs is None else static_k

    def bucket_path():
        return _semi_hard_terms_bucketed(distances, negative_mask, query_mask, term, k, static_k)

    most_queries = ops.max(ops.sum(ops.cast(query_mask, "int32"), axis=1))
    fused_k = min(SEMI_HARD_FUSED_QUERIES, static_k)
    if fused_k < 1 or keras.backend.backend() != "tensorflow":
        return ops.cond(most_queries <= k, bucket_path, sorted_path)

    def fused_path():
        return _semi_hard_terms_fused(distances, negative_mask, query_mask, term, fused_k)

    return ops.cond(
        most_queries <= fused_k,
        fused_path,
        lambda: ops.cond(most_queries <= k, bucket_path, sorted_path),
    )


def _semi_hard_terms_fused(distances, negative_mask, query_mask, term, k):
    """`semi_hard_terms` for at most `k` (a Python int) queries per anchor, by a masked minimum.

    Only the chosen columns come from the compiled selection (no gradient
    there); the loss then gathers `d(a, p)` and `d(a, n*)` exactly as the
    bucketed path does, so values and gradients are the same.
    """
    sd = ops.stop_gradient(distances)
    filler = ops.stop_gradient(_filler(distances))
    width = ops.shape(distances)[1]
    static = distances.shape[1] is not None
    top, query_columns = ops.top_k(
        ops.where(query_mask, -sd, -filler), k if static else ops.minimum(k, width)
    )
    query_sorted = -top
    if not static:  # pad to k columns: padded queries are invalid and find no negative
        pad = k - ops.shape(top)[1]
        query_sorted = ops.pad(query_sorted, [[0, 0], [0, pad]], constant_values=filler)
        query_columns = ops.pad(query_columns, [[0, 0], [0, pad]])
    valid = ops.logical_and(
        ops.take_along_axis(query_mask, query_columns, axis=1), query_sorted < filler
    )
    has_semi_hard, column = _xla_masked_minimum()(sd, query_sorted, negative_mask)
    chosen = (query_columns, valid, has_semi_hard, column)
    return _chosen_terms(distances, negative_mask, chosen, term)


def _masked_minimum(sd, query_sorted, negative_mask):
    """Per (anchor a, rank r): the lowest column of the smallest negative farther than query r.

    For float32 and narrower distances, one reduction over `(B, K, R)` of
    exact int64 keys `(value, column)` (the value's order in the high bits,
    the column in the low ones), along the contiguous reference axis; other
    dtypes take two reductions (value, then the lowest column holding it).
    XLA fuses either into loops without building the `(B, K, R)` tensor.

    Returns:
        `(has_semi_hard (B, K) bool, column (B, K) int32)`, column 0 where none.
    """
    if keras.backend.standardize_dtype(sd.dtype) in ("float16", "bfloat16", "float32"):
        return _keyed_masked_minimum(sd, query_sorted, negative_mask)
    num_refs = ops.shape(sd)[1]
    farther = ops.logical_and(
        ops.expand_dims(negative_mask, 2),
        ops.expand_dims(sd, 2) > ops.expand_dims(query_sorted, 1),
    )
    values = ops.expand_dims(sd, 2)
    inf = ops.convert_to_tensor(float("inf"), sd.dtype)
    minimum = ops.min(ops.where(farther, values, inf), axis=1)  # (B, K)
    columns = ops.reshape(ops.arange(num_refs, dtype="int32"), (1, -1, 1))
    is_min = ops.logical_and(farther, values == ops.expand_dims(minimum, 1))
    column = ops.min(ops.where(is_min, columns, num_refs), axis=1)
    has_semi_hard = column < num_refs
    return has_semi_hard, ops.where(has_semi_hard, column, 0)


def _keyed_masked_minimum(sd, query_sorted, negative_mask):
    """`_masked_minimum` for float32 and narrower: one int64 minimum over `(B, K, R)`."""
    import tensorflow as tf

    value_keys = dml_ops._monotone_int_keys(sd)  # (B, R), the values' order and ties
    query_keys = dml_ops._monotone_int_keys(query_sorted)  # (B, K)
    keys = _negative_column_keys(value_keys, negative_mask)
    farther = value_keys[:, None, :] > query_keys[:, :, None]  # (B, K, R), fused away
    minima = tf.reduce_min(tf.where(farther, keys[:, None, :], _NO_KEY), axis=2)
    return _decode_column_keys(minima)


# The (value, column) key of "no negative": larger than every key.
_NO_KEY = 2**63 - 1


def _negative_column_keys(value_keys, negative_mask):
    """TF: `(B, R)` int64 keys ordering the negatives by value, then by lowest column.

    `value_keys` are `ops._monotone_int_keys` of the distances (in [0, 2**32));
    non-negatives get `_NO_KEY`.
    """
    import tensorflow as tf

    columns = tf.cast(tf.range(tf.shape(value_keys)[1]), tf.int64)[None, :]
    # In int32 range before the shift, so that value * 2**32 + column fits in int64.
    keys = (value_keys - 2**31) * 2**32 + columns
    return tf.where(negative_mask, keys, tf.constant(_NO_KEY, tf.int64))


def _decode_column_keys(minima):
    """TF: `(found, column int32)` of minimum keys; column 0 where no negative was found."""
    import tensorflow as tf

    found = minima < _NO_KEY
    column = tf.cast(tf.bitwise.bitwise_and(minima, 2**32 - 1), tf.int32)
    return found, tf.where(found, column, tf.zeros_like(column))


def _fallback_negative(distances, negative_mask):
    """Per anchor: its farthest negative, else (no negative) its smallest distance (addons)."""
    easiest, has_negative = easiest_negative(distances, negative_mask)
    return ops.where(has_negative, easiest, ops.min(distances, axis=1))


_FALLBACK = []


def _xla_fallback():
    """`_fallback_negative` compiled by XLA, its gradient too (built once).

    The two row reductions' gradients (ties share it equally, as in
    tensorflow-addons) are otherwise five `(B, R)` kernels each; compiled,
    they fuse into a few loops.
    """
    if not _FALLBACK:
        import tensorflow as tf

        _FALLBACK.append(tf.function(_fallback_negative, jit_compile=True, reduce_retracing=True))
    return _FALLBACK[0]


_COMPILED = []


def _xla_masked_minimum():
    """`_masked_minimum` as a TensorFlow function compiled by XLA (built once).

    It has no gradient to compile (its outputs are indices), so it compiles
    even where the loss as a whole does not (its `ops.cond` gradient).
    """
    if not _COMPILED:
        import tensorflow as tf

        _COMPILED.append(tf.function(_masked_minimum, jit_compile=True, reduce_retracing=True))
    return _COMPILED[0]


def _semi_hard_terms_bucketed(distances, negative_mask, query_mask, term, k, static_k):
    """`semi_hard_terms` for at most `k` (<= `static_k`, a Python int) queries per anchor."""
    num_anchors = ops.shape(distances)[0]
    sd = ops.stop_gradient(distances)
    filler = ops.stop_gradient(_filler(distances))
    # The k smallest query distances of each anchor, ascending; padding is `filler`.
    top, query_columns = ops.top_k(ops.where(query_mask, -sd, -filler), k)
    query_sorted = -top
    valid = ops.take_along_axis(query_mask, query_columns, axis=1)
    # count[a, n] = #queries of a strictly closer than n: n is farther than the
    # query of rank r exactly when count > r, so rank r's semi-hard negative is
    # the smallest negative with count in r + 1 .. k.
    count = dml_ops.batched_searchsorted(query_sorted, sd, side="left")
    count = ops.where(negative_mask, count, ops.zeros_like(count))  # bucket 0 is never read
    rows = ops.expand_dims(ops.arange(num_anchors, dtype="int32"), 1)
    segment = ops.reshape(rows * (k + 1) + count, (-1,))
    num_segments = num_anchors * (k + 1)
    if keras.backend.backend() == "tensorflow" and keras.backend.standardize_dtype(
        sd.dtype
    ) in ("float16", "bfloat16", "float32"):
        has_semi_hard, column = _tf_bucket_minima(
            sd, negative_mask, segment, num_segments, k, static_k
        )
    else:
        has_semi_hard, column = _bucket_minima(
            sd, negative_mask, filler, segment, num_segments, k, static_k
        )
    chosen = (query_columns, valid, has_semi_hard, column)
    return _chosen_terms(distances, negative_mask, chosen, term)


def _chosen_terms(distances, negative_mask, chosen, term):
    """`(sum, count)` of `term` over the valid (anchor, query rank) slots, given the chosen columns.

    `chosen` is `(query_columns, valid, has_semi_hard, column)`, each `(B, K)`.

    The gradient reaches `d(a, p)` and `d(a, n*)` through gathers only; a slot
    without a semi-hard negative takes the anchor's farthest negative, else
    its row minimum (tensorflow-addons' empty masked maximum).
    """
    query_columns, valid, has_semi_hard, column = chosen
    semi_hard = ops.take_along_axis(distances, column, axis=1)
    if keras.backend.backend() == "tensorflow":
        fallback = _xla_fallback()(distances, negative_mask)
    else:
        fallback = _fallback_negative(distances, negative_mask)
    chosen = ops.where(has_semi_hard, semi_hard, ops.expand_dims(fallback, 1))
    positive = ops.take_along_axis(distances, query_columns, axis=1)
    values = term(positive, chosen)
    return dml_ops.masked_sum(values, valid), dml_ops.masked_count(valid)


def _bucket_minima(sd, negative_mask, filler, segment, num_segments, k, static_k):
    """Per (anchor, rank r): (a negative in buckets r+1..k, lowest column of their minimum)."""
    num_anchors, num_refs = ops.shape(sd)[0], ops.shape(sd)[1]
    negative_values = ops.where(negative_mask, sd, ops.ones_like(sd) * filler)
    flat_values = ops.reshape(negative_values, (-1,))
    bucket_min = ops.segment_min(flat_values, segment, num_segments=num_segments)
    bucket_min = ops.minimum(bucket_min, filler)  # empty segments
    # The lowest column holding each bucket's minimum (a stable sort's choice).
    is_min = ops.logical_and(
        ops.reshape(negative_mask, (-1,)), flat_values <= ops.take(bucket_min, segment)
    )
    columns = ops.reshape(
        ops.broadcast_to(ops.arange(num_refs, dtype="int32")[None, :], ops.shape(sd)), (-1,)
    )
    bucket_col = ops.segment_min(
        ops.where(is_min, columns, ops.full_like(columns, num_refs)),
        segment,
        num_segments=num_segments,
    )
    bucket_min = ops.reshape(bucket_min, (num_anchors, k + 1))
    bucket_col = ops.reshape(ops.minimum(bucket_col, num_refs), (num_anchors, k + 1))
    # Suffix minimum over buckets (value, then column), by doubling shifts.
    shift = 1
    while shift < static_k + 1:
        later_min = ops.concatenate(
            [bucket_min[:, shift:], ops.ones_like(bucket_min[:, :shift]) * filler], axis=1
        )
        later_col = ops.concatenate(
            [bucket_col[:, shift:], ops.full_like(bucket_col[:, :shift], num_refs)], axis=1
        )
        take = ops.logical_or(
            later_min < bucket_min,
            ops.logical_and(later_min == bucket_min, later_col < bucket_col),
        )
        bucket_min = ops.where(take, later_min, bucket_min)
        bucket_col = ops.where(take, later_col, bucket_col)
        shift *= 2
    has_semi_hard = bucket_min[:, 1:] < filler
    column = ops.where(has_semi_hard, bucket_col[:, 1:], ops.zeros_like(bucket_col[:, 1:]))
    return has_semi_hard, column


def _tf_bucket_minima(sd, negative_mask, segment, num_segments, k, static_k):
    """`_bucket_minima` on TensorFlow: one int64 segment minimum of (value, column) keys."""
    import tensorflow as tf

    num_anchors = tf.shape(sd)[0]
    keys = _negative_column_keys(dml_ops._monotone_int_keys(sd), negative_mask)
    none = tf.constant(_NO_KEY, tf.int64)
    minima = tf.math.unsorted_segment_min(tf.reshape(keys, [-1]), segment, num_segments)
    minima = tf.reshape(minima, tf.stack([num_anchors, k + 1]))  # empty buckets: int64 max
    shift = 1
    while shift < static_k + 1:  # suffix minimum over the buckets
        later = tf.concat([minima[:, shift:], tf.fill(tf.shape(minima[:, :shift]), none)], 1)
        minima = tf.minimum(minima, later)
        shift *= 2
    return _decode_column_keys(minima[:, 1:])
