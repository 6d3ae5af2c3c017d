"""Regularizers: penalties on embeddings (per batch) and on class centres (per weight matrix).

All are `keras.regularizers.Regularizer` subclasses, so they plug in where
Keras takes one:

- **embedding regularizers** (`LpRegularizer`, `ZeroMeanRegularizer`,
  `SphericalEmbeddingRegularizer`) take a `(B, D)` batch of embeddings:
  as `embedding_regularizer=` of a metric loss (added to the loss, as PML's
  `embedding_regularizer` with `embedding_reg_weight`), or as the
  `activity_regularizer` of the layer that outputs the embeddings;
- **centre regularizers** (`RegularFaceRegularizer`,
  `CenterInvariantRegularizer`, `SparseCentersRegularizer`) take a margin
  head's `kernel`, shape `(D, num_classes * centers_per_class)`, whose
  columns are the centres: as `kernel_regularizer=` of a head
  (`keras_dml.heads`). PML's versions take the centres as rows; here they
  are the columns, as in every Keras kernel.

Each takes `weight`, the factor of the penalty (PML's `*_reg_weight`).

Example:

>>> import numpy as np
>>> import keras_dml
>>> from keras_dml.regularizers import LpRegularizer
>>> loss = keras_dml.ContrastiveLoss(embedding_regularizer=LpRegularizer(weight=0.1))
>>> labels = np.array([0, 0, 1, 1])
>>> emb = np.array([[0.0, 0.0], [0.0, 0.5], [0.0, 0.6], [0.0, 1.2]], "float32")
>>> round(float(loss(labels, emb)), 4)  # 0.95 + 0.1 * mean(|x|) = 0.95 + 0.1 * 0.575
1.0075
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_dml._checks import (
    check_non_negative,
    check_positive,
    check_positive_int,
)
from keras_dml._registry import deserialize_as
from keras_dml.distances import l2_normalize


class _Regularizer(keras.regularizers.Regularizer):
    """Base: `weight * penalty(x)`, with `weight` in the config."""

    def __init__(self, weight: float = 1.0):
        self.weight = check_non_negative(weight, "weight")

    def __call__(self, x):
        x = ops.convert_to_tensor(x)
        if keras.backend.standardize_dtype(x.dtype) not in ("float32", "float64"):
            x = ops.cast(x, "float32")  # half precision and integers: computed in float32
        if len(x.shape) != 2:
            raise ValueError(
                f"{type(self).__name__} takes a rank-2 tensor, got shape {tuple(x.shape)}."
            )
        return self.weight * self.penalty(x)

    def penalty(self, x):
        raise NotImplementedError

    def get_config(self) -> dict:
        return {"weight": self.weight}


@keras.saving.register_keras_serializable(package="keras_dml")
class LpRegularizer(_Regularizer):
    """The mean over embeddings of `||x||_p ** power`.

    Args:
        p: the norm's order (2: Euclidean).
        power: exponent applied to each norm.
        weight: factor of the penalty.

    Example:

    >>> import numpy as np
    >>> from keras_dml.regularizers import LpRegularizer
    >>> float(LpRegularizer()(np.array([[3.0, 4.0], [0.0, 1.0]], "float32")))
    3.0
    """

    def __init__(self, p: float = 2, power: float = 1, weight: float = 1.0):
        super().__init__(weight)
        self.p = check_positive(p, "p")
        self.power = check_positive(power, "power")

    def penalty(self, x):
        if self.p == 2:
            # The gradient of sqrt is infinite at 0: a zero row gets a zero gradient instead.
            squared = ops.sum(ops.square(x), axis=1)
            safe = ops.where(squared > 0, squared, ops.ones_like(squared))
            norm = ops.where(squared > 0, ops.sqrt(safe), ops.zeros_like(squared))
        else:
            norm = ops.power(ops.sum(ops.power(ops.abs(x), self.p), axis=1), 1.0 / self.p)
        if self.power != 1:
            norm = ops.power(norm, self.power)
        return ops.mean(norm)

    def get_config(self):
        return {"p": self.p, "power": self.power, **super().get_config()}


@keras.saving.register_keras_serializable(package="keras_dml")
class ZeroMeanRegularizer(_Regularizer):
    """The mean over embeddings of `|sum_j x_j|`: pushes each embedding's components to sum to zero.

    As PML's `ZeroMeanRegularizer` (which sums over each embedding's
    dimensions, not over the batch).

    Example:

    >>> import numpy as np
    >>> from keras_dml.regularizers import ZeroMeanRegularizer
    >>> float(ZeroMeanRegularizer()(np.array([[1.0, -1.0], [2.0, 1.0]], "float32")))
    1.5
    """

    def penalty(self, x):
        return ops.mean(ops.abs(ops.sum(x, axis=1)))


@keras.saving.register_keras_serializable(package="keras_dml")
class SphericalEmbeddingRegularizer(_Regularizer):
    """Spherical embedding constraint (Zhang et al., NeurIPS 2020): equal embedding norms.

    `mean_i (||x_i|| - mu)^2` with `mu` the batch's mean norm, which lets
    a loss on un-normalised embeddings behave like one on a sphere of radius
    `mu`. Gradients flow through `mu` as well. Not in PML.

    Example:

    >>> import numpy as np
    >>> from keras_dml.regularizers import SphericalEmbeddingRegularizer
    >>> float(SphericalEmbeddingRegularizer()(np.array([[3.0, 4.0], [0.0, 1.0]], "float32")))
    4.0

    Reference:
        Zhang, Zhang, Ni, Wang & Huang, "Deep Metric Learning with Spherical
        Embedding", NeurIPS 2020.
    """

    def penalty(self, x):
        norms = ops.sqrt(ops.sum(ops.square(x), axis=1) + 1e-12)
        return ops.mean(ops.square(norms - ops.mean(norms)))


def _centers(kernel):
    """The centres as rows: `(num_centres, D)` from a `(D, num_centres)` kernel."""
    return ops.transpose(kernel)


@keras.saving.register_keras_serializable(package="keras_dml")
class RegularFaceRegularizer(_Regularizer):
    """RegularFace (Zhao et al., CVPR 2019): each centre's cosine to its nearest other centre.

    The mean over centres of `max_{j != i} cos(w_i, w_j)`; the argmax is
    chosen without gradient, as in PML. For a head's `kernel_regularizer`.

    Example:

    >>> import numpy as np
    >>> from keras_dml.regularizers import RegularFaceRegularizer
    >>> kernel = np.array([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]], "float32")  # 3 centres, columns
    >>> float(RegularFaceRegularizer()(kernel))
    0.0

    Reference:
        Zhao, Song, Zhang, Zhao & Lu, "RegularFace: Deep Face Recognition via
        Exclusive Regularization", CVPR 2019.
    """

    def penalty(self, kernel):
        centers = l2_normalize(_centers(kernel))
        cosine = ops.matmul(centers, ops.transpose(centers))
        n = ops.shape(cosine)[0]
        others = ops.where(ops.cast(ops.eye(n), "bool"), ops.full_like(cosine, -2.0), cosine)
        nearest = ops.argmax(ops.stop_gradient(others), axis=1)
        return ops.mean(ops.take_along_axis(cosine, ops.expand_dims(nearest, 1), axis=1))


@keras.saving.register_keras_serializable(package="keras_dml")
class CenterInvariantRegularizer(_Regularizer):
    """Centre-invariant loss (Wu et al., 2017): centres of equal squared norm.

    With `n_i = ||w_i||^2`, the mean over centres of `(n_i - mean(n))^2 / 4`,
    on the raw (not normalised) centres. For a head's `kernel_regularizer`.

    Example:

    >>> import numpy as np
    >>> from keras_dml.regularizers import CenterInvariantRegularizer
    >>> float(CenterInvariantRegularizer()(np.array([[1.0, 3.0], [0.0, 0.0]], "float32")))
    4.0

    Reference:
        Wu, Liu, Huang, Wang & Huang, "Deep Face Recognition with Center
        Invariant Loss", ACM MM Workshops 2017.
    """

    def penalty(self, kernel):
        squared_norms = ops.sum(ops.square(_centers(kernel)), axis=1)
        return ops.mean(ops.square(squared_norms - ops.mean(squared_norms)) / 4.0)


@keras.saving.register_keras_serializable(package="keras_dml")
class SparseCentersRegularizer(_Regularizer):
    """SoftTriple's centre merging (Qian et al., ICCV 2019): an L2,1-style pull between sub-centres.

    For every pair `(s, t)`, `s < t`, of centres of the same class,
    `sqrt(2 + tiny - min(2 cos(w_s, w_t), 2))` (the distance between the
    unit centres); the sum divided by twice the number of such pairs, as
    PML's `SparseCentersRegularizer`. Columns `c * K .. c * K + K - 1` of the
    kernel are class `c`'s centres (`keras_dml.heads`' layout).

    Args:
        num_classes: number of classes.
        centers_per_class: centres per class K (> 1).
        weight: factor of the penalty.

    Example:

    >>> import numpy as np
    >>> from keras_dml.regularizers import SparseCentersRegularizer
    >>> kernel = np.array([[1.0, -1.0], [0.0, 0.0]], "float32")  # one class, two opposite centres
    >>> round(float(SparseCentersRegularizer(1, 2)(kernel)), 4)
    1.0

    Reference:
        Qian, Shang, Sun, Hu, Li & Jin, "SoftTriple Loss: Deep Metric Learning
        Without Triplet Sampling", ICCV 2019.
    """

    def __init__(self, num_classes: int, centers_per_class: int, weight: float = 1.0):
        super().__init__(weight)
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.centers_per_class = check_positive_int(centers_per_class, "centers_per_class")
        if self.centers_per_class < 2:
            raise ValueError(
                f"`centers_per_class` must be at least 2, got {centers_per_class!r}."
            )

    def penalty(self, kernel):
        k, c = self.centers_per_class, self.num_classes
        if kernel.shape[1] is not None and kernel.shape[1] != k * c:
            raise ValueError(
                f"The kernel has {kernel.shape[1]} centres (columns), expected "
                f"num_classes * centers_per_class = {c * k}."
            )
        centers = l2_normalize(_centers(kernel))
        cosine = ops.matmul(centers, ops.transpose(centers))
        index = ops.arange(c * k, dtype="int32")
        same_class = ops.equal(ops.expand_dims(index // k, 1), ops.expand_dims(index // k, 0))
        upper = ops.expand_dims(index, 1) < ops.expand_dims(index, 0)
        pairs = ops.logical_and(same_class, upper)
        tiny = float(np.finfo(keras.backend.standardize_dtype(cosine.dtype)).tiny)
        values = ops.sqrt(ops.maximum(2.0 + tiny - ops.minimum(2.0 * cosine, 2.0), tiny))
        total = ops.sum(ops.where(pairs, values, ops.zeros_like(values)))
        return total / (2.0 * c * k * (k - 1) / 2)

    def get_config(self):
        return {
            "num_classes": self.num_classes,
            "centers_per_class": self.centers_per_class,
            **super().get_config(),
        }


def get(identifier):
    """A regularizer from a regularizer, its serialized config or None.

    Raises:
        ValueError: for anything else.
    """
    return deserialize_as(
        identifier,
        keras.regularizers.Regularizer,
        "embedding_regularizer",
        "keras.regularizers.Regularizer",
        "keras_dml.regularizers.LpRegularizer()",
    )


def add_embedding_regularizer(loss, embeddings, regularizer):
    """`loss + regularizer(embeddings)`, or `loss` when `regularizer` is None."""
    if regularizer is None:
        return loss
    return loss + ops.cast(regularizer(embeddings), loss.dtype)


__all__ = [
    "CenterInvariantRegularizer",
    "LpRegularizer",
    "RegularFaceRegularizer",
    "SparseCentersRegularizer",
    "SphericalEmbeddingRegularizer",
    "ZeroMeanRegularizer",
    "get",
]
