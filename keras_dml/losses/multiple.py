"""A weighted sum of metric losses on one output (pytorch-metric-learning's `MultipleLosses`).

Keras's `compile(loss=[...], loss_weights=[...])` pairs one loss with each
model output; a single embedding output trained with several metric losses
needs one loss object that adds them up.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_dml._checks import is_number
from keras_dml.losses.base import MetricLoss, References


def _metric_losses(losses) -> list[MetricLoss]:
    """The losses as `MetricLoss` objects (configs from `get_config` are deserialized)."""
    if not isinstance(losses, (list, tuple)) or not losses:
        raise ValueError(f"`losses` must be a non-empty list of metric losses, got {losses!r}.")
    built = []
    for loss in losses:
        if isinstance(loss, dict):
            loss = keras.losses.deserialize(loss)
        if not isinstance(loss, MetricLoss):
            raise ValueError(
                "Every entry of `losses` must be a keras_dml metric loss (e.g. "
                f"keras_dml.TripletLoss()), got {loss!r}."
            )
        built.append(loss)
    return built


@keras.saving.register_keras_serializable(package="keras_dml")
class MultipleLosses(MetricLoss):
    """Sums several metric losses of the same embeddings, each with its own weight.

    `loss = sum_i weights[i] * losses[i](y_true, y_pred)`. Each loss keeps
    its own options (its `miner=`, `reducer=`, distance and cross-replica
    references: PML's `miners=` argument becomes each loss's `miner=`), and
    under `tf.distribute` the sum is divided by the number of replicas once.
    Multi-hot labels are accepted when every loss accepts them.

    The `losses` option (what `get_config` writes and `loss.losses` reads)
    holds the losses' serialized configs; the loss objects are
    `loss.components`.

    Args:
        losses: a non-empty list of `keras_dml` metric losses (or their
            `keras.losses.serialize` configs).
        weights: one number per loss; None: all 1 (PML's default).
        name: loss name.
        reduction: Keras reduction; the loss is already a scalar.
        dtype: the loss's compute dtype.

    Example:

    >>> import numpy as np, keras_dml
    >>> labels = np.array([0, 0, 1, 1])
    >>> emb = np.array([[0.0, 0.0], [0.0, 0.5], [0.0, 0.6], [0.0, 1.2]], "float32")
    >>> both = keras_dml.losses.MultipleLosses(
    ...     [keras_dml.ContrastiveLoss(), keras_dml.TripletLoss(negative_mining="all")],
    ...     weights=[1.0, 0.5])
    >>> round(float(both(labels, emb)), 4)
    1.12
    """

    def __init__(
        self,
        losses,
        weights=None,
        name: str = "multiple_losses",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        components = _metric_losses(losses)
        if weights is None:
            weights = [1.0] * len(components)
        if (not isinstance(weights, (list, tuple)) or len(weights) != len(components)
                or not all(is_number(w) for w in weights)):
            raise ValueError(
                f"`weights` must be None or one number per loss ({len(components)}), got "
                f"{weights!r}."
            )
        super().__init__(
            None,
            name=name,
            reduction=reduction,
            dtype=dtype,
            losses=[keras.losses.serialize(loss) for loss in components],
            weights=[float(w) for w in weights],
        )
        self.components = components
        self.supports_multi_label = all(loss.supports_multi_label for loss in components)

    def compute(
        self,
        labels,
        embeddings,
        instance_labels: bool = False,
        references: References | None = None,
    ):
        total = 0.0
        for loss, weight in zip(self.components, self.weights, strict=True):
            value = loss.compute(labels, embeddings, instance_labels, references)
            total = total + weight * ops.cast(value, embeddings.dtype)
        return total
