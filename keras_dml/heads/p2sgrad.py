"""P2SGrad (Zhang et al., CVPR 2019): cosine outputs trained by a squared error to one-hot."""

from __future__ import annotations

import keras
from keras import ops

from keras_dml.heads.base import CosineHead


@keras.saving.register_keras_serializable(package="keras_dml")
class P2SGradLoss(keras.losses.Loss):
    """Mean squared error between `P2SGrad`'s cosines and the one-hot labels.

    Per sample, `(1 / C) sum_j (cos θ_j - [j = y])^2`; the default
    `"sum_over_batch_size"` reduction then averages over the batch, which is
    pytorch-metric-learning's `P2SGradLoss` (an `MSELoss` over all `B x C`
    entries). Its gradient with respect to `cos θ` is the paper's P2SGrad
    (Eq. 11): no scale or margin to tune.

    Args:
        name: loss name.
        reduction: Keras reduction of the per-sample values.
        dtype: compute dtype (float32 by default).

    Example:

    >>> import numpy as np
    >>> cosine = np.array([[1.0, 0.0], [0.5, 0.5]], "float32")
    >>> round(float(P2SGradLoss()(np.array([0, 1]), cosine)), 4)
    0.125

    Reference: Zhang, Zhao, Wu, Wang, Li & Qiao, "P2SGrad: Refined Gradients
    for Optimizing Deep Face Models", CVPR 2019.
    """

    def __init__(self, name="p2sgrad_loss", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        num_classes = ops.shape(y_pred)[-1]
        labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        target = ops.one_hot(labels, num_classes, dtype=y_pred.dtype)
        return ops.mean(ops.square(y_pred - target), axis=-1)

    def get_config(self) -> dict:
        return {"name": self.name, "reduction": self.reduction, "dtype": self.dtype}


@keras.saving.register_keras_serializable(package="keras_dml")
class P2SGrad(CosineHead):
    """Use this head with `MarginModel` to train on cosines with P2SGrad's hyperparameter-free loss.

    The head's outputs are the cosines `cos θ_j` between the normalised
    embedding and the normalised class weights, with or without labels (no
    scale, no margin); `default_loss()` is `P2SGradLoss`, the mean squared
    error to the one-hot labels, which `MarginModel.compile()` picks up.

    pytorch-metric-learning keeps the weight columns at unit norm by
    renormalising them in place before each step; here they are normalised
    in the forward pass (as by every `CosineHead`): the same values and the
    same gradient for the embeddings; the weights' gradient is the
    projection of PML's onto the sphere's tangent plane.

    Args:
        num_classes: number of training classes C.
        kernel_initializer: initializer of the class weights `kernel`
            `(embedding_dim, num_classes)`; defaults to a standard normal.
        **kwargs: `keras.layers.Layer` arguments.

    Returns:
        `(batch, num_classes)` float32 cosines.

    Example:

    >>> import numpy as np
    >>> head = P2SGrad(num_classes=4)
    >>> cosine = head(np.random.rand(8, 16).astype("float32"), np.arange(8) % 4)
    >>> tuple(cosine.shape), type(head.default_loss()).__name__
    ((8, 4), 'P2SGradLoss')

    Reference: Zhang, Zhao, Wu, Wang, Li & Qiao, "P2SGrad: Refined Gradients
    for Optimizing Deep Face Models", CVPR 2019.
    """

    def __init__(self, num_classes: int, kernel_initializer=None, **kwargs):
        kwargs.pop("centers_per_class", None)
        if kernel_initializer is None:
            kernel_initializer = keras.initializers.RandomNormal(stddev=1.0)
        super().__init__(num_classes, kernel_initializer=kernel_initializer, **kwargs)

    def logits(self, similarity, labels=None, training=None):
        del labels, training  # the cosines themselves, in training and inference
        return similarity

    def default_loss(self):
        """`P2SGradLoss()`: mean squared error of the cosines to the one-hot labels."""
        return P2SGradLoss()

    def get_config(self) -> dict:
        config = super().get_config()
        config.pop("centers_per_class")
        return config
