"""MarginModel: train a backbone through a margin head with plain `compile()` and `fit()`.

`MarginCrossentropy` (the focal / label-smoothed / class-weighted
cross-entropy behind `MarginModel.compile`'s options) and
`inverse_frequency_weights` live in `keras_dml.losses.margin_crossentropy`
and are importable from here as before.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import keras
from keras import ops

from keras_dml import distributed
from keras_dml.heads.base import CosineHead
from keras_dml.losses.base import check_labels_dtype, labels_vector
from keras_dml.losses.margin_crossentropy import (  # noqa: F401  (re-exported)
    MarginCrossentropy,
    _check_class_weights,
    inverse_frequency_weights,
)
from keras_dml.models.base import BackboneModel, call_head, deserialize_parts, known_output_shape


@keras.saving.register_keras_serializable(package="keras_dml")
class MarginModel(BackboneModel):
    """Wrap a backbone and a margin head to train embeddings with `compile()` and `fit(x, y)`.

    `model(x)` and `model.predict(x)` return the backbone's embeddings; the
    head is used only to compute the loss, so retrieval and export need only
    `model.embedding_model()` (the backbone alone) or `model.embed(x)`.

    Training: `compute_loss` calls `head(embeddings, y)` for the
    margin-adjusted logits and applies the compiled loss, by default
    `SparseCategoricalCrossentropy(from_logits=True)` (or the head's own loss,
    `head.default_loss()`, for heads such as `ProxyAnchor`), plus any loss the
    head or the backbone adds (e.g. SoftTriple's centre regulariser, the
    centre term of `CenterLoss`). `compile(focal_gamma=...,
    label_smoothing=..., class_weights=...)` turns the cross-entropy into a
    focal, label-smoothed and/or class-weighted one (`MarginCrossentropy`),
    as the ArcFace-based competition winners use. Metrics given
    to `compile(metrics=...)`, e.g. `"accuracy"`, are computed on the head's
    inference logits (scaled cosines, no margin). No custom `train_step`:
    tested on the TensorFlow and JAX backends.

    Centres learning rate: `compile(centers_optimizer=...)` trains the head's
    variables with their own optimizer (an optimizer, its name, or a number:
    the learning rate of a copy of `optimizer`). It uses Keras's
    `MultiOptimizer` with an `OptimizerMap` keyed on the head's layer name
    (variables under `<head name>/`), so it is stored in the compile config
    and survives `.keras` save/load; do not give a backbone layer the head's
    name.

    Args:
        backbone: a Keras model (or layer) mapping inputs to `(batch, dim)`
            embeddings.
        head: a `keras_dml.heads` layer, e.g. `ArcFace(num_classes)`.
        **kwargs: `keras.Model` arguments (`name`, ...).

    Example:

    >>> import keras, numpy as np
    >>> from keras_dml.heads import ArcFace
    >>> backbone = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model = MarginModel(backbone, ArcFace(num_classes=3, scale=16.0))
    >>> model.compile(optimizer="adam", metrics=["accuracy"], centers_optimizer=1e-2)
    >>> x, y = np.random.rand(32, 8).astype("float32"), np.arange(32) % 3
    >>> history = model.fit(x, y, epochs=1, verbose=0)
    >>> model.embed(x).shape
    (32, 4)

    Reference: Deng et al., "ArcFace", CVPR 2019 (backbone + margin softmax
    head, head dropped at test time).
    """

    def __init__(self, backbone: keras.layers.Layer, head: CosineHead, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(backbone, keras.layers.Layer):
            raise ValueError(f"`backbone` must be a Keras model or layer, got {type(backbone)}.")
        if not isinstance(head, keras.layers.Layer):
            raise ValueError(f"`head` must be a keras_dml head layer, got {type(head)}.")
        self.backbone = backbone
        self.head = head
        output_shape = known_output_shape(backbone)
        if output_shape is not None:
            self._build_head(output_shape)
            self.built = True

    def build(self, input_shape):
        self._record_input_shape(input_shape)
        if not self.backbone.built:
            self.backbone.build(input_shape)
        self._build_head(self.backbone.compute_output_shape(input_shape))
        self.built = True

    def _build_head(self, embedding_shape):
        embedding_shape = tuple(embedding_shape)
        if len(embedding_shape) != 2:
            raise ValueError(
                "`backbone` must output embeddings of shape (batch, dim), got shape "
                f"{embedding_shape}."
            )
        if not self.head.built:
            self.head.build(embedding_shape)

    def call(self, inputs, training=None):
        embeddings = self.backbone(inputs, training=training)
        if not self.head.built:
            self._build_head(embeddings.shape)
        return embeddings

    # -- training ---------------------------------------------------------------

    def compile(
        self,
        optimizer="rmsprop",
        loss=None,
        metrics=None,
        centers_optimizer=None,
        focal_gamma: float = 0.0,
        label_smoothing: float = 0.0,
        class_weights: Sequence[float] | None = None,
        **kwargs,
    ):
        """Configures training; `loss` defaults to the head's loss or sparse cross-entropy.

        With `loss=None` the loss is the head's own (`head.default_loss()`,
        e.g. `ProxyAnchorLoss` for `ProxyAnchor`) if it has one, else
        `SparseCategoricalCrossentropy(from_logits=True)` on the head's
        logits, or `MarginCrossentropy` when `focal_gamma`, `label_smoothing`
        or `class_weights` is given.

        Args:
            optimizer: optimizer of the backbone (and of the centres unless
                `centers_optimizer` is given).
            loss: loss applied to `(labels, head logits)`.
            metrics: metrics computed on `(labels, head inference logits)`.
            centers_optimizer: optional optimizer for the head's variables: a
                `keras.optimizers.Optimizer`, a name, or a float, the learning
                rate of a copy of `optimizer` (e.g. 100x the backbone's, as
                SoftTriple's paper).
            focal_gamma: focal-loss exponent γ (0: off; 2 in the focal paper).
            label_smoothing: label smoothing ε in [0, 1) (0: off; 0.1 is common).
            class_weights: one weight per class for long-tailed data, e.g.
                `inverse_frequency_weights(np.bincount(y))`; the loss is the
                weighted mean over the batch.
            **kwargs: other `keras.Model.compile` arguments.

        Raises:
            ValueError: when the cross-entropy options are combined with an
                explicit `loss` or with a head whose loss is not a softmax
                cross-entropy.
        """
        options = focal_gamma != 0 or label_smoothing != 0 or class_weights is not None
        head_loss = self.head.default_loss() if hasattr(self.head, "default_loss") else None
        if options and (loss is not None or head_loss is not None):
            owner = "`loss`" if loss is not None else f"{type(self.head).__name__}'s own loss"
            raise ValueError(
                "`focal_gamma`, `label_smoothing` and `class_weights` shape MarginModel's "
                f"softmax cross-entropy; they cannot be combined with {owner}."
            )
        if loss is None and head_loss is not None:
            loss = head_loss
        elif loss is None and options:
            if class_weights is not None:
                class_weights = _check_class_weights(
                    class_weights, getattr(self.head, "num_classes", None)
                )
            loss = MarginCrossentropy(
                gamma=focal_gamma, label_smoothing=label_smoothing, class_weights=class_weights
            )
        elif loss is None:
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if centers_optimizer is not None:
            optimizer = self._split_optimizer(optimizer, centers_optimizer)
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)

    def _split_optimizer(self, optimizer, centers_optimizer):
        optimizer = keras.optimizers.get(optimizer)
        if isinstance(centers_optimizer, (int, float)) and not isinstance(centers_optimizer, bool):
            if centers_optimizer <= 0:
                raise ValueError(
                    f"`centers_optimizer` as a learning rate must be > 0, got {centers_optimizer}."
                )
            config = optimizer.get_config()
            config.update(learning_rate=float(centers_optimizer), name=f"centers_{optimizer.name}")
            centers_optimizer = optimizer.__class__.from_config(config)
        else:
            centers_optimizer = keras.optimizers.get(centers_optimizer)
        # OptimizerMap keys are full-match regexes over variable paths. The head's
        # variables live under its name, with or without a parent prefix
        # depending on where it was built (the prefix can differ after loading).
        mapping = {f"(?:.*/)?{re.escape(self.head.name)}/.*": centers_optimizer}
        return keras.optimizers.MultiOptimizer(
            keras.optimizers.OptimizerMap(default_optimizer=optimizer, optimizer_map=mapping)
        )

    def fit(self, x=None, y=None, *args, **kwargs):
        # Inside the compiled train step label values are symbolic, so non-integer
        # arrays are caught here, where they are still concrete.
        if y is not None:
            check_labels_dtype(y, "y")
        return super().fit(x, y, *args, **kwargs)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if y is None:
            raise ValueError("`y` (integer class labels) is required to train a MarginModel.")
        # Whole-valued float labels are accepted: Keras itself passes float
        # labels when it builds a model under tf.distribute.
        check_labels_dtype(y, "y")
        labels = ops.cast(labels_vector(y, "y"), "int32")
        logits, head_losses = self._call_head(y_pred, labels, training)
        loss = super().compute_loss(
            x=x, y=labels, y_pred=logits, sample_weight=sample_weight, training=training
        )
        for extra in head_losses:
            # Keras divides the compiled loss by the replica count under
            # tf.distribute (it sums the replicas' gradients); the head's own
            # terms (SoftTriple's regulariser, CenterLoss) need the same.
            loss = loss + distributed.scale_for_replicas(ops.cast(ops.sum(extra), loss.dtype))
        self._update_compiled_metrics(y_pred, labels, sample_weight)
        return loss

    def _call_head(self, embeddings, labels, training):
        """Runs the head with its current variables; returns `(logits, losses it added)`."""
        return call_head(self.head, embeddings, labels, training)

    def _update_compiled_metrics(self, embeddings, labels, sample_weight):
        # Compiled metrics want class logits, not embeddings. They are updated
        # here, where the head's variables hold their current values on every
        # backend, and `compute_metrics` only reports them.
        metrics = [m for m in self.metrics if m.name != "loss"]
        if not metrics:
            return
        logits, _ = self._call_head(embeddings, None, training=False)
        for metric in metrics:
            metric.update_state(labels, logits, sample_weight=sample_weight)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        del x  # metrics are updated in `compute_loss`, on the head's logits
        if any(not getattr(m, "built", True) for m in self.metrics):
            # Keras builds metric state symbolically before the first step.
            labels = ops.cast(ops.reshape(y, (-1,)), "int32")
            self._update_compiled_metrics(y_pred, labels, sample_weight)
        return self.get_metrics_result()

    # -- inference --------------------------------------------------------------

    def _backbone_is_embedding_model(self) -> bool:
        # The head is used only in training: a backbone model is the inference model.
        return isinstance(self.backbone, keras.Model)

    # -- serialisation ------------------------------------------------------------

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "backbone": keras.saving.serialize_keras_object(self.backbone),
                "head": keras.saving.serialize_keras_object(self.head),
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**deserialize_parts(config, ("backbone", "head"), custom_objects))

