"""CurricularFace: ArcFace's margin, with hard negatives weighted up as training advances."""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_dml._checks import check_positive, is_number
from keras_dml.heads.arcface import _SIN_SQUARED_FLOOR, additive_angular_margin
from keras_dml.heads.base import CosineHead


@keras.saving.register_keras_serializable(package="keras_dml")
class CurricularFace(CosineHead):
    """Use this head to learn from easy samples first and hard ones later, with an ArcFace margin.

    The target logit is ArcFace's `s · cos(θ_y + m)` (with its fallback
    where `θ_y + m > π`). A negative class j is *hard* when
    `cos θ_j > cos(θ_y + m)`; its logit becomes `s · cos θ_j (t + cos θ_j)`,
    the others stay `s · cos θ_j`. `t` follows the batch's mean target
    cosine, `t ← momentum · mean(cos θ_y) + (1 - momentum) · t` from `t = 0`,
    so hard negatives weigh little early on (t ≈ 0: easy samples dominate)
    and more as the model improves (the curriculum). `t` is updated on each
    training call (`training=True` with labels) before it is used, as in the
    official code; it is a non-trainable weight, `head.t`, saved with the
    model and updated like AdaCos's scale. `head(embeddings)` returns
    `s · cos θ_j`.

    Args:
        num_classes: number of training classes C.
        scale: the scale s (64).
        margin: the angular margin m in radians (0.5).
        momentum: weight of the current batch in the update of t (0.01, the
            official code's `t = 0.01 · mean + 0.99 · t`).
        kernel_initializer: initializer of the centres `kernel`
            `(embedding_dim, num_classes)`.
        **kwargs: `keras.layers.Layer` arguments.

    Returns:
        `(batch, num_classes)` float32 logits.

    Example:

    >>> import numpy as np
    >>> head = CurricularFace(num_classes=5)
    >>> embeddings = np.random.rand(8, 16).astype("float32")
    >>> logits = head(embeddings, np.arange(8) % 5, training=True)
    >>> tuple(logits.shape), float(head.t.numpy()) != 0.0
    ((8, 5), True)

    Reference: Huang et al., "CurricularFace: Adaptive Curriculum Learning
    Loss for Deep Face Recognition", CVPR 2020; code: HuangYG123/CurricularFace.
    """

    def __init__(
        self,
        num_classes: int,
        scale: float = 64.0,
        margin: float = 0.5,
        momentum: float = 0.01,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        kwargs.pop("centers_per_class", None)
        super().__init__(num_classes, kernel_initializer=kernel_initializer, **kwargs)
        self.scale = check_positive(scale, "scale")
        if (
            not is_number(margin)
            or not 0 <= margin < math.pi
        ):
            raise ValueError(f"`margin` must be a number in [0, π), got {margin!r}.")
        if not is_number(momentum) or not (
            0 <= momentum <= 1
        ):
            raise ValueError(f"`momentum` must be a number in [0, 1], got {momentum!r}.")
        self.margin = float(margin)
        self.momentum = float(momentum)

    def build(self, embeddings_shape, labels_shape=None):
        super().build(embeddings_shape, labels_shape)
        self.t = self.add_weight(
            name="t", shape=(), initializer="zeros", trainable=False, aggregation="mean"
        )

    def logits(self, similarity, labels=None, training=None):
        if labels is None:
            return self.scale * similarity
        target = self._target(similarity, labels)
        t = ops.cast(ops.convert_to_tensor(self.t), similarity.dtype)
        if training:
            batch_mean = ops.mean(ops.stop_gradient(target))
            t = self.momentum * batch_mean + (1.0 - self.momentum) * t
            self.t.assign(t)
        # Hardness is decided on cos(θ_y + m) itself, before ArcFace's fallback.
        frozen = ops.stop_gradient(target)
        sine = ops.sqrt(ops.maximum(1.0 - ops.square(frozen), _SIN_SQUARED_FLOOR))
        shifted = frozen * math.cos(self.margin) - sine * math.sin(self.margin)
        hard = similarity > ops.expand_dims(shifted, 1)
        modulated = ops.where(hard, similarity * (t + similarity), similarity)
        new_target = additive_angular_margin(target, self.margin)
        return self.scale * self._with_target(modulated, labels, new_target)

    def get_config(self) -> dict:
        config = super().get_config()
        config.pop("centers_per_class")
        config.update({"scale": self.scale, "margin": self.margin, "momentum": self.momentum})
        return config
