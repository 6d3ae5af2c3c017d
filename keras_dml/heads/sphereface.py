"""SphereFace (A-Softmax): a multiplicative angular margin, cos θ → ψ(θ) ≈ cos(mθ)."""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_dml._checks import check_positive, is_integer, is_number
from keras_dml.heads.base import CosineHead

# Floor of ‖x‖² before the square root: its slope is infinite at 0 (a zero embedding).
_NORM_SQUARED_FLOOR = 1e-12


def chebyshev_cosine(cosine, m: int):
    """`cos(m θ)` from `cos θ` by the Chebyshev recurrence `T_{n+1} = 2c T_n - T_{n-1}`.

    A polynomial in `cos θ`, so the gradient stays finite at `cos θ = ±1`,
    where `arccos` would give an infinite one.
    """
    previous, current = ops.ones_like(cosine), cosine
    if m == 0:
        return previous
    for _ in range(m - 1):
        previous, current = current, 2.0 * cosine * current - previous
    return current


def angular_margin_psi(cosine, m: int):
    """SphereFace's `ψ(θ) = (-1)^k cos(mθ) - 2k` for `θ ∈ [kπ/m, (k+1)π/m]`, from `cos θ`.

    ψ is continuous and decreasing on `[0, π]` (where `cos(mθ)` alone is not
    monotonic). `k` counts the thresholds `cos(jπ/m)`, `j = 1..m-1`, that
    `cos θ` does not exceed; no `arccos` is needed.

    Args:
        cosine: `cos θ`, any shape, in [-1, 1].
        m: the integer margin m >= 1.

    Returns:
        ψ(θ), shaped like `cosine`, in `[-2m + 1, 1]`.
    """
    k = ops.zeros_like(cosine)
    for j in range(1, m):
        k = k + ops.cast(cosine <= math.cos(j * math.pi / m), cosine.dtype)
    k = ops.stop_gradient(k)
    sign = 1.0 - 2.0 * ops.mod(k, 2.0)
    return sign * chebyshev_cosine(cosine, m) - 2.0 * k


@keras.saving.register_keras_serializable(package="keras_dml")
class SphereFace(CosineHead):
    """Use this head to learn embeddings with SphereFace's multiplicative angular margin.

    The target logit is `s · (λ cos θ_y + ψ(θ_y)) / (1 + λ)` with
    `ψ(θ) = (-1)^k cos(mθ) - 2k`, `θ ∈ [kπ/m, (k+1)π/m]`; the others are
    `s · cos θ_j`; `head(embeddings)` returns `s · cos θ_j`. The scale `s`
    is the embedding's norm `‖x‖` (the paper: only the class weights are
    normalised) unless `scale` is given; give one (e.g. 30) when the
    backbone already L2-normalises, since `‖x‖ = 1` leaves the logits too
    flat to train.

    The margin m = 4 is too hard to optimise from the start, so the
    official code anneals it: λ = max(λ_min, base · (1 + γ · it)^(-power)),
    `it` counting training calls, starting near plain softmax (λ = 1000) and
    ending at λ_min = 5. `head.iterations` (a non-trainable weight, saved
    with the model, updated like AdaCos's scale) counts them; set
    `lambda_base=0` and `lambda_min=0` for the pure ψ(θ).

    Args:
        num_classes: number of training classes C.
        margin: the integer angular margin m (4).
        scale: a fixed scale s, or None for the embedding norm ‖x‖.
        lambda_base: λ at iteration 0 (1000).
        lambda_gamma: γ of the annealing schedule (0.12).
        lambda_power: exponent of the schedule (1).
        lambda_min: the final λ (5).
        kernel_initializer: initializer of the centres `kernel`
            `(embedding_dim, num_classes)`.
        **kwargs: `keras.layers.Layer` arguments.

    Returns:
        `(batch, num_classes)` float32 logits.

    Example:

    >>> import numpy as np
    >>> head = SphereFace(num_classes=5, scale=30.0)
    >>> embeddings = np.random.rand(8, 16).astype("float32")
    >>> logits = head(embeddings, np.arange(8) % 5, training=True)
    >>> tuple(logits.shape), int(head.iterations.numpy())
    ((8, 5), 1)

    Reference: Liu et al., "SphereFace: Deep Hypersphere Embedding for Face
    Recognition", CVPR 2017; code: wy1iu/sphereface (annealing schedule).
    """

    def __init__(
        self,
        num_classes: int,
        margin: int = 4,
        scale: float | None = None,
        lambda_base: float = 1000.0,
        lambda_gamma: float = 0.12,
        lambda_power: float = 1.0,
        lambda_min: float = 5.0,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        kwargs.pop("centers_per_class", None)
        super().__init__(num_classes, kernel_initializer=kernel_initializer, **kwargs)
        if not is_integer(margin) or margin < 1:
            raise ValueError(f"`margin` must be an integer >= 1, got {margin!r}.")
        self.margin = int(margin)
        self.scale = None if scale is None else check_positive(scale, "scale")
        for arg, value in (
            ("lambda_base", lambda_base),
            ("lambda_gamma", lambda_gamma),
            ("lambda_power", lambda_power),
            ("lambda_min", lambda_min),
        ):
            if not is_number(value) or value < 0:
                raise ValueError(f"`{arg}` must be a number >= 0, got {value!r}.")
        self.lambda_base = float(lambda_base)
        self.lambda_gamma = float(lambda_gamma)
        self.lambda_power = float(lambda_power)
        self.lambda_min = float(lambda_min)

    def build(self, embeddings_shape, labels_shape=None):
        super().build(embeddings_shape, labels_shape)
        self.iterations = self.add_weight(
            name="iterations",
            shape=(),
            dtype="int32",
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
        )

    def annealing_lambda(self):
        """The current λ of the target logit (a float32 scalar tensor)."""
        iterations = ops.cast(ops.convert_to_tensor(self.iterations), "float32")
        decayed = self.lambda_base * ops.power(
            1.0 + self.lambda_gamma * iterations, -self.lambda_power
        )
        return ops.maximum(decayed, self.lambda_min)

    def call(self, embeddings, labels=None, training=None):
        embeddings = self._check_embeddings(embeddings)
        cosine = self.class_similarity(self.center_cosine(embeddings))
        if self.scale is None:
            squared = ops.sum(ops.square(ops.cast(embeddings, "float32")), axis=1, keepdims=True)
            scale = ops.sqrt(ops.maximum(squared, _NORM_SQUARED_FLOOR))
        else:
            scale = self.scale
        if labels is not None:
            labels = self._check_labels(labels, embeddings)
            lam = self.annealing_lambda()
            target = self._target(cosine, labels)
            target = (lam * target + angular_margin_psi(target, self.margin)) / (1.0 + lam)
            cosine = self._with_target(cosine, labels, target)
            if training:
                self.iterations.assign(self.iterations + 1)
        return scale * cosine

    def get_config(self) -> dict:
        config = super().get_config()
        config.pop("centers_per_class")
        config.update(
            {
                "margin": self.margin,
                "scale": self.scale,
                "lambda_base": self.lambda_base,
                "lambda_gamma": self.lambda_gamma,
                "lambda_power": self.lambda_power,
                "lambda_min": self.lambda_min,
            }
        )
        return config
