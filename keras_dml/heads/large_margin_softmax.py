"""Large-margin softmax (L-Softmax, Liu et al. 2016): ‖W_y‖‖x‖ψ(θ_y) for the target logit."""

from __future__ import annotations

import keras
from keras import ops

from keras_dml._checks import check_positive, is_integer
from keras_dml.heads.base import CosineHead
from keras_dml.heads.sphereface import angular_margin_psi

# Floor of ‖x‖² before the square root: its slope is infinite at 0 (a zero embedding).
_NORM_SQUARED_FLOOR = 1e-12


@keras.saving.register_keras_serializable(package="keras_dml")
class LargeMarginSoftmax(CosineHead):
    """Use this head with `MarginModel` for a multiplicative angular margin on unnormalised logits.

    Logits are `s ‖x‖ ‖W_j‖ cos θ_j`, a plain linear classifier (times
    `s`), except the target's: `s ‖x‖ ‖W_y‖ ψ(θ_y)` with
    `ψ(θ) = (-1)^k cos(mθ) - 2k` for `θ ∈ [kπ/m, (k+1)π/m]`, the function of
    `SphereFace` (`keras_dml.heads.angular_margin_psi`). `head(embeddings)`
    returns `s ‖x‖ ‖W_j‖ cos θ_j`. With `MarginModel`'s softmax cross-entropy
    this is pytorch-metric-learning's `LargeMarginSoftmaxLoss`.

    Unlike `SphereFace` (which normalises the class weights and anneals the
    margin in from plain softmax), the weights keep their norms and the
    margin applies from the first step, as in PML; use `SphereFace` for the
    annealed, normalised-weight variant.

    Args:
        num_classes: number of training classes C.
        margin: the integer angular margin m (4, as PML).
        scale: a constant factor s on every logit (1, as PML).
        kernel_initializer: initializer of the class weights `kernel`
            `(embedding_dim, num_classes)`; defaults to a standard normal, as
            PML (the column norms scale the logits).
        **kwargs: `keras.layers.Layer` arguments.

    Returns:
        `(batch, num_classes)` float32 logits.

    Example:

    >>> import numpy as np
    >>> head = LargeMarginSoftmax(num_classes=3, margin=2)
    >>> x = np.array([[1.0, 0.0]], "float32")
    >>> head.build(x.shape)
    >>> _ = head.kernel.assign(np.array([[0.6, 0.0, -1.0], [0.8, 2.0, 0.0]], "float32"))
    >>> np.asarray(head(x), "float64").round(4).tolist()  # ‖x‖ ‖W_j‖ cos θ_j = x W
    [[0.6, 0.0, -1.0]]
    >>> np.asarray(head(x, np.array([0])), "float64").round(4).tolist()  # cos 2θ_0 = 2 0.6² - 1
    [[-0.28, 0.0, -1.0]]

    Reference: Liu, Wen, Yu & Yang, "Large-Margin Softmax Loss for
    Convolutional Neural Networks", ICML 2016.
    """

    def __init__(
        self,
        num_classes: int,
        margin: int = 4,
        scale: float = 1.0,
        kernel_initializer=None,
        **kwargs,
    ):
        kwargs.pop("centers_per_class", None)
        if kernel_initializer is None:
            kernel_initializer = keras.initializers.RandomNormal(stddev=1.0)
        super().__init__(num_classes, kernel_initializer=kernel_initializer, **kwargs)
        if not is_integer(margin) or margin < 1:
            raise ValueError(f"`margin` must be an integer >= 1, got {margin!r}.")
        self.margin = int(margin)
        self.scale = check_positive(scale, "scale")

    def call(self, embeddings, labels=None, training=None):
        embeddings = self._check_embeddings(embeddings)
        cosine = self.center_cosine(embeddings)
        if labels is not None:
            labels = self._check_labels(labels, embeddings)
            target = angular_margin_psi(self._target(cosine, labels), self.margin)
            cosine = self._with_target(cosine, labels, target)
        dtype = cosine.dtype  # float32, or float64 for float64 embeddings
        squared = ops.sum(ops.square(ops.cast(embeddings, dtype)), axis=1, keepdims=True)
        embedding_norm = ops.sqrt(ops.maximum(squared, _NORM_SQUARED_FLOOR))
        kernel = ops.cast(ops.convert_to_tensor(self.kernel), dtype)
        weight_norm = ops.sqrt(ops.sum(ops.square(kernel), axis=0, keepdims=True))
        return self.scale * embedding_norm * weight_norm * cosine

    def get_config(self) -> dict:
        config = super().get_config()
        config.pop("centers_per_class")
        config.update({"margin": self.margin, "scale": self.scale})
        return config
