"""XBMModel: train a backbone with a metric loss against a cross-batch memory (XBM)."""

from __future__ import annotations

import inspect

import keras
from keras import ops

from keras_dml import distributed
from keras_dml._checks import check_labels_dtype, check_non_negative, is_integer
from keras_dml.layers.memory import CrossBatchMemory
from keras_dml.losses.base import MetricLoss, validate_inputs
from keras_dml.models.base import BackboneModel, deserialize_parts, known_output_shape

# Losses whose labels are not class labels (instance ids of two views): a memory of
# past batches has no positive for them.
_UNSUPPORTED = ("NTXentLoss",)


@keras.saving.register_keras_serializable(package="keras_dml")
class XBMModel(BackboneModel):
    """Wrap a backbone to train it with a metric loss over a cross-batch memory of past batches.

    Each training step writes the batch's embeddings and labels (detached)
    into a `keras_dml.layers.CrossBatchMemory` of `memory_size` slots and
    computes the compiled loss of the batch (the queries) against the whole
    memory (the references), the batch's own just-written copies included
    but never a query with itself. This is pytorch-metric-learning's
    `CrossBatchMemory(loss, embedding_size, memory_size)`, step for step
    (tested): until the memory has filled up, only its written slots are
    used; gradients flow through the queries only.

    The official XBM code (Wang et al.) adds the plain in-batch loss and
    starts the memory only after a warm-up of `START_ITERATION` steps, when
    the features drift slowly enough; `batch_loss_weight=1.0` and
    `start_step=...` give that form. Before `start_step` the loss is the
    in-batch loss alone and the memory is not written.

    The compiled loss must be a `keras_dml` metric loss that takes
    `references=` (`ContrastiveLoss`, `TripletLoss`, `TripletSemiHardLoss`,
    `TripletHardLoss`, `MultiSimilarityLoss`, `CircleLoss`, `SupConLoss`,
    `NPairsLoss`, ...); `NTXentLoss` (instance ids, not class labels) and
    losses needing per-row values of their references (`LiftedStructLoss`,
    `QuadrupletLoss`) raise a `ValueError`. `evaluate` reports the in-batch
    loss and leaves the memory unchanged. `sample_weight` is not supported.

    The memory's variables are part of the model: `model.save("m.keras")`
    stores them and `keras.saving.load_model` restores the memory exactly.
    Under `tf.distribute` every replica writes the global batch in replica
    order; under mixed precision the memory stays float32.

    Args:
        backbone: a Keras model (or layer) mapping inputs to `(batch, dim)`
            embeddings.
        memory_size: number of stored embeddings (the paper's gains need
            large memories, e.g. 8,192-65,536 at dim 128); at least the
            global batch size.
        start_step: training steps with the in-batch loss only before the
            memory is used (0: from the first step, as PML).
        batch_loss_weight: weight of the in-batch loss added to the memory
            loss (0: memory loss only, as PML; 1: the official XBM code).
        num_classes: None (default): integer class labels `(B,)`; an int `C`:
            multi-hot `(B, C)` labels, stored as such in the memory (with a
            loss that supports multi-label batches, e.g. `ContrastiveLoss`).
        **kwargs: `keras.Model` arguments (`name`, ...).

    Example:

    >>> import keras, numpy as np, keras_dml
    >>> backbone = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model = keras_dml.models.XBMModel(backbone, memory_size=64)
    >>> model.compile(optimizer="adam", loss=keras_dml.ContrastiveLoss())
    >>> x, y = np.random.rand(32, 8).astype("float32"), np.arange(32) % 4
    >>> history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    >>> int(model.memory.size.numpy())
    32
    >>> model.embed(x).shape
    (32, 4)

    Reference: Wang, Zhang, Huang & Scott, "Cross-Batch Memory for
    Embedding Learning", CVPR 2020.
    """

    def __init__(
        self,
        backbone: keras.layers.Layer,
        memory_size: int,
        start_step: int = 0,
        batch_loss_weight: float = 0.0,
        num_classes: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(backbone, keras.layers.Layer):
            raise ValueError(f"`backbone` must be a Keras model or layer, got {type(backbone)}.")
        if not is_integer(start_step) or start_step < 0:
            raise ValueError(f"`start_step` must be a non-negative int, got {start_step!r}.")
        batch_loss_weight = check_non_negative(batch_loss_weight, "batch_loss_weight")
        self.backbone = backbone
        self.memory = CrossBatchMemory(memory_size, num_classes=num_classes, name="memory")
        self.start_step = int(start_step)
        self.batch_loss_weight = float(batch_loss_weight)
        output_shape = known_output_shape(backbone)
        if output_shape is not None:
            self._build_memory(output_shape)
            self.built = True

    @property
    def memory_size(self) -> int:
        return self.memory.memory_size

    def build(self, input_shape):
        self._record_input_shape(input_shape)
        if not self.backbone.built:
            self.backbone.build(input_shape)
        self._build_memory(self.backbone.compute_output_shape(input_shape))
        self.built = True

    def _build_memory(self, embedding_shape):
        embedding_shape = tuple(embedding_shape)
        if len(embedding_shape) != 2:
            raise ValueError(
                "`backbone` must output embeddings of shape (batch, dim), got shape "
                f"{embedding_shape}."
            )
        self.memory.build(embedding_shape)

    def _backbone_is_embedding_model(self) -> bool:
        return isinstance(self.backbone, keras.Model)

    def call(self, inputs, training=None):
        embeddings = self.backbone(inputs, training=training)
        if not self.memory.built:
            self._build_memory(embeddings.shape)
        return embeddings

    def fit(self, x=None, y=None, *args, **kwargs):
        if y is not None:
            check_labels_dtype(y, "y")
        return super().fit(x, y, *args, **kwargs)

    def _metric_loss(self) -> MetricLoss:
        loss = getattr(self, "loss", None)
        if not isinstance(loss, MetricLoss):
            raise ValueError(
                "XBMModel needs a keras_dml metric loss: `model.compile(optimizer, "
                f"loss=keras_dml.ContrastiveLoss())`, got {loss!r}."
            )
        if type(loss).__name__ in _UNSUPPORTED or (
            "references" not in inspect.signature(loss.fn).parameters
        ):
            raise ValueError(
                f"{type(loss).__name__} cannot use a cross-batch memory (it has no "
                "`references=` form over class labels); use a pair or triplet loss such as "
                "ContrastiveLoss, TripletLoss or MultiSimilarityLoss."
            )
        return loss

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if y is None:
            raise ValueError("`y` (integer class labels) is required to train an XBMModel.")
        if sample_weight is not None:
            raise ValueError(
                "XBMModel does not support `sample_weight`: its loss scores the batch against "
                "the memory as a whole."
            )
        loss = self._metric_loss()
        check_labels_dtype(y, "y")
        multi_label = self.memory.num_classes is not None
        if multi_label and not loss.supports_multi_label:
            raise ValueError(
                f"{type(loss).__name__} does not take multi-hot labels; with `num_classes=` use "
                "a loss that supports multi-label batches (e.g. ContrastiveLoss)."
            )
        y = ops.convert_to_tensor(y)
        self.memory.check_labels(y)
        labels, embeddings = validate_inputs(y, y_pred, "y", "embeddings", multi_label=multi_label)
        if not self.memory.built:
            self._build_memory(embeddings.shape)
        if not training:
            value = loss.compute(labels, embeddings)
        else:
            value = self._training_loss(loss, labels, embeddings)
        value = distributed.scale_for_replicas(ops.cast(value, "float32"))
        for extra in self.losses:  # regularisers of the backbone
            value = value + ops.cast(ops.sum(extra), value.dtype)
        return value

    def _training_loss(self, loss, labels, embeddings):
        if self.start_step == 0:
            references = self.memory.enqueue(labels, embeddings)
            value = loss.compute(labels, embeddings, references=references)
            if self.batch_loss_weight:
                value = value + self.batch_loss_weight * loss.compute(labels, embeddings)
            return value
        # Warm-up: the in-batch loss alone, and the memory is not written.
        # The memory's own step counter: a model variable, so it is threaded through
        # JAX's stateless training step and saved with the model.
        active = ops.greater_equal(ops.convert_to_tensor(self.memory.steps), self.start_step)
        references = self.memory.enqueue(labels, embeddings, active=active)
        memory_value = loss.compute(labels, embeddings, references=references)
        batch_value = loss.compute(labels, embeddings)
        with_memory = memory_value + self.batch_loss_weight * batch_value
        return ops.where(active, with_memory, batch_value)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "backbone": keras.saving.serialize_keras_object(self.backbone),
                "memory_size": self.memory.memory_size,
                "start_step": self.start_step,
                "batch_loss_weight": self.batch_loss_weight,
            }
        )
        if self.memory.num_classes is not None:
            config["num_classes"] = self.memory.num_classes
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**deserialize_parts(config, ("backbone",), custom_objects))
