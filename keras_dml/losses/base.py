"""What every metric loss shares: input checks, label masks and the Loss base class.

A metric loss is a plain function `fn(labels, embeddings, **options)` that
returns a scalar, wrapped by a small `MetricLoss` subclass whose constructor
stores `options`, so that `get_config()` lists exactly them (Keras's own
`LossFunctionWrapper` pattern).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops


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


def _dtype_name(x) -> str:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        dtype = np.asarray(x).dtype
    try:
        return keras.backend.standardize_dtype(dtype)
    except ValueError:
        return str(dtype)


def check_labels_dtype(labels, arg: str = "y_true") -> None:
    """Raises `ValueError` unless `labels` hold integer class ids.

    Float tensors are accepted when every value is a whole number (Keras casts
    `y_true` to the loss dtype before `call`); the value check runs only when
    values are concrete.
    """
    dtype = _dtype_name(labels)
    if "int" in dtype:
        return
    if "float" not in dtype:
        raise ValueError(
            f"`{arg}` must hold integer class labels, got dtype {dtype}."
        )
    value = concrete_value(labels)
    is_whole = np.isfinite(value) & (value == np.round(value)) if value is not None else None
    if value is not None and value.size and not np.all(is_whole):
        raise ValueError(
            f"`{arg}` must hold integer class labels, got non-integer values such as "
            f"{value[np.flatnonzero(value != np.round(value))[:1]].tolist()}."
        )


def validate_inputs(labels, embeddings, labels_arg: str = "y_true", embeddings_arg: str = "y_pred"):
    """Checks ranks, batch sizes and values; returns `(labels (B,) int32, embeddings (B, D) float)`.

    Half-precision embeddings are computed in float32.

    Raises:
        ValueError: naming the argument, for a wrong rank, mismatched batch
            sizes, non-integer labels, or (when values are concrete) an empty
            batch or NaN/Inf embeddings.
    """
    check_labels_dtype(labels, labels_arg)
    embeddings = ops.convert_to_tensor(embeddings)
    if ops.dtype(embeddings) in ("float16", "bfloat16") or "float" not in ops.dtype(embeddings):
        embeddings = ops.cast(embeddings, "float32")
    labels = ops.convert_to_tensor(labels)
    if len(embeddings.shape) != 2:
        raise ValueError(
            f"`{embeddings_arg}` must be embeddings of shape (batch, dim), got shape "
            f"{tuple(embeddings.shape)}."
        )
    label_shape = tuple(labels.shape)
    if len(label_shape) == 2 and label_shape[1] == 1:
        labels = ops.reshape(labels, (-1,))
    elif len(label_shape) != 1:
        raise ValueError(
            f"`{labels_arg}` must be integer labels of shape (batch,) or (batch, 1), got shape "
            f"{label_shape}."
        )
    n_labels, n_embeddings = labels.shape[0], embeddings.shape[0]
    if n_labels is not None and n_embeddings is not None and n_labels != n_embeddings:
        raise ValueError(
            f"`{labels_arg}` has {n_labels} labels but `{embeddings_arg}` has {n_embeddings} "
            "embeddings; they must match."
        )
    value = concrete_value(embeddings)
    if value is not None:
        if value.shape[0] == 0:
            raise ValueError(f"`{embeddings_arg}` is an empty batch; a metric loss needs pairs.")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"`{embeddings_arg}` contains NaN or Inf.")
    labels = ops.cast(labels, "int32")
    return labels, embeddings


def label_masks(labels, ref_labels=None):
    """Boolean `(B, R)` masks of positive and negative pairs.

    Args:
        labels: `(B,)` int labels of the anchors.
        ref_labels: `(R,)` labels of the references; defaults to `labels`, in
            which case an anchor is never its own positive.

    Returns:
        `(positive_mask, negative_mask)`.
    """
    refs = labels if ref_labels is None else ref_labels
    same = ops.equal(ops.expand_dims(labels, 1), ops.expand_dims(refs, 0))
    negative = ops.logical_not(same)
    if ref_labels is None:
        n = ops.shape(labels)[0]
        same = ops.logical_and(same, ops.logical_not(ops.cast(ops.eye(n), "bool")))
    return same, negative


class MetricLoss(keras.losses.Loss):
    """Base class: a `keras.losses.Loss` around a metric-loss function.

    Subclasses call `super().__init__(fn, name=..., reduction=..., dtype=...,
    **options)`; `call` validates `y_true`/`y_pred` and returns
    `fn(labels, embeddings, **options)`, a scalar. `get_config` returns the
    options, so every subclass round-trips through `from_config` and `.keras`
    files without writing its own.
    """

    def __init__(
        self,
        fn,
        name: str | None = None,
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
        **options: Any,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.fn = fn
        self._options = options

    def __call__(self, y_true, y_pred, sample_weight=None):
        # Keras casts y_true to the loss dtype before `call`; check the labels first.
        check_labels_dtype(y_true, "y_true")
        return super().__call__(y_true, y_pred, sample_weight=sample_weight)

    def call(self, y_true, y_pred):
        labels, embeddings = validate_inputs(y_true, y_pred)
        return self.fn(labels, embeddings, **self._options)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(self._options)
        return config
