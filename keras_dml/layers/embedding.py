"""Embedding layers: L2 normalisation and a Dense projection onto the unit sphere."""

from __future__ import annotations

import keras
from keras import ops

from keras_dml.distances import l2_normalize


@keras.saving.register_keras_serializable(package="keras_dml")
class L2Normalize(keras.layers.Layer):
    """Scales each embedding to unit L2 norm; put it last so cosine = dot product.

    An all-zero row stays zero (no NaN, finite gradient). Unlike Keras's
    `UnitNormalization`, which returns zeros when the squared norm overflows
    (rows of norm above ~1e19 in float32, above 256 in float16), rows of any
    finite size come out unit-length: the package's models and `MetricEmbedding`
    use this one normalisation.

    Args:
        axis: the axis to normalise (-1).
        epsilon: floor of the squared norm (1e-12).
        **kwargs: `keras.layers.Layer` arguments.

    Returns:
        A tensor shaped like the input.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> out = L2Normalize()(np.array([[3.0, 4.0]], "float32"))
    >>> keras.ops.convert_to_numpy(out).astype("float64").round(2).tolist()
    [[0.6, 0.8]]

    Reference: Wang et al., "NormFace: L2 Hypersphere Embedding for Face
    Verification", ACM MM 2017.
    """

    def __init__(self, axis: int = -1, epsilon: float = 1e-12, **kwargs):
        super().__init__(**kwargs)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"`axis` must be an integer, got {axis!r}.")
        if not isinstance(epsilon, (int, float)) or epsilon <= 0:
            raise ValueError(f"`epsilon` must be > 0, got {epsilon!r}.")
        self.axis = axis
        self.epsilon = float(epsilon)
        self.supports_masking = True

    def call(self, inputs):
        normalized = l2_normalize(inputs, axis=self.axis, epsilon=self.epsilon)
        return ops.cast(normalized, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"axis": self.axis, "epsilon": self.epsilon})
        return config


@keras.saving.register_keras_serializable(package="keras_dml")
class MetricEmbedding(keras.layers.Layer):
    """Projects features to `units`-dim embeddings on the unit sphere (Dense + L2 normalisation).

    Use it as the last layer of a backbone for any metric loss or margin head.

    Args:
        units: embedding dimension.
        normalize: L2-normalise the output (set False for losses that want raw
            embeddings).
        use_bias: whether the Dense projection has a bias.
        kernel_initializer: initializer of the projection kernel.
        bias_initializer: initializer of the bias.
        kernel_regularizer: optional regularizer of the projection kernel.
        **kwargs: `keras.layers.Layer` arguments.

    Returns:
        `(batch, units)` embeddings.

    Example:

    >>> import keras
    >>> backbone = keras.Sequential([keras.Input((64,)), MetricEmbedding(16)])
    >>> tuple(backbone.output_shape)
    (None, 16)

    Reference: Schroff et al., "FaceNet: A Unified Embedding for Face
    Recognition and Clustering", CVPR 2015 (L2-normalised embedding layer).
    """

    def __init__(
        self,
        units: int,
        normalize: bool = True,
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(units, bool) or not isinstance(units, int) or units < 1:
            raise ValueError(f"`units` must be a positive integer, got {units!r}.")
        self.units = units
        self.normalize = bool(normalize)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.dense = keras.layers.Dense(
            units,
            use_bias=use_bias,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            kernel_regularizer=self.kernel_regularizer,
            dtype=self.dtype_policy,
            name="projection",
        )

    def build(self, input_shape):
        self.dense.build(input_shape)

    def call(self, inputs):
        embeddings = self.dense(inputs)
        if self.normalize:
            embeddings = ops.cast(l2_normalize(embeddings), self.compute_dtype)
        return embeddings

    def compute_output_shape(self, input_shape):
        return (*tuple(input_shape)[:-1], self.units)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "normalize": self.normalize,
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            }
        )
        return config
