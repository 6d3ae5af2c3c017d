"""Numerically safe reductions shared by every loss.

All helpers take a boolean `mask` beside the values and never let a masked-out
entry reach `exp`, `log` or a division, so empty rows give finite values and
finite gradients.

Example:

>>> import numpy as np
>>> from keras_dml import ops as dml_ops
>>> x = np.array([[1.0, 2.0], [3.0, 4.0]], "float32")
>>> mask = np.array([[True, False], [False, False]])
>>> np.asarray(dml_ops.masked_mean(x, mask)).item()
1.0
"""

from __future__ import annotations

import keras
from keras import ops

# Stand-in for -inf that stays finite through subtraction and exp.
_NEG_LARGE = -1e9


def masked_sum(values, mask, axis=None, keepdims: bool = False):
    """Sum of `values` where `mask` is True."""
    mask = ops.cast(mask, "bool")
    return ops.sum(ops.where(mask, values, ops.zeros_like(values)), axis=axis, keepdims=keepdims)


def masked_count(mask, axis=None, keepdims: bool = False, dtype: str = "float32"):
    """Number of True entries of `mask`, as a float tensor."""
    return ops.sum(ops.cast(mask, dtype), axis=axis, keepdims=keepdims)


def masked_mean(values, mask, axis=None, keepdims: bool = False):
    """Mean of `values` where `mask` is True; 0 where nothing is selected."""
    total = masked_sum(values, mask, axis=axis, keepdims=keepdims)
    count = masked_count(mask, axis=axis, keepdims=keepdims, dtype=values.dtype)
    return total / ops.maximum(count, 1.0)


def masked_max(values, mask, axis=-1, keepdims: bool = False):
    """Max of `values` over `mask`; `_NEG_LARGE` where the mask is empty."""
    mask = ops.cast(mask, "bool")
    filler = ops.full_like(values, _NEG_LARGE)
    return ops.max(ops.where(mask, values, filler), axis=axis, keepdims=keepdims)


def masked_min(values, mask, axis=-1, keepdims: bool = False):
    """Min of `values` over `mask`; `-_NEG_LARGE` where the mask is empty."""
    return -masked_max(-values, mask, axis=axis, keepdims=keepdims)


def masked_logsumexp(values, mask, axis=-1, keepdims: bool = False, add_one: bool = False):
    """`log(sum_{mask} exp(values))`, or `log(1 + sum ...)` with `add_one`.

    With `add_one=True` (the softplus form used by lifted-structure,
    multi-similarity and circle losses) an empty mask gives exactly 0.
    Without it, an empty mask gives `_NEG_LARGE`; callers mask such rows out.
    """
    values = ops.convert_to_tensor(values)
    mask = ops.cast(mask, "bool")
    shift = ops.max(ops.where(mask, values, ops.full_like(values, _NEG_LARGE)), axis=axis,
                    keepdims=True)
    if add_one:
        shift = ops.maximum(shift, 0.0)
    shift = ops.stop_gradient(shift)
    # Masked entries become exp(_NEG_LARGE) = 0 before exp, so they can neither
    # overflow nor send NaN through the gradient of `where`.
    exps = ops.exp(ops.where(mask, values - shift, ops.full_like(values, _NEG_LARGE)))
    total = ops.sum(exps, axis=axis, keepdims=True)
    if add_one:
        total = total + ops.exp(-shift)
    result = ops.log(ops.maximum(total, 1e-30)) + shift
    if not add_one:
        empty = ops.logical_not(ops.any(mask, axis=axis, keepdims=True))
        result = ops.where(empty, ops.full_like(result, _NEG_LARGE), result)
    if not keepdims:
        result = ops.squeeze(result, axis=axis)
    return result


def masked_log_softmax(values, mask, axis=-1):
    """Log-softmax of `values` over the entries where `mask` is True.

    This is the log-probability that softmax cross-entropy losses (N-pair,
    NT-Xent/InfoNCE, SupCon) read at their positive entries. Entries outside
    `mask` come out finite but meaningless, and receive no gradient through
    the normaliser; select them away (e.g. with `masked_mean`). A row with an
    empty mask gives finite values too.
    """
    values = ops.convert_to_tensor(values)
    return values - masked_logsumexp(values, mask, axis=axis, keepdims=True)


def batched_searchsorted(sorted_rows, values, side: str = "left"):
    """Row-wise `searchsorted`: for each row i, positions of `values[i]` in `sorted_rows[i]`.

    `keras.ops.searchsorted` only takes a 1-D sequence, so this dispatches to
    each backend's batched binary search (O(B * M log N), no (B, M, N) tensor).

    Args:
        sorted_rows: `(B, N)`, each row ascending.
        values: `(B, M)`.
        side: `"left"` (first index with `row[idx] >= v`) or `"right"`
            (first index with `row[idx] > v`).

    Returns:
        `(B, M)` int32 indices in `[0, N]`.
    """
    if side not in ("left", "right"):
        raise ValueError(f"`side` must be 'left' or 'right', got {side!r}.")
    backend = keras.backend.backend()
    sorted_rows = ops.stop_gradient(ops.convert_to_tensor(sorted_rows))
    values = ops.stop_gradient(ops.convert_to_tensor(values))
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.searchsorted(sorted_rows, values, side=side, out_type=tf.int32)
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        fn = jax.vmap(lambda row, v: jnp.searchsorted(row, v, side=side))
        return fn(sorted_rows, values).astype("int32")
    if backend == "torch":
        import torch

        return torch.searchsorted(
            sorted_rows.contiguous(), values.contiguous(), right=side == "right"
        ).to(torch.int32)
    # numpy and any other backend: one 1-D search per row.
    import numpy as np

    rows = ops.convert_to_numpy(sorted_rows)
    vals = ops.convert_to_numpy(values)
    out = np.stack([np.searchsorted(r, v, side=side) for r, v in zip(rows, vals, strict=True)])
    return ops.convert_to_tensor(out.astype("int32"))


def _monotone_int_keys(x):
    """TF: float32 -> int64 keys in [0, 2**32) with the same order and ties as `x`."""
    import tensorflow as tf

    x = tf.cast(x, tf.float32)
    x = tf.where(tf.equal(x, 0.0), tf.zeros_like(x), x)  # -0.0 ties with +0.0
    bits = tf.bitcast(x, tf.int32)
    # Negative floats order backwards as integers: flip their magnitude bits.
    bits = tf.where(bits < 0, tf.bitwise.bitwise_xor(bits, tf.constant(0x7FFFFFFF)), bits)
    return tf.cast(bits, tf.int64) + 2**31


def masked_batched_searchsorted(sorted_rows, values, mask, side: str = "left"):
    """`batched_searchsorted` where only the entries of `values` under `mask` are needed.

    Entries outside `mask` are 0. On TensorFlow with float32 or narrower inputs
    only the masked queries are searched: rows become one globally sorted
    sequence of exact integer keys `(row, value)`, searched once in 1-D. That
    is much faster than `tf.searchsorted` over all `B * M` queries when few are
    masked (the positives of a triplet batch). Other backends search all and
    mask.

    Args:
        sorted_rows: `(B, N)`, each row ascending, no NaN.
        values: `(B, M)`, no NaN.
        mask: `(B, M)` bool.
        side: `"left"` or `"right"`, as in `batched_searchsorted`.

    Returns:
        `(B, M)` int32 positions in `[0, N]`, 0 where `mask` is False.
    """
    if side not in ("left", "right"):
        raise ValueError(f"`side` must be 'left' or 'right', got {side!r}.")
    narrow = ("float16", "bfloat16", "float32")
    if (
        keras.backend.backend() != "tensorflow"
        or keras.backend.standardize_dtype(sorted_rows.dtype) not in narrow
        or keras.backend.standardize_dtype(values.dtype) not in narrow
    ):
        positions = batched_searchsorted(sorted_rows, values, side=side)
        return ops.where(mask, positions, ops.zeros_like(positions))
    import tensorflow as tf

    sorted_rows = tf.stop_gradient(sorted_rows)
    values = tf.stop_gradient(values)
    num_rows = tf.shape(sorted_rows, out_type=tf.int64)[0]
    row_length = tf.shape(sorted_rows, out_type=tf.int64)[1]
    row_offsets = tf.range(num_rows, dtype=tf.int64)[:, None] * 2**32
    haystack = tf.reshape(_monotone_int_keys(sorted_rows) + row_offsets, [-1])
    where = tf.where(mask)  # (K, 2) int64: (row, column)
    needles = tf.gather_nd(_monotone_int_keys(values), where) + where[:, 0] * 2**32
    found = tf.searchsorted(haystack, needles, side=side, out_type=tf.int64)
    positions = tf.cast(found - where[:, 0] * row_length, tf.int32)
    return tf.scatter_nd(where, positions, tf.shape(mask, out_type=tf.int64))
