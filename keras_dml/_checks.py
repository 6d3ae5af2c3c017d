"""Argument and input checks shared by every module: numbers, counts and class labels.

One rule per kind of value, one message shape: ``ValueError("`arg` must be
..., got ...")`` naming the argument. Constructors check their options here
once; per-step inputs (labels, embeddings) are checked once per step by the
caller that receives them first (`MetricLoss.__call__`, a head's `call`, a
model's `compute_loss`).

Labels have one rule: an integer dtype, or a float dtype holding whole
numbers (Keras casts `y_true` to the loss dtype before `Loss.call`, and
builds distributed models with float labels). A caller that receives labels
straight from the user and never from Keras (LoCo's own training step) may
refuse float dtypes altogether with `whole_floats=False`.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops


def is_number(value) -> bool:
    """True for a Python or NumPy real number; False for bools and everything else."""
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def is_integer(value) -> bool:
    """True for a Python or NumPy integer; False for bools and everything else."""
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def check_positive(value, arg: str) -> float:
    """Returns `value` as a float; raises `ValueError` naming `arg` unless a finite number > 0."""
    if not is_number(value):
        raise ValueError(f"`{arg}` must be a number, got {value!r}.")
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"`{arg}` must be > 0, got {value}.")
    return float(value)


def check_non_negative(value, arg: str) -> float:
    """Returns `value` as a float; raises `ValueError` naming `arg` unless a finite number >= 0."""
    if not is_number(value):
        raise ValueError(f"`{arg}` must be a number, got {value!r}.")
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"`{arg}` must be >= 0, got {value}.")
    return float(value)


def check_positive_int(value, arg: str, upper: int | None = None) -> int:
    """Returns `value` as an int; raises `ValueError` unless an integer in `[1, upper]`."""
    if not is_integer(value) or value < 1:
        raise ValueError(f"`{arg}` must be a positive integer, got {value!r}.")
    if upper is not None and value > upper:
        raise ValueError(f"`{arg}` must be at most {upper} here, got {value}.")
    return int(value)


def check_non_negative_int(value, arg: str) -> int:
    """Returns `value` as an int; raises `ValueError` naming `arg` unless an integer >= 0."""
    if not is_integer(value) or value < 0:
        raise ValueError(f"`{arg}` must be an integer >= 0, got {value!r}.")
    return int(value)


def concrete_value(x) -> np.ndarray | None:
    """Returns `x` as a NumPy array when its value is known now, else None.

    Values are known in eager execution; inside `tf.function`, `jax.jit` or a
    symbolic Keras graph they are not, and the value checks are skipped.
    """
    if isinstance(x, (np.ndarray, np.generic, list, tuple, int, float)):
        return np.asarray(x)
    if isinstance(x, keras.KerasTensor):
        return None
    try:
        return np.asarray(ops.convert_to_numpy(x))
    except (TypeError, ValueError, AttributeError, NotImplementedError, RuntimeError):
        return None


def value_known(x) -> bool:
    """Whether the values of tensor `x` can be read now (eagerly), without running a graph.

    False for a symbolic Keras tensor, inside `tf.function` and for a JAX
    tracer (`jax.jit`); True for NumPy values and eager tensors.
    """
    if isinstance(x, (np.ndarray, np.generic, list, tuple, int, float)):
        return True
    if isinstance(x, keras.KerasTensor):
        return False
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.executing_eagerly()
    if backend == "jax":
        import jax

        return not isinstance(x, jax.core.Tracer)
    return True


def all_finite(x) -> bool | None:
    """Whether every value of `x` is finite (no NaN or Inf), or None when the values are unknown.

    Runs where `x` lives and reads one scalar on the host, not `x` itself: a
    NaN or Inf anywhere makes the sum of `x` NaN or Inf, so a finite sum
    settles it with one reduction; only a non-finite sum (a NaN or Inf, or
    finite values whose sum overflows) is re-checked elementwise. Values are
    unknown inside `tf.function`, `jax.jit` or a symbolic Keras graph (None):
    checks that must run there are graph ops (see
    `losses.base._run_time_checks`). `benchmarks/bench_check_cost.py`
    measures it against a copy to the host.
    """
    if _holds_everywhere(x, lambda v: ops.isfinite(ops.sum(v))):
        return True
    return _holds_everywhere(x, ops.isfinite)


def is_whole_number(x):
    """Elementwise: `x` is a finite whole number (a valid float class label)."""
    return ops.logical_and(ops.isfinite(x), ops.equal(x, ops.round(x)))


def _holds_everywhere(x, elementwise) -> bool | None:
    """`all(elementwise(x))` as a Python bool (one scalar read on the host), or None.

    None when the values of `x` are unknown now (see `value_known`).
    """
    if not value_known(x):
        return None
    try:
        return bool(ops.all(elementwise(ops.stop_gradient(ops.convert_to_tensor(x)))))
    except (TypeError, ValueError, AttributeError, NotImplementedError, RuntimeError):
        return None


def dtype_name(x) -> str:
    """The standard Keras name of `x`'s dtype (`"float32"`, `"int64"`, ...)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        dtype = np.asarray(x).dtype
    try:
        return keras.backend.standardize_dtype(dtype)
    except ValueError:
        return str(dtype)


def check_labels_dtype(labels, arg: str = "y_true", whole_floats: bool = True) -> None:
    """Raises `ValueError` unless `labels` hold integer class ids.

    Float tensors are accepted when every value is a whole number (see the
    module docstring; `whole_floats=False` refuses them); the value check
    runs only when values are concrete.
    """
    dtype = dtype_name(labels)
    if "int" in dtype:
        return
    if "float" not in dtype or not whole_floats:
        raise ValueError(f"`{arg}` must hold integer class labels, got dtype {dtype}.")
    if _holds_everywhere(labels, is_whole_number) in (None, True):
        return
    # Only a failing batch is copied to the host, to name a value in the message.
    value = concrete_value(labels)
    if value is not None and value.size:
        raise ValueError(
            f"`{arg}` must hold integer class labels, got non-integer values such as "
            f"{value[np.flatnonzero(value != np.round(value))[:1]].tolist()}."
        )


def labels_vector(labels, arg: str = "y_true", rows=None, rows_arg: str = "y_pred"):
    """`labels` of shape `(B,)` or `(B, 1)` as a `(B,)` tensor (dtype unchanged).

    Checks the shape only (see `check_labels_dtype` for the values).

    Args:
        labels: the labels.
        arg: their argument name, for messages.
        rows: the number of rows they label (e.g. `embeddings.shape[0]`), or
            None; a static mismatch raises.
        rows_arg: the name of what `rows` counts.
    """
    labels = ops.convert_to_tensor(labels)
    shape = tuple(labels.shape)
    if len(shape) == 2 and shape[1] in (1, None):
        labels = ops.reshape(labels, (-1,))
    elif len(shape) != 1:
        raise ValueError(
            f"`{arg}` must be integer class labels of shape (batch,) or (batch, 1), got shape "
            f"{shape}."
        )
    n_labels = labels.shape[0]
    if n_labels is not None and rows is not None and n_labels != rows:
        raise ValueError(
            f"`{arg}` has {n_labels} labels but `{rows_arg}` has {rows} embeddings; they must "
            "match."
        )
    return labels
