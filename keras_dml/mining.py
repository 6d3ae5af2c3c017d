"""Positive and negative mining on a pairwise distance matrix.

Every miner takes the `(B, R)` distance matrix between anchors and references
plus boolean positive/negative masks and returns distances (so gradients flow
through them) together with a validity mask. Nothing larger than `(B, R)` is
built: semi-hard and batch-all mining sort each anchor's negatives once and
binary-search the positives, O(B·R log R) time and O(B·R) memory.

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
