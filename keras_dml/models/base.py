"""Plumbing shared by the models: a backbone, parts used only in training, an inference model out.

Every model in `keras_dml.models` wraps a backbone (or LoCo's stages) with
parts that only training needs: a margin head, S2SD's target heads, LoCo's
decoders, a Siamese pair. `BackboneModel` holds what they share:

- `embedding_model()`: the inference model, one-input raw data to
  embeddings, without the training-only parts (the one public name on every
  model class; `LoCo.encoder()` is an alias);
- `embed(x)`: the embeddings of `x` as a NumPy array;
- `compile_from_config`: a model with a custom `compile` is compiled again
  when a `.keras` file is loaded (Keras skips a custom `compile` otherwise).

And two helpers: `call_head` (a margin head's logits and added losses, on
every backend) and `known_output_shape` (a functional backbone's output
shape, so that the model is built at construction).
"""

from __future__ import annotations

import keras
import numpy as np


class BackboneModel(keras.Model):
    """Base of the models that train a backbone with extra parts and serve the backbone's output.

    A subclass records the input shape it was built with
    (`_record_input_shape`) and, when its inference model is more than the
    backbone, says how to compute the embeddings from symbolic inputs
    (`_embedding_outputs`).
    """

    # `embedding_model()` is named `<model name>_<suffix>`.
    _embedding_model_suffix = "embedding"
    # How to build the model, for the error raised before it is built.
    _build_hint = "call it on data"

    def _record_input_shape(self, input_shape) -> None:
        self._inference_input_shape = tuple(input_shape)

    def _backbone_is_embedding_model(self) -> bool:
        """Whether `embedding_model()` is the backbone itself (no layer after it at inference)."""
        return False

    def _embedding_outputs(self, inputs):
        """The inference embeddings of symbolic `inputs` (default: the backbone's output)."""
        return self.backbone(inputs)

    def _inference_input(self):
        """A `keras.Input` like the model's inputs: the backbone's own, else the recorded shape."""
        backbone = getattr(self, "backbone", None)
        inputs = getattr(backbone, "inputs", None) if isinstance(backbone, keras.Model) else None
        if inputs:
            if len(inputs) != 1:
                raise ValueError("`embedding_model()` supports backbones with a single input.")
            return keras.Input(shape=tuple(inputs[0].shape)[1:], dtype=inputs[0].dtype)
        shape = getattr(self, "_inference_input_shape", None)
        if shape is None:
            raise ValueError(
                f"Build the model ({self._build_hint}) before asking for its embedding model."
            )
        return keras.Input(shape=tuple(shape)[1:])

    def embedding_model(self) -> keras.Model:
        """The inference model, without training-only parts: save, export or index this one.

        It shares the trained weights (nothing is copied) and maps one raw
        input batch to its embeddings.
        """
        if self._backbone_is_embedding_model():
            return self.backbone
        return self._functional_embedding_model(self._embedding_outputs)

    def _functional_embedding_model(self, outputs_fn) -> keras.Model:
        """A functional model from `_inference_input()` to `outputs_fn(inputs)`."""
        inputs = self._inference_input()
        return keras.Model(
            inputs, outputs_fn(inputs), name=f"{self.name}_{self._embedding_model_suffix}"
        )

    def embed(self, x, batch_size: int | None = None, verbose: int = 0) -> np.ndarray:
        """Embeddings of `x` from `embedding_model()`, as a NumPy array."""
        return self.embedding_model().predict(x, batch_size=batch_size, verbose=verbose)

    def compile_from_config(self, config):
        # Keras skips a custom `compile` when loading unless this is defined;
        # the stored config holds the final optimizer and loss, so plain
        # `compile` rebuilds them.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built and getattr(self, "optimizer", None) is not None:
            self.optimizer.build(self.trainable_variables)


def deserialize_parts(config: dict, names, custom_objects=None) -> dict:
    """A copy of a model's `config` with the Keras objects under `names` deserialized.

    The one `from_config` step every `BackboneModel` shares: the backbone (and
    a head, ...) are stored as serialized configs; a name that is absent or
    `None` is left as it is.

    Args:
        config: the dict `get_config` returned.
        names: the keys holding serialized Keras objects.
        custom_objects: passed to `keras.saving.deserialize_keras_object`.

    Returns:
        A new dict, ready for `cls(**config)`.
    """
    config = dict(config)
    for name in names:
        if config.get(name) is not None:
            config[name] = keras.saving.deserialize_keras_object(
                config[name], custom_objects=custom_objects
            )
    return config


def call_head(head, embeddings, labels, training):
    """Runs a margin head with its current variables; returns `(logits, losses it added)`.

    `stateless_call` collects the head's `add_loss` on every backend (under
    JAX `compute_loss` runs in a scope that would drop them) and returns its
    updated non-trainable variables (AdaCos's scale), written back here.
    """
    logits, non_trainable, losses = head.stateless_call(
        head.trainable_variables,
        head.non_trainable_variables,
        embeddings,
        labels,
        return_losses=True,
        training=training,
    )
    if training:
        for variable, value in zip(head.non_trainable_variables, non_trainable, strict=True):
            variable.assign(value)
    return logits, losses


def known_output_shape(backbone, expected: str = "(batch, dim)"):
    """The backbone's output shape when it is already known (functional, built Sequential).

    Args:
        backbone: the wrapped layer or model.
        expected: the shape the model needs, for the error message.

    Returns:
        The output shape, or None when it is not known before a call.

    Raises:
        ValueError: when the backbone has several outputs.
    """
    if not isinstance(backbone, keras.Model):
        return None
    try:
        shape = backbone.output_shape
    except (AttributeError, ValueError, RuntimeError):
        return None
    if not isinstance(shape, tuple) or not all(d is None or isinstance(d, int) for d in shape):
        raise ValueError(f"`backbone` must have a single output of shape {expected}, got {shape}.")
    return shape


def has_symbolic_io(backbone) -> bool:
    """Whether `backbone` is a built model with symbolic inputs and outputs.

    True for functional models and for a Sequential that starts with `keras.Input`.
    """
    if not isinstance(backbone, keras.Model):
        return False
    try:
        inputs, outputs = backbone.inputs, backbone.outputs
    except (AttributeError, ValueError, RuntimeError):
        return False
    return bool(inputs) and bool(outputs)
