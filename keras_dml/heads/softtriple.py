"""SoftTriple: several centres per class, softly assigned, merged by a regulariser."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops
from scipy.sparse.csgraph import connected_components

from keras_dml._checks import check_positive, is_number
from keras_dml.distances import l2_normalize
from keras_dml.heads.base import CosineHead

# ε under the square root of the centre-merging regulariser (official code):
# sqrt has an infinite slope at 0, reached when two centres coincide.
_REGULARIZER_EPS = 1e-5


def count_distinct_centers(
    kernel, num_classes: int, centers_per_class: int, tolerance: float = 0.1
) -> np.ndarray:
    """Number of distinct centres per class in a class-major `kernel`.

    Two centres of a class are the same when their L2-normalised vectors are
    closer than `tolerance` (0.1 ≈ cosine 0.995); centres are grouped
    transitively (connected components).

    Args:
        kernel: `(dim, num_classes * centers_per_class)` array.
        num_classes: C.
        centers_per_class: K.
        tolerance: L2 distance below which two normalised centres are merged.

    Returns:
        int array `(num_classes,)` with values in `[1, K]`.
    """
    kernel = np.asarray(kernel, dtype="float64")
    kernel = kernel / np.maximum(np.linalg.norm(kernel, axis=0, keepdims=True), 1e-12)
    centers = kernel.T.reshape(num_classes, centers_per_class, -1)
    counts = np.empty(num_classes, dtype="int64")
    for c in range(num_classes):
        gaps = np.linalg.norm(centers[c][:, None, :] - centers[c][None, :, :], axis=-1)
        counts[c], _ = connected_components(gaps < tolerance, directed=False)
    return counts


@keras.saving.register_keras_serializable(package="keras_dml")
class SoftTriple(CosineHead):
    """Use this head when a class has several modes: it learns K centres per class.

    The similarity to class c is a soft maximum over its centres,
    `S_c = Σ_k softmax_k(cos θ_{c,k} / γ) · cos θ_{c,k}`. Training logits are
    `λ (S_c - δ [c = y])`, inference logits `λ S_c`. When called with labels,
    the centre-merging regulariser

        τ · Σ_c Σ_{t<s} sqrt(2 + ε - 2 w_c^t·w_c^s) / (C K (K - 1)),  ε = 1e-5,

    (normalised centres) is added with `add_loss`, so `head.losses` and
    `MarginModel`'s loss include it; similar centres merge and
    `distinct_centers_per_class()` counts those left. The paper trains the
    centres with a larger learning rate (0.01 vs 1e-4): use
    `MarginModel.compile(centers_optimizer=...)`.

    Args:
        num_classes: number of training classes C.
        centers_per_class: centres K per class (10).
        la: the scale λ (20).
        gamma: the soft-assignment temperature γ (0.1; the official code
            multiplies by 1/γ).
        margin: the margin δ (0.01).
        tau: weight τ of the regulariser (0.2); 0 disables it.
        kernel_initializer: initializer of `kernel`
            `(embedding_dim, num_classes * centers_per_class)`, class-major.
        **kwargs: `keras.layers.Layer` arguments.

    Returns:
        `(batch, num_classes)` float32 logits.

    Example:

    >>> import numpy as np
    >>> head = SoftTriple(num_classes=4, centers_per_class=5)
    >>> logits = head(np.random.rand(8, 16).astype("float32"), np.arange(8) % 4)
    >>> tuple(logits.shape), len(head.losses)
    ((8, 4), 1)
    >>> head.distinct_centers_per_class().tolist()
    [5, 5, 5, 5]

    Reference: Qian et al., "SoftTriple Loss: Deep Metric Learning Without
    Triplet Sampling", ICCV 2019; code: idstcv/SoftTriple.
    """

    def __init__(
        self,
        num_classes: int,
        centers_per_class: int = 10,
        la: float = 20.0,
        gamma: float = 0.1,
        margin: float = 0.01,
        tau: float = 0.2,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(
            num_classes,
            centers_per_class=centers_per_class,
            kernel_initializer=kernel_initializer,
            **kwargs,
        )
        self.la = check_positive(la, "la")
        self.gamma = check_positive(gamma, "gamma")
        if not is_number(margin) or margin < 0:
            raise ValueError(f"`margin` must be a number >= 0, got {margin!r}.")
        if not is_number(tau) or tau < 0:
            raise ValueError(f"`tau` must be a number >= 0, got {tau!r}.")
        self.margin = float(margin)
        self.tau = float(tau)

    def class_similarity(self, center_cosine):
        if self.centers_per_class == 1:
            return center_cosine
        per_center = ops.reshape(center_cosine, (-1, self.num_classes, self.centers_per_class))
        weights = ops.softmax(per_center / self.gamma, axis=-1)
        return ops.sum(weights * per_center, axis=-1)

    def logits(self, similarity, labels=None, training=None):
        if labels is not None:
            if self.tau > 0 and self.centers_per_class > 1:
                self.add_loss(self.center_regularization())
            similarity = similarity - self.margin * self._one_hot(labels, similarity.dtype)
        return self.la * similarity

    def center_regularization(self):
        """The weighted centre-merging regulariser τ·R (a scalar tensor); 0 when K = 1."""
        k = self.centers_per_class
        if k == 1:
            return ops.zeros((), "float32")
        centers = l2_normalize(ops.convert_to_tensor(self.kernel), axis=0)
        centers = ops.reshape(ops.transpose(centers), (self.num_classes, k, -1))
        gram = ops.matmul(centers, ops.transpose(centers, (0, 2, 1)))  # (C, K, K)
        pairs = np.triu(np.ones((k, k), dtype=bool), k=1)
        distances = ops.sqrt(ops.maximum(2.0 + _REGULARIZER_EPS - 2.0 * gram, _REGULARIZER_EPS))
        total = ops.sum(ops.where(pairs, distances, ops.zeros_like(distances)))
        return self.tau * total / (self.num_classes * k * (k - 1))

    def distinct_centers_per_class(self, tolerance: float = 0.1) -> np.ndarray:
        """How many centres of each class are still distinct (not merged).

        Args:
            tolerance: L2 distance between normalised centres below which two
                centres count as one (0.1 ≈ cosine 0.995).

        Returns:
            int array `(num_classes,)`, each in `[1, centers_per_class]`.
        """
        return count_distinct_centers(
            ops.convert_to_numpy(self.kernel), self.num_classes, self.centers_per_class, tolerance
        )

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {"la": self.la, "gamma": self.gamma, "margin": self.margin, "tau": self.tau}
        )
        return config
