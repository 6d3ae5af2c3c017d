"""Cross-entropy on a margin head's logits: focal weighting, label smoothing, class weights.

`MarginCrossentropy` is the loss `keras_dml.models.MarginModel.compile`
builds from its `focal_gamma`, `label_smoothing` and `class_weights`
options (it is re-exported there, as before); `inverse_frequency_weights`
derives class weights from class counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from keras_dml._checks import is_number


def inverse_frequency_weights(class_counts: Sequence[int] | np.ndarray, power: float = 1.0):
    """Computes class weights `n_c^(-power)` for long-tailed data; pass them as `class_weights`.

    The weights are scaled to average 1 over the classes. `power=1` is
    inverse frequency, `power=0.5` its square root (milder), `power=0` no
    weighting.

    Args:
        class_counts: samples per class `n_c` (all >= 1), e.g.
            `np.bincount(train_labels)`.
        power: the exponent.

    Returns:
        A list of `len(class_counts)` floats.

    Example:

    >>> [round(w, 3) for w in inverse_frequency_weights([100, 10, 1], power=0.5)]
    [0.212, 0.67, 2.118]
    """
    counts = np.asarray(class_counts, dtype="float64").reshape(-1)
    if counts.size < 1 or not np.all(np.isfinite(counts)) or np.any(counts < 1):
        raise ValueError("`class_counts` must be a non-empty list of counts >= 1.")
    if not np.isfinite(power) or power < 0:
        raise ValueError(f"`power` must be >= 0, got {power}.")
    weights = counts ** (-power)
    return (weights / weights.mean()).tolist()


def _check_class_weights(class_weights, num_classes: int | None) -> list[float]:
    weights = np.asarray(class_weights, dtype="float64").reshape(-1)
    if weights.size == 0 or not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("`class_weights` must be a list of finite numbers >= 0, one per class.")
    if not weights.sum() > 0:
        raise ValueError("`class_weights` must not all be 0.")
    if num_classes is not None and weights.size != num_classes:
        raise ValueError(
            f"`class_weights` has {weights.size} values but the head has {num_classes} classes."
        )
    return weights.tolist()


@keras.saving.register_keras_serializable(package="keras_dml")
class MarginCrossentropy(keras.losses.Loss):
    """Cross-entropy on a head's logits with focal weighting, label smoothing and class weights.

    Per sample i with logits `z`, `log p = log_softmax(z)` and smoothed
    targets `q = (1 - ε) onehot(y_i) + ε / C`:

        l_i = -Σ_j q_j (1 - p_j)^γ log p_j

    (Keras's `CategoricalFocalCrossentropy` with `alpha=1` on sparse labels;
    γ = 0 and ε = 0 give the plain sparse cross-entropy). With
    `class_weights`, sample i weighs `w_{y_i}` and the batch loss is the
    weighted mean `Σ_i w_{y_i} l_i / Σ_i w_{y_i}` (so a batch of rare classes
    is not simply louder); `fit(sample_weight=...)` multiplies on top. With
    a margin head the smoothing and the focal term apply to the
    margin-adjusted logits, as in the ArcFace + focal/label-smoothing
    solutions of the Landmarks and Shopee competitions.
    `MarginModel.compile(focal_gamma=..., label_smoothing=...,
    class_weights=...)` builds this loss.

    Args:
        gamma: the focal exponent γ >= 0 (2 in the focal-loss paper; 0 off).
        label_smoothing: ε in [0, 1).
        class_weights: None, or one weight >= 0 per class (e.g. from
            `inverse_frequency_weights(np.bincount(y))`).
        name: loss name.
        reduction: Keras reduction over the per-sample values.
        dtype: compute dtype (float32 by default).

    Example:

    >>> import numpy as np
    >>> logits = np.array([[2.0, 0.0], [0.0, 1.0]], "float32")
    >>> round(float(MarginCrossentropy()(np.array([0, 1]), logits)), 4)
    0.2201
    >>> round(float(MarginCrossentropy(gamma=2.0)(np.array([0, 1]), logits)), 4)
    0.0122

    Reference: Lin et al., "Focal Loss for Dense Object Detection", ICCV
    2017; Szegedy et al., "Rethinking the Inception Architecture", CVPR 2016
    (label smoothing).
    """

    def __init__(
        self,
        gamma: float = 0.0,
        label_smoothing: float = 0.0,
        class_weights: Sequence[float] | None = None,
        name: str = "margin_crossentropy",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if not is_number(gamma) or not gamma >= 0:
            raise ValueError(f"`gamma` must be a number >= 0, got {gamma!r}.")
        if (
            not is_number(label_smoothing)
            or not 0 <= label_smoothing < 1
        ):
            raise ValueError(f"`label_smoothing` must be in [0, 1), got {label_smoothing!r}.")
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)
        self.class_weights = (
            None if class_weights is None else _check_class_weights(class_weights, None)
        )

    def call(self, y_true, y_pred):
        labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        num_classes = ops.shape(y_pred)[-1]
        log_probs = ops.log_softmax(y_pred, axis=-1)
        targets = ops.one_hot(labels, num_classes, dtype=log_probs.dtype)
        if self.label_smoothing:
            targets = targets * (1.0 - self.label_smoothing) + self.label_smoothing / num_classes
        terms = -targets * log_probs
        if self.gamma:
            # 1 - p as -expm1(log p): exact near p = 1; the floor keeps (.)^γ's slope finite.
            remaining = ops.maximum(-ops.expm1(log_probs), 1e-12)
            terms = terms * ops.power(remaining, self.gamma)
        losses = ops.sum(terms, axis=-1)
        if self.class_weights is not None:
            table = ops.convert_to_tensor(np.asarray(self.class_weights, "float32"))
            weights = ops.cast(ops.take(table, labels), losses.dtype)
            # Scaled so that the batch mean is Σ w l / Σ w.
            losses = losses * weights / ops.maximum(ops.mean(weights), 1e-12)
        return losses

    def get_config(self) -> dict:
        return {
            "gamma": self.gamma,
            "label_smoothing": self.label_smoothing,
            "class_weights": self.class_weights,
            "name": self.name,
            "reduction": self.reduction,
            "dtype": self.dtype,
        }
