"""The models of a run: the backbone φ, the embedding, the loss or head, S2SD.

`build_training_model(config, input_shape, num_classes)` returns what
`train_run` fits and what it saves; `resolve_model_options` fills the
options a config leaves to the backbone (`auto`, its preprocessing and
input size, the embedding width, the learning rate, S2SD's target widths).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras

from keras_dml.runs import registry
from keras_dml.runs.config import TrainConfig, as_train_config
from keras_dml.runs.data import SMALL_DATASETS
from keras_dml.runs.errors import RunError


def s2sd_target_dims(config: TrainConfig) -> tuple[int, ...]:
    """S2SD's target head widths: the config's, or 4x, 8x and 16x the embedding (<= 2048)."""
    if config.s2sd_target_dims is not None:
        return config.s2sd_target_dims
    return tuple(min(2048, config.embedding_dim * factor) for factor in (4, 8, 16))


def s2sd_feature_delay(config: TrainConfig) -> int:
    """Steps before MSDF's feature distillation starts: an eighth of the run's steps.

    The S2SD code waits 1000 of ~8000 steps.
    """
    return config.epochs * (config.steps_per_epoch or 1) // 8


def resolve_model_options(config: TrainConfig) -> TrainConfig:
    """`config` with `backbone`, `preprocessing`, `image_size`, `embedding_dim` and
    `learning_rate` filled from the backbone where they are `auto` or None."""
    from keras_dml.data.tfds import backbone_preprocessing

    backbone = config.backbone
    if backbone == "auto":
        backbone = "small_conv" if config.dataset in SMALL_DATASETS else "resnet50"
    mode, size = backbone_preprocessing(backbone)
    small = backbone == "small_conv"
    return config.replace(
        backbone=backbone,
        preprocessing=mode,
        image_size=size if config.image_size is None else config.image_size,
        embedding_dim=(32 if small else 128) if config.embedding_dim is None
        else config.embedding_dim,
        learning_rate=(1e-3 if small else 1e-4) if config.learning_rate is None
        else config.learning_rate,
    )


def _small_conv(input_shape) -> keras.Model:
    """The demo's conv net up to its flattened feature map (one more pooling for inputs >= 16 px).

    The features (1024-d for 8x8 digits, 4096-d for 32x32 glyphs) are wider than the embedding and
    S2SD's target heads, as a ResNet's pooled features are: a narrow learnt
    projection here would make S2SD hurt and transfer to unseen classes worse
    (BENCHMARKS.md).
    """
    layers = [keras.Input(input_shape),
              keras.layers.Conv2D(32, 3, padding="same", activation="relu")]
    if input_shape[0] >= 16:
        layers.append(keras.layers.MaxPooling2D())
    layers += [keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
               keras.layers.MaxPooling2D(),
               keras.layers.Flatten()]
    return keras.Sequential(layers, name="small_conv")


def build_features(config: TrainConfig | Mapping[str, Any], input_shape) -> keras.Model:
    """The backbone φ: inputs -> `(batch, F)` pooled features.

    Raises:
        RunError: ImageNet weights on inputs that are not RGB, or weights
            that cannot be loaded (no network, bad cache).
    """
    config = as_train_config(config)
    name = config.backbone
    if name == "small_conv":
        return _small_conv(input_shape)
    weights = None if config.weights == "none" else "imagenet"
    if weights and input_shape[-1] != 3:
        raise RunError(f"ImageNet weights need RGB inputs; got {input_shape[-1]} channel(s): "
                       "pass --weights none or --backbone small_conv")
    application = getattr(keras.applications, registry.KERAS_APPLICATIONS[name])
    try:
        return application(include_top=False, weights=weights, input_shape=tuple(input_shape),
                           pooling="avg")
    except Exception as error:  # no network, bad cache: the user can pick other weights
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RunError(f"could not build {name} with {weights} weights ({first}); pass "
                       "--weights none to start from random weights") from error


def build_training_model(config: TrainConfig | Mapping[str, Any], input_shape,
                         num_classes: int):
    """Returns `(model to fit, its embedding model, the backbone φ)`, compiled as the loss asks.

    Args:
        config: a resolved config (`backbone` not `auto`; `embedding_dim`
            and `learning_rate` set), or a dict of its options.
        input_shape: one input's shape, e.g. `(8, 8, 1)`.
        num_classes: training classes (a margin head's width).

    Example:

    >>> from keras_dml.runs import build_training_model
    >>> model, embedder, features = build_training_model(
    ...     {"loss": "triplet", "backbone": "small_conv", "embedding_dim": 8,
    ...      "learning_rate": 1e-3}, (8, 8, 1), num_classes=5)
    >>> embedder.output_shape
    (None, 8)
    """
    from keras_dml.layers import MetricEmbedding

    config = as_train_config(config)
    spec = registry.LOSSES[config.loss]
    try:
        target = spec.resolve()
    except LookupError as error:
        raise RunError(f"loss {config.loss!r} is not available: {error}") from None
    features = build_features(config, input_shape)
    dim = config.embedding_dim
    optimizer = keras.optimizers.Adam(config.learning_rate)
    head = target(num_classes, **spec.kwargs) if spec.kind == "head" else None
    loss = target(**spec.kwargs) if spec.kind == "loss" else None
    if config.s2sd:
        from keras_dml.models.s2sd import S2SD

        delay = 0
        if config.s2sd_features:
            delay = (s2sd_feature_delay(config) if config.s2sd_feature_delay is None
                     else config.s2sd_feature_delay)
        model = S2SD(features, embedding_dim=dim, target_dims=s2sd_target_dims(config),
                     distillation_weight=config.distillation_weight, base_head=head,
                     feature_distillation=config.s2sd_features,
                     feature_distillation_delay=delay)
        model.compile(optimizer=optimizer, loss=loss)
        model.build((None, *input_shape))
        return model, model.embedding_model(), features
    inputs = keras.Input(input_shape)
    embedder = keras.Model(inputs, MetricEmbedding(dim, name="embedding")(features(inputs)),
                           name="embedder")
    if head is None:
        embedder.compile(optimizer=optimizer, loss=loss)
        return embedder, embedder, features
    from keras_dml.models import MarginModel

    model = MarginModel(embedder, head)
    model.compile(optimizer=optimizer,
                  centers_optimizer=config.learning_rate * config.centers_lr_multiplier)
    return model, embedder, features


def embedding_and_features_model(embedder: keras.Model, features: keras.Model) -> keras.Model:
    """One model returning `(embedding, φ)` from a single pass through the backbone φ.

    `embedder` is what `build_training_model` returns: a functional model that
    applies `features` to its input, then a chain of one-input layers (the
    embedding layer; S2SD's head and normalisation). Scoring the embedding and
    the features with this model runs the backbone once per batch, not twice.
    """
    layers = [layer for layer in embedder.layers
              if not isinstance(layer, keras.layers.InputLayer)]
    if not layers or layers[0] is not features:
        raise ValueError(f"{embedder.name} does not start with the backbone {features.name}")
    inputs = keras.Input(shape=embedder.input_shape[1:], dtype=embedder.inputs[0].dtype)
    phi = features(inputs)
    embeddings = phi
    for layer in layers[1:]:
        embeddings = layer(embeddings)
    return keras.Model(inputs, [embeddings, phi], name=f"{embedder.name}_and_features")
