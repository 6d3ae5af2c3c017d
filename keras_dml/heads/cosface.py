"""CosFace (large margin cosine loss): subtract a margin from the target cosine."""

from __future__ import annotations

import keras

from keras_dml._checks import check_positive
from keras_dml.heads.base import CosineHead, check_margin


@keras.saving.register_keras_serializable(package="keras_dml")
class CosFace(CosineHead):
    """Use this head with `MarginModel` to learn embeddings with an additive cosine margin.

    Training logits are `s * (cos θ_y - m)` for the target class and
    `s * cos θ_j` for the others; `head(embeddings)` returns `s * cos θ_j`.

    Args:
        num_classes: number of training classes C.
        scale: the scale s (64 in the paper).
        margin: the cosine margin m (0.35), or one margin per class, e.g. from
            `keras_dml.heads.dynamic_margins(class_counts)`.
        kernel_initializer: initializer of the centres `kernel`
            `(embedding_dim, num_classes)`.
        **kwargs: `keras.layers.Layer` arguments.

    Returns:
        `(batch, num_classes)` float32 logits.

    Example:

    >>> import numpy as np
    >>> head = CosFace(num_classes=5, scale=30.0, margin=0.2)
    >>> embeddings = np.random.rand(8, 16).astype("float32")
    >>> labels = np.arange(8) % 5
    >>> tuple(head(embeddings, labels).shape)
    (8, 5)

    Reference: Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face
    Recognition", CVPR 2018.
    """

    def __init__(
        self,
        num_classes: int,
        scale: float = 64.0,
        margin: float | list[float] = 0.35,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(num_classes, kernel_initializer=kernel_initializer, **kwargs)
        self.scale = check_positive(scale, "scale")
        self.margin = check_margin(margin, self.num_classes)

    def logits(self, similarity, labels=None, training=None):
        if labels is not None:
            target = self._target(similarity, labels) - self._per_sample(self.margin, labels)
            similarity = self._with_target(similarity, labels, target)
        return self.scale * similarity

    def get_config(self) -> dict:
        config = super().get_config()
        config.pop("centers_per_class")
        config.update({"scale": self.scale, "margin": self.margin})
        return config
