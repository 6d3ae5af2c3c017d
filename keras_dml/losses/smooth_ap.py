"""Smooth-AP (Brown et al., ECCV 2020): average precision with sigmoid-relaxed ranks."""

from __future__ import annotations

import keras
from keras import ops

from keras_dml import ops as dml_ops
from keras_dml._checks import check_positive
from keras_dml.distances import cosine_similarity
from keras_dml.losses.base import MetricLoss, validate_inputs


def smooth_ap_loss(labels, embeddings, temperature: float = 0.01):
    """`1 - SmoothAP`, averaged over all anchors.

    With cosine similarities `s_ij` and `sig(t) = sigmoid(t / temperature)`,
    anchor `i` ranks every sample `j` (itself included, as in the authors'
    code) by `R_ij = 1 + sum_{k != j} sig(s_ik - s_ij)` among the whole batch
    and by `R+_ij = 1 + sum_{k in P_i, k != j} sig(s_ik - s_ij)` among its
    positives `P_i` (the samples with its label, itself included), and
    `SmoothAP_i = (1 / |P_i|) sum_{j in P_i} R+_ij / R_ij`.

    Args:
        labels: `(B,)` int class labels. Any order and any number of samples
            per class (an anchor alone in its class has `P_i = {i}`).
        embeddings: `(B, D)` embeddings.
        temperature: sigmoid temperature `> 0`. Defaults to `0.01`.

    Returns:
        The mean of `1 - SmoothAP_i` over the batch. Memory is `O(B^3)`.

    Example:

    >>> import numpy as np
    >>> labels = np.array([0, 0, 1, 1])
    >>> x = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]], "float32")
    >>> round(float(smooth_ap_loss(labels, x, temperature=0.1)), 4)
    0.019

    Reference:
        Brown, Xie, Kalogeiton & Zisserman, "Smooth-AP: Smoothing the Path
        Towards Large-Scale Image Retrieval", ECCV 2020; code:
        Andrew-Brown1/Smooth_AP.
    """
    check_positive(temperature, "temperature")
    labels, embeddings = validate_inputs(labels, embeddings, "labels", "embeddings")
    dtype = embeddings.dtype
    similarity = cosine_similarity(embeddings)
    n = ops.shape(similarity)[0]
    # diff[i, j, k] = s_ik - s_ij: does k rank above j for anchor i?
    above = ops.sigmoid(
        (ops.expand_dims(similarity, 1) - ops.expand_dims(similarity, 2)) / temperature
    )
    other = 1.0 - ops.eye(n, dtype=dtype)  # k != j
    same = ops.cast(ops.equal(labels[:, None], labels[None, :]), dtype)  # i with itself
    rank_all = 1.0 + ops.sum(above * other[None], axis=2)
    rank_positive = 1.0 + ops.sum(above * other[None] * same[:, None, :], axis=2)
    ap = dml_ops.masked_sum(rank_positive / rank_all, same > 0, axis=1) / ops.sum(same, axis=1)
    return ops.mean(1.0 - ap)


@keras.saving.register_keras_serializable(package="keras_dml")
class SmoothAPLoss(MetricLoss):
    """Trains embeddings to maximise average precision, its ranks relaxed by sigmoids.

    Every anchor ranks the whole batch by cosine similarity; the step
    function of a rank is replaced by `sigmoid(. / temperature)`, so average
    precision becomes differentiable (see `smooth_ap_loss`). The loss is
    `1 - SmoothAP` averaged over the batch. Memory and time are `O(B^3)`.

    Unlike pytorch-metric-learning, any batch is accepted: PML requires every
    class to have the same number of samples, stored contiguously, and its
    grouping is right only when that number equals the number of classes
    (e.g. 4 classes x 4 samples); on such batches the two agree.

    Args:
        temperature: sigmoid temperature `> 0`. Defaults to `0.01` (as PML).
        name: name of the loss instance.
        reduction: kept for Keras compatibility; the loss is already a scalar.
        dtype: dtype of the loss computation; defaults to `keras.backend.floatx()`.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> labels = np.array([0, 0, 1, 1])
    >>> x = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [-0.6, 0.8]], "float32")
    >>> round(float(SmoothAPLoss(temperature=0.1)(labels, x)), 4)
    0.2652
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model.compile(optimizer="adam", loss=SmoothAPLoss())

    Reference:
        Brown, Xie, Kalogeiton & Zisserman, "Smooth-AP: Smoothing the Path
        Towards Large-Scale Image Retrieval", ECCV 2020.
    """

    def __init__(
        self,
        temperature: float = 0.01,
        name: str = "smooth_ap_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        temperature = check_positive(temperature, "temperature")
        super().__init__(
            smooth_ap_loss, name=name, reduction=reduction, dtype=dtype, temperature=temperature
        )
