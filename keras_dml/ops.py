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
    sorted_rows = ops.stop_gradient(sorted_rows)
    values = ops.stop_gradient(values)
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
