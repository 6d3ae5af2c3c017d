"""Generalized-mean (GeM) pooling, the retrieval replacement for average pooling."""

from __future__ import annotations

import keras
from keras import ops

from keras_dml._checks import is_number


class _GeneralizedMeanPooling(keras.layers.Layer):
    """Shared body of the 1D and 2D layers: `(mean x^p)^(1/p)` over the spatial axes."""

    _spatial_rank: int = 0

    def __init__(
        self,
        p: float = 3.0,
        trainable_p: bool = False,
        epsilon: float = 1e-6,
        data_format: str | None = None,
        keepdims: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not is_number(p) or p <= 0:
            raise ValueError(f"`p` must be a number > 0, got {p!r}.")
        if not isinstance(epsilon, (int, float)) or epsilon <= 0:
            raise ValueError(f"`epsilon` must be > 0, got {epsilon!r}.")
        data_format = data_format or keras.config.image_data_format()
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(
                "`data_format` must be 'channels_last' or 'channels_first', got "
                f"{data_format!r}."
            )
        self.p = float(p)
        self.trainable_p = bool(trainable_p)
        self.epsilon = float(epsilon)
        self.data_format = data_format
        self.keepdims = bool(keepdims)
        self.input_spec = keras.layers.InputSpec(ndim=self._spatial_rank + 2)

    @property
    def _axes(self) -> list[int]:
        first = 1 if self.data_format == "channels_last" else 2
        return list(range(first, first + self._spatial_rank))

    def build(self, input_shape):
        if len(input_shape) != self._spatial_rank + 2:
            raise ValueError(
                f"`inputs` must have rank {self._spatial_rank + 2} (batch, spatial..., "
                f"channels), got shape {tuple(input_shape)}."
            )
        if self.trainable_p:
            self.p_weight = self.add_weight(
                name="p", shape=(), initializer=keras.initializers.Constant(self.p)
            )

    def call(self, inputs):
        # x^p overflows float16 for x > 40 (p = 3) and float32 for large p: pool in
        # float32, on x / max(x) (<= 1), then scale back; the identity
        # (mean x^p)^(1/p) = m (mean (x/m)^p)^(1/p) holds for any constant m > 0.
        x = ops.maximum(ops.cast(inputs, "float32"), self.epsilon)
        p = ops.cast(self.p_weight, "float32") if self.trainable_p else self.p
        peak = ops.stop_gradient(ops.max(x, axis=self._axes, keepdims=True))
        pooled = ops.mean(ops.power(x / peak, p), axis=self._axes, keepdims=True)
        pooled = ops.power(pooled, 1.0 / p) * peak
        if not self.keepdims:
            pooled = ops.squeeze(pooled, axis=self._axes)
        return ops.cast(pooled, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        for axis in reversed(self._axes):
            if self.keepdims:
                shape[axis] = 1
            else:
                del shape[axis]
        return tuple(shape)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "p": self.p,
                "trainable_p": self.trainable_p,
                "epsilon": self.epsilon,
                "data_format": self.data_format,
                "keepdims": self.keepdims,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_dml")
class GeneralizedMeanPooling1D(_GeneralizedMeanPooling):
    """Pools a sequence with the generalized mean `(mean x^p)^(1/p)`; p=1 is average, p→∞ max.

    Inputs are clamped at `epsilon` first (GeM assumes non-negative features,
    e.g. after ReLU). Computed in float32 under mixed precision.

    Args:
        p: the power (3, as in the paper).
        trainable_p: learn p as a weight `p`.
        epsilon: lower clamp of the inputs (1e-6).
        data_format: `"channels_last"` `(batch, steps, channels)` or
            `"channels_first"` `(batch, channels, steps)`; defaults to
            `keras.config.image_data_format()`.
        keepdims: keep the pooled axis with length 1.
        **kwargs: `keras.layers.Layer` arguments.

    Returns:
        `(batch, channels)` (or `(batch, 1, channels)` with `keepdims`).

    Example:

    >>> import numpy as np
    >>> x = np.array([[[1.0], [2.0]]], "float32")
    >>> round(float(GeneralizedMeanPooling1D(p=3.0)(x)[0, 0]), 4)
    1.651

    Reference: Radenović et al., "Fine-tuning CNN Image Retrieval with No
    Human Annotation", TPAMI 2018.
    """

    _spatial_rank = 1


@keras.saving.register_keras_serializable(package="keras_dml")
class GeneralizedMeanPooling2D(_GeneralizedMeanPooling):
    """Pools a feature map with the generalized mean `(mean x^p)^(1/p)`; use it for retrieval.

    Inputs are clamped at `epsilon` first (GeM assumes non-negative features,
    e.g. after ReLU). Computed in float32 under mixed precision.

    Args:
        p: the power (3, as in the paper).
        trainable_p: learn p as a weight `p`.
        epsilon: lower clamp of the inputs (1e-6).
        data_format: `"channels_last"` `(batch, h, w, channels)` or
            `"channels_first"` `(batch, channels, h, w)`; defaults to
            `keras.config.image_data_format()`.
        keepdims: keep the pooled axes with length 1.
        **kwargs: `keras.layers.Layer` arguments.

    Returns:
        `(batch, channels)` (or `(batch, 1, 1, channels)` with `keepdims`).

    Example:

    >>> import keras
    >>> inputs = keras.Input((7, 7, 32))
    >>> features = GeneralizedMeanPooling2D(trainable_p=True)(inputs)
    >>> tuple(features.shape)
    (None, 32)

    Reference: Radenović et al., "Fine-tuning CNN Image Retrieval with No
    Human Annotation", TPAMI 2018.
    """

    _spatial_rank = 2
