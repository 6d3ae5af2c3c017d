"""What every margin head shares: normalised class centres and cosine logits.

A head is a Keras layer that owns the class centres. It is called as

- `head(embeddings, labels)` during training: the margin-adjusted, scaled
  logits, ready for `SparseCategoricalCrossentropy(from_logits=True)`;
- `head(embeddings)` at inference: the scaled cosine logits, no margin.

The centres are `head.kernel`, shape `(embedding_dim, num_classes *
centers_per_class)`, columns class-major: column `c * K + k` is centre `k` of
class `c`. Embeddings and centres are L2-normalised inside the head, so the
backbone may output raw features.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from keras_dml._checks import (  # noqa: F401  (check_positive: re-exported)
    check_labels_dtype,
    check_positive,
    concrete_value,
    is_integer,
    is_number,
    labels_vector,
)
from keras_dml.distances import l2_normalize


def _float32_policy_under_mixed_precision(dtype):
    """Returns `"float32"` when no dtype is given and the global policy is mixed.

    Logits scaled by s=64 and `exp` of them overflow float16, so heads compute
    in float32 unless the user asks otherwise (Keras's advice for the last
    layer of a mixed-precision model).
    """
    if dtype is None and keras.config.dtype_policy().compute_dtype in ("float16", "bfloat16"):
        return "float32"
    return dtype


def check_num_classes(num_classes, minimum: int = 2) -> int:
    """Raises `ValueError` unless `num_classes` is an integer >= `minimum`."""
    if not is_integer(num_classes):
        raise ValueError(f"`num_classes` must be an integer, got {num_classes!r}.")
    if num_classes < minimum:
        raise ValueError(f"`num_classes` must be at least {minimum}, got {num_classes}.")
    return int(num_classes)


def check_margin(margin, num_classes: int, maximum: float | None = None) -> float | list[float]:
    """Validates a margin: one number, or one number per class (dynamic margins).

    Returns:
        A float, or a list of `num_classes` floats.
    """
    if is_number(margin):
        values = np.asarray([margin], dtype="float64")
        result: float | list[float] = float(margin)
    elif isinstance(margin, (Sequence, np.ndarray)) and not isinstance(margin, str):
        values = np.asarray(margin, dtype="float64").reshape(-1)
        if values.shape[0] != num_classes:
            raise ValueError(
                f"`margin` must be a number or one value per class ({num_classes}), got "
                f"{values.shape[0]} values."
            )
        result = values.tolist()
    else:
        raise ValueError(
            f"`margin` must be a number or a list of per-class margins, got {margin!r}."
        )
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError("`margin` must be finite and >= 0.")
    if maximum is not None and np.any(values >= maximum):
        raise ValueError(f"`margin` must be < {maximum:.4f}, got max {values.max()}.")
    return result


@keras.saving.register_keras_serializable(package="keras_dml")
class CosineHead(keras.layers.Layer):
    """Subclass this to write a new head; it owns normalised centres and gives cosine logits.

    The base computes `cos θ` between each L2-normalised embedding and every
    L2-normalised centre, reduces the `centers_per_class` centres of a class to
    one similarity (`class_similarity`, the max by default, as in sub-center
    ArcFace) and hands it to `logits`, which subclasses override.

    Args:
        num_classes: number of classes C (>= 2).
        centers_per_class: centres K per class (1 for a plain softmax head).
        kernel_initializer: initializer of `kernel`.
        kernel_regularizer: optional regularizer of `kernel` (its loss is
            added to the model's), e.g. `keras_dml.regularizers`'
            `RegularFaceRegularizer`, which reads the columns as centres.
        **kwargs: `keras.layers.Layer` arguments (`name`, `dtype`, ...). Under
            a mixed-precision global policy the head defaults to float32.

    Returns:
        Logits of shape `(batch, num_classes)`, float32 by default.

    Example:

    >>> import numpy as np
    >>> head = CosineHead(num_classes=3)
    >>> tuple(head(np.eye(4, dtype="float32")).shape)
    (4, 3)

    Reference: Wang et al., "NormFace: L2 Hypersphere Embedding for Face
    Verification", ACM MM 2017 (normalised softmax).
    """

    def __init__(
        self,
        num_classes: int,
        centers_per_class: int = 1,
        kernel_initializer="glorot_uniform",
        kernel_regularizer=None,
        **kwargs,
    ):
        kwargs["dtype"] = _float32_policy_under_mixed_precision(kwargs.get("dtype"))
        super().__init__(**kwargs)
        self.num_classes = check_num_classes(num_classes)
        if (
            not is_integer(centers_per_class)
            or centers_per_class < 1
        ):
            raise ValueError(
                f"`centers_per_class` must be an integer >= 1, got {centers_per_class!r}."
            )
        self.centers_per_class = int(centers_per_class)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)

    def build(self, embeddings_shape, labels_shape=None):
        if len(embeddings_shape) != 2 or embeddings_shape[-1] is None:
            raise ValueError(
                f"`embeddings` must have shape (batch, dim) with a known dim, got "
                f"{tuple(embeddings_shape)}."
            )
        self.kernel = self.add_weight(
            name="kernel",
            shape=(int(embeddings_shape[-1]), self.num_classes * self.centers_per_class),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
        )

    def call(self, embeddings, labels=None, training=None):
        embeddings = self._check_embeddings(embeddings)
        similarity = self.class_similarity(self.center_cosine(embeddings))
        if labels is not None:
            labels = self._check_labels(labels, embeddings)
        return self.logits(similarity, labels, training=training)

    def center_cosine(self, embeddings):
        """Cosine between each embedding and each centre, `(batch, C * K)`, in [-1, 1]."""
        # l2_normalize computes half precision in float32: the logits never see float16
        # (and float64 embeddings keep float64).
        centers = l2_normalize(ops.convert_to_tensor(self.kernel), axis=0)
        embeddings = l2_normalize(embeddings)
        cosine = ops.matmul(embeddings, ops.cast(centers, embeddings.dtype))
        return ops.clip(cosine, -1.0, 1.0)

    def class_similarity(self, center_cosine):
        """Reduces the K centres of each class to one similarity: the closest centre."""
        if self.centers_per_class == 1:
            return center_cosine
        per_center = ops.reshape(center_cosine, (-1, self.num_classes, self.centers_per_class))
        return ops.max(per_center, axis=-1)

    def logits(self, similarity, labels=None, training=None):
        """Turns `(batch, C)` class similarities into logits; subclasses add the margin.

        The base applies no scale and no margin (cosine logits).
        """
        del labels, training
        return similarity

    def default_loss(self):
        """The loss `MarginModel.compile()` uses when none is given; None means softmax CE.

        Heads whose loss is not a softmax cross-entropy over their logits
        (e.g. `ProxyAnchor`) return a `keras.losses.Loss` over
        `(labels, head logits)` here.
        """
        return None

    def compute_output_shape(self, embeddings_shape, labels_shape=None):
        return (embeddings_shape[0], self.num_classes)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "centers_per_class": self.centers_per_class,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            }
        )
        return config

    # -- helpers shared by the margin heads ------------------------------------

    def _check_embeddings(self, embeddings):
        embeddings = ops.convert_to_tensor(embeddings)
        if len(embeddings.shape) != 2:
            raise ValueError(
                f"`embeddings` must have shape (batch, dim), got {tuple(embeddings.shape)}."
            )
        if "float" not in ops.dtype(embeddings):
            embeddings = ops.cast(embeddings, "float32")
        return embeddings

    def _check_labels(self, labels, embeddings):
        check_labels_dtype(labels, "labels")
        labels = labels_vector(labels, "labels", embeddings.shape[0], "embeddings")
        value = concrete_value(labels)
        out_of_range = value is not None and value.size and (
            value.min() < 0 or value.max() >= self.num_classes
        )
        if out_of_range:
            raise ValueError(
                f"`labels` must lie in [0, {self.num_classes}), got values in "
                f"[{value.min()}, {value.max()}]."
            )
        return ops.cast(labels, "int32")

    def _one_hot(self, labels, dtype="float32"):
        return ops.one_hot(labels, self.num_classes, dtype=dtype)

    @staticmethod
    def _target(similarity, labels):
        """The similarity to each sample's own class, `(batch,)`."""
        return ops.take_along_axis(similarity, ops.expand_dims(labels, 1), axis=1)[:, 0]

    def _with_target(self, similarity, labels, new_target):
        """`similarity` with the target entries replaced by `new_target`, others untouched."""
        is_target = ops.cast(self._one_hot(labels, "int32"), "bool")
        return ops.where(is_target, ops.expand_dims(new_target, 1), similarity)

    def _per_sample(self, value, labels):
        """A scalar hyperparameter, or the per-class one gathered at each sample's label."""
        if isinstance(value, list):
            return ops.take(ops.convert_to_tensor(np.asarray(value, "float32")), labels)
        return value
