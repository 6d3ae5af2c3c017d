"""AdaCos: cosine logits whose scale is set from the number of classes, then adapted."""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_dml._checks import check_positive
from keras_dml.heads.base import CosineHead, check_num_classes
from keras_dml.ops import masked_logsumexp

# arccos has an infinite slope at ±1; the median angle only needs a value.
_ARCCOS_EPS = 1e-7


def adacos_fixed_scale(num_classes: int) -> float:
    """The AdaCos fixed scale `sqrt(2) * log(C - 1)`."""
    return math.sqrt(2.0) * math.log(num_classes - 1)


@keras.saving.register_keras_serializable(package="keras_dml")
class AdaCos(CosineHead):
    """Use this head to train without tuning the scale: AdaCos picks and adapts it.

    Logits are `s * cos θ_j` for every class (no margin). The scale starts at
    `sqrt(2) * log(C - 1)`; with `dynamic=True` each training call
    (`training=True` and labels given) sets, before computing the logits,

        s ← log(B_avg) / cos(min(π/4, θ_med)),
        B_avg = mean over the batch of Σ_{j≠y} exp(s_old · cos θ_j),

    where θ_med is the median target angle in the batch. The scale is a
    non-trainable weight, `head.current_scale`, saved with the model. If
    `B_avg <= 1` (the formula would give `s <= 0`) the old scale is kept.

    Args:
        num_classes: number of training classes C (>= 3 unless `scale` is given:
            the fixed scale is 0 for C = 2).
        scale: initial (or, with `dynamic=False`, fixed) scale; defaults to
            `sqrt(2) * log(C - 1)`.
        dynamic: adapt the scale on every training batch.
        kernel_initializer: initializer of `kernel` `(embedding_dim, num_classes)`.
        **kwargs: `keras.layers.Layer` arguments.

    Returns:
        `(batch, num_classes)` float32 logits.

    Example:

    >>> import numpy as np
    >>> head = AdaCos(num_classes=10)
    >>> round(head.scale, 3)
    3.107
    >>> embeddings = np.random.rand(8, 16).astype("float32")
    >>> logits = head(embeddings, np.arange(8), training=True)
    >>> float(head.current_scale.numpy()) != head.scale
    True

    Reference: Zhang et al., "AdaCos: Adaptively Scaling Cosine Logits for
    Effectively Learning Deep Face Representations", CVPR 2019.
    """

    def __init__(
        self,
        num_classes: int,
        scale: float | None = None,
        dynamic: bool = True,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        kwargs.pop("centers_per_class", None)
        super().__init__(num_classes, kernel_initializer=kernel_initializer, **kwargs)
        if scale is None:
            check_num_classes(num_classes, minimum=3)
            scale = adacos_fixed_scale(self.num_classes)
        self.scale = check_positive(scale, "scale")
        self.dynamic = bool(dynamic)

    def build(self, embeddings_shape, labels_shape=None):
        super().build(embeddings_shape, labels_shape)
        self.current_scale = self.add_weight(
            name="current_scale",
            shape=(),
            initializer=keras.initializers.Constant(self.scale),
            trainable=False,
            aggregation="mean",
        )

    def logits(self, similarity, labels=None, training=None):
        scale = ops.cast(ops.convert_to_tensor(self.current_scale), similarity.dtype)
        if labels is not None and self.dynamic and training:
            scale = self._adapted_scale(similarity, labels, scale)
            self.current_scale.assign(scale)
        return scale * similarity

    def _adapted_scale(self, similarity, labels, scale):
        similarity = ops.stop_gradient(similarity)
        negatives = ops.logical_not(ops.cast(self._one_hot(labels, "int32"), "bool"))
        # log(B_avg) in log space, so exp(s cos θ) cannot overflow for a large s.
        batch = ops.cast(ops.shape(similarity)[0], similarity.dtype)
        log_b_avg = masked_logsumexp(
            ops.reshape(scale * similarity, (-1,)), ops.reshape(negatives, (-1,))
        ) - ops.log(batch)
        target = ops.clip(self._target(similarity, labels), -1.0 + _ARCCOS_EPS, 1.0 - _ARCCOS_EPS)
        theta_median = ops.median(ops.arccos(target))
        new_scale = log_b_avg / ops.cos(ops.minimum(math.pi / 4.0, theta_median))
        return ops.where(log_b_avg > 0.0, new_scale, scale)

    def get_config(self) -> dict:
        config = super().get_config()
        config.pop("centers_per_class")
        config.update({"scale": self.scale, "dynamic": self.dynamic})
        return config
