"""ArcFace (additive angular margin) and its sub-center variant."""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_dml._checks import check_positive
from keras_dml.distances import l2_normalize
from keras_dml.heads.base import CosineHead, check_margin

# Floor of sin²θ before the square root: d sqrt(x)/dx is infinite at 0, which is
# where cos θ = ±1; the floor keeps that gradient finite (and zero past the floor).
_SIN_SQUARED_FLOOR = 1e-6


def additive_angular_margin(cosine, margin, easy_margin: bool = False):
    """`cos(θ + m)` from `cos θ`, with ArcFace's fallback where `θ + m > π`.

    Computed as `cos θ cos m - sin θ sin m` with `sin θ = sqrt(max(1 - cos²θ,
    1e-6))`, so the gradient stays finite at `cos θ = ±1` (no `arccos`).
    Where `θ + m > π` the angle would wrap round and the logit *increase*;
    insightface then uses `cos θ - m sin m` (`th = cos(π - m)`,
    `mm = sin(π - m) m`), followed here. With `easy_margin`, targets with
    `cos θ <= 0` keep `cos θ` instead.

    Args:
        cosine: target cosines, any shape, float32.
        margin: the margin m, a number or a tensor broadcastable to `cosine`.
        easy_margin: use the easy-margin rule.

    Returns:
        A tensor shaped like `cosine`.
    """
    cos_m, sin_m = ops.cos(margin), ops.sin(margin)
    sine = ops.sqrt(ops.maximum(1.0 - ops.square(cosine), _SIN_SQUARED_FLOOR))
    shifted = cosine * cos_m - sine * sin_m
    if easy_margin:
        return ops.where(cosine > 0.0, shifted, cosine)
    threshold = ops.cos(math.pi - margin)
    fallback = cosine - ops.sin(math.pi - margin) * margin
    return ops.where(cosine > threshold, shifted, fallback)


@keras.saving.register_keras_serializable(package="keras_dml")
class ArcFace(CosineHead):
    """Use this head with `MarginModel` to learn embeddings with an additive angular margin.

    Training logits are `s * cos(θ_y + m)` for the target class and
    `s * cos θ_j` for the others; `head(embeddings)` returns `s * cos θ_j`.
    Where `θ_y + m > π` the target logit is `s * (cos θ_y - m sin m)`
    (insightface's code; the paper does not say), or `s * cos θ_y` for
    `cos θ_y <= 0` with `easy_margin=True`.

    Args:
        num_classes: number of training classes C.
        scale: the scale s (64 in the paper).
        margin: the angular margin m in radians (0.5), or one margin per class,
            e.g. from `keras_dml.heads.dynamic_margins(class_counts)`.
        easy_margin: keep `cos θ_y` where `cos θ_y <= 0` instead of the fallback.
        kernel_initializer: initializer of the centres `kernel`
            `(embedding_dim, num_classes)`.
        **kwargs: `keras.layers.Layer` arguments.

    Returns:
        `(batch, num_classes)` float32 logits.

    Example:

    >>> import numpy as np
    >>> head = ArcFace(num_classes=5, scale=30.0, margin=0.3)
    >>> embeddings = np.random.rand(8, 16).astype("float32")
    >>> labels = np.arange(8) % 5
    >>> tuple(head(embeddings, labels).shape)
    (8, 5)

    Reference: Deng et al., "ArcFace: Additive Angular Margin Loss for Deep
    Face Recognition", CVPR 2019; code: deepinsight/insightface.
    """

    def __init__(
        self,
        num_classes: int,
        scale: float = 64.0,
        margin: float | list[float] = 0.5,
        easy_margin: bool = False,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        # `centers_per_class` may come through kwargs (SubCenterArcFace, from_config).
        super().__init__(num_classes, kernel_initializer=kernel_initializer, **kwargs)
        self.scale = check_positive(scale, "scale")
        self.margin = check_margin(margin, self.num_classes, maximum=math.pi)
        self.easy_margin = bool(easy_margin)

    def logits(self, similarity, labels=None, training=None):
        if labels is not None:
            margin = self._per_sample(self.margin, labels)
            if not isinstance(margin, float):
                margin = ops.cast(margin, similarity.dtype)
            target = additive_angular_margin(
                self._target(similarity, labels), margin, self.easy_margin
            )
            similarity = self._with_target(similarity, labels, target)
        return self.scale * similarity

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {"scale": self.scale, "margin": self.margin, "easy_margin": self.easy_margin}
        )
        return config


@keras.saving.register_keras_serializable(package="keras_dml")
class SubCenterArcFace(ArcFace):
    """Use this ArcFace head when training labels are noisy: each class gets K sub-centres.

    `cos θ_j = max_k cos θ_{j,k}` (the closest sub-centre of class j), then
    ArcFace's margin on the target. Noisy samples gather round a non-dominant
    sub-centre instead of pulling the class's main centre.

    Args:
        num_classes: number of training classes C.
        centers_per_class: sub-centres K per class (3 in the paper).
        scale: the scale s (64).
        margin: the angular margin m in radians (0.5), or one per class.
        easy_margin: as in `ArcFace`.
        kernel_initializer: initializer of `kernel`
            `(embedding_dim, num_classes * centers_per_class)`, class-major
            (column `c * K + k` is sub-centre k of class c).
        **kwargs: `keras.layers.Layer` arguments.

    Returns:
        `(batch, num_classes)` float32 logits.

    Example:

    >>> import numpy as np
    >>> head = SubCenterArcFace(num_classes=5, centers_per_class=3)
    >>> tuple(head(np.random.rand(8, 16).astype("float32")).shape)
    (8, 5)
    >>> tuple(head.kernel.shape)
    (16, 15)

    Reference: Deng et al., "Sub-center ArcFace: Boosting Face Recognition by
    Large-scale Noisy Web Faces", ECCV 2020.
    """

    def __init__(
        self,
        num_classes: int,
        centers_per_class: int = 3,
        scale: float = 64.0,
        margin: float | list[float] = 0.5,
        easy_margin: bool = False,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(
            num_classes,
            scale=scale,
            margin=margin,
            easy_margin=easy_margin,
            kernel_initializer=kernel_initializer,
            centers_per_class=centers_per_class,
            **kwargs,
        )

    def center_cosine(self, embeddings):
        """Cosine between each embedding and each sub-centre, `(batch, C * K)`, not clipped.

        `class_similarity` clips after the max over the K sub-centres: the same
        values as clipping every centre first (clip and max commute), on a
        K times smaller tensor (B=4096, C=256, K=3 on TensorFlow: the step
        took ~70 ms instead of ~80 ms, `benchmarks/bench_issue21_breakdown.py`).
        """
        centers = l2_normalize(ops.convert_to_tensor(self.kernel), axis=0)
        embeddings = l2_normalize(embeddings)
        return ops.matmul(embeddings, ops.cast(centers, embeddings.dtype))

    def class_similarity(self, center_cosine):
        """The closest sub-centre's cosine per class, clipped to [-1, 1]."""
        per_center = ops.reshape(center_cosine, (-1, self.num_classes, self.centers_per_class))
        return ops.clip(ops.max(per_center, axis=-1), -1.0, 1.0)
