"""Instance loss in pytorch-metric-learning's in-batch form (Zheng et al., ACM TOMM 2020)."""

from __future__ import annotations

import keras
from keras import ops

from keras_dml import distances
from keras_dml._checks import check_positive
from keras_dml.losses.base import MetricLoss


def label_ranks(labels):
    """`(B,)` int32: the rank of each label among the batch's distinct labels (0 = smallest).

    What `torch.unique(labels, return_inverse=True)` returns as its inverse,
    computed with static shapes.
    """
    labels = ops.convert_to_tensor(labels)
    n = ops.shape(labels)[0]
    same = ops.equal(ops.expand_dims(labels, 1), ops.expand_dims(labels, 0))
    earlier = ops.expand_dims(ops.arange(n), 1) > ops.expand_dims(ops.arange(n), 0)
    # Sample j is the first of its label when no earlier sample has the same label.
    first = ops.logical_not(ops.any(ops.logical_and(same, earlier), axis=1))
    smaller = ops.expand_dims(labels, 0) < ops.expand_dims(labels, 1)  # [i, j]: label_j < label_i
    return ops.cast(ops.sum(ops.cast(ops.logical_and(smaller, ops.expand_dims(first, 0)),
                                     "int32"), axis=1), "int32")


def instance_loss(labels, embeddings, *, gamma: float = 64.0):
    """Softmax cross-entropy of each sample's scaled cosine similarities to the batch.

    Row `i` of the logits is `gamma * cos(x_i, x_j)` over all `j` of the
    batch (itself included); its target column is the rank of `i`'s label
    among the batch's distinct labels (`label_ranks`). The loss is the mean
    over the batch (PML's `MeanReducer`). This is pytorch-metric-learning
    2.9's `InstanceLoss`; the paper's instance loss is a classifier over all
    training instances (a head with one weight per instance), which this
    in-batch form stands in for: with one sample per instance in label
    order (labels `0..B-1`), column `k` is instance `k` itself.

    Args:
        labels: `(B,)` int32 class or instance labels.
        embeddings: `(B, D)` float embeddings.
        gamma: the scale of the cosine logits.

    Returns:
        A scalar loss.
    """
    logits = gamma * distances.cosine_similarity(embeddings)
    targets = label_ranks(labels)
    log_probabilities = logits - ops.logsumexp(logits, axis=1, keepdims=True)
    picked = ops.take_along_axis(log_probabilities, ops.expand_dims(targets, 1), axis=1)
    return -ops.mean(picked)


@keras.saving.register_keras_serializable(package="keras_dml")
class InstanceLoss(MetricLoss):
    """Trains embeddings with a cross-entropy over the batch's scaled cosine similarities.

    pytorch-metric-learning 2.9's `InstanceLoss` (same default `gamma=64`,
    mean over the batch, no cross-batch references): row `i`'s target is the
    column given by the rank of its label among the batch's distinct
    labels. Meant for batches of one sample per instance, labelled
    `0..B-1` in order (each sample is then its own class); see
    `instance_loss`.

    Args:
        gamma: scale of the cosine logits. Defaults to `64.0`.
        name: name of the loss instance.
        reduction: kept for Keras compatibility; the loss is already a scalar.
        dtype: dtype of the loss computation.

    Example:

    >>> import numpy as np
    >>> from keras_dml.losses.instance import InstanceLoss
    >>> labels = np.array([0, 1, 2, 3])
    >>> embeddings = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]], "float32")
    >>> round(float(InstanceLoss(gamma=8.0)(labels, embeddings)), 4)
    0.4475

    Reference:
        Zheng, Zheng, Garrett, Yang, Xu & Shen, "Dual-Path Convolutional
        Image-Text Embeddings with Instance Loss", ACM TOMM 2020.
    """

    def __init__(
        self,
        gamma: float = 64.0,
        name: str = "instance_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        check_positive(gamma, "gamma")
        super().__init__(instance_loss, name=name, reduction=reduction, dtype=dtype, gamma=gamma)
