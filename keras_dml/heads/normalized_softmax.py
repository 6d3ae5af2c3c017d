"""Normalised softmax (NormFace; Zhai & Wu's classification baseline): cosine logits / T."""

from __future__ import annotations

import keras

from keras_dml._checks import check_positive
from keras_dml.heads.base import CosineHead


@keras.saving.register_keras_serializable(package="keras_dml")
class NormalizedSoftmax(CosineHead):
    """Use this head with `MarginModel` to train embeddings as a cosine classifier.

    Logits are `cos θ_j / T` (normalised embedding and class weight,
    temperature T), with or without labels: no margin. `MarginModel`'s
    softmax cross-entropy on them is pytorch-metric-learning's
    `NormalizedSoftmaxLoss`. It is `CosFace` with `margin=0` and
    `scale=1/T`, under the name and default of the metric-learning
    literature.

    Args:
        num_classes: number of training classes C.
        temperature: the temperature T (0.05, as PML: a scale of 20).
        kernel_initializer: initializer of the class weights `kernel`
            `(embedding_dim, num_classes)`; defaults to a standard normal, as
            PML (only the directions matter: columns are normalised).
        **kwargs: `keras.layers.Layer` arguments.

    Returns:
        `(batch, num_classes)` float32 logits.

    Example:

    >>> import numpy as np
    >>> head = NormalizedSoftmax(num_classes=4, temperature=0.1)
    >>> logits = head(np.random.rand(8, 16).astype("float32"), np.arange(8) % 4)
    >>> tuple(logits.shape), bool(np.abs(np.asarray(logits)).max() <= 10.0 + 1e-4)
    ((8, 4), True)

    Reference: Wang et al., "NormFace: L2 Hypersphere Embedding for Face
    Verification", ACM MM 2017; Zhai & Wu, "Classification is a Strong
    Baseline for Deep Metric Learning", BMVC 2019.
    """

    def __init__(
        self,
        num_classes: int,
        temperature: float = 0.05,
        kernel_initializer=None,
        **kwargs,
    ):
        kwargs.pop("centers_per_class", None)
        if kernel_initializer is None:
            kernel_initializer = keras.initializers.RandomNormal(stddev=1.0)
        super().__init__(num_classes, kernel_initializer=kernel_initializer, **kwargs)
        self.temperature = check_positive(temperature, "temperature")

    def logits(self, similarity, labels=None, training=None):
        del labels, training  # no margin: the same logits for training and inference
        return similarity / self.temperature

    def get_config(self) -> dict:
        config = super().get_config()
        config.pop("centers_per_class")
        config.update({"temperature": self.temperature})
        return config
