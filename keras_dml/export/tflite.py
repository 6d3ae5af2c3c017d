"""Export an embedding model to a TFLite / LiteRT flatbuffer for phones, optionally quantized."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable

import numpy as np
import tensorflow as tf

from keras_dml.export.saved_model import _input_spec, export_embedding_model

QUANTIZATIONS = (None, "float16", "int8")


def _representative_dataset(data, spec: tf.TensorSpec) -> Callable[[], Iterable[list[np.ndarray]]]:
    """Turns samples into the generator the TFLite converter calibrates with."""
    if callable(data):
        return data
    samples = np.asarray(data, dtype=spec.dtype.as_numpy_dtype)
    expected = tuple(spec.shape)[1:]
    compatible = samples.ndim == len(expected) + 1 and all(
        want is None or want == got for want, got in zip(expected, samples.shape[1:], strict=False)
    )
    if not compatible or samples.shape[0] == 0:
        raise ValueError(
            "`representative_data` must hold one or more model inputs of shape "
            f"(num_samples, {', '.join(str(d) for d in expected)}), got shape {samples.shape}."
        )

    def generate():
        for sample in samples:
            yield [sample[np.newaxis]]

    return generate


def export_tflite(
    model,
    path: str,
    quantization: str | None = None,
    representative_data=None,
    input_signature: tf.TensorSpec | None = None,
) -> None:
    """Writes a `.tflite` file mapping raw inputs to L2-normalised embeddings.

    The flatbuffer computes what `export_embedding_model`'s `serving_default`
    computes, with TFLite builtin ops only (no Flex/Select TF ops), and runs
    with `ai_edge_litert.interpreter.Interpreter` or on-device LiteRT. The
    batch dimension is dynamic (resize the input tensor to batch).

    Quantization:

    - `None`: float32 weights and activations.
    - `"float16"`: float16 weights (half the size), float32 compute.
    - `"int8"`: int8 weights and activations, calibrated on
      `representative_data`; inputs and outputs stay float32 (the model
      quantizes and dequantizes at its edges).

    Args:
        model: a built single-input Keras model returning `(batch, dim)`.
        path: file to write, e.g. `"embedder.tflite"`.
        quantization: `None`, `"float16"` or `"int8"`.
        representative_data: for `"int8"` only, and required there: an array
            of typical raw inputs `(num_samples, ...)` (a few hundred from the
            training data is enough), or a callable returning an iterable of
            `[input_batch]` lists, TFLite's own format.
        input_signature: the input `tf.TensorSpec` when `model` has no
            `inputs`.

    Raises:
        ValueError: if `quantization` is unknown, `representative_data` is
            missing for `"int8"`, given for another mode, or has the wrong
            shape.

    Example:

    ```python
    keras_dml.export.export_tflite(
        embedder, "embedder_int8.tflite", quantization="int8",
        representative_data=x_train[:300],
    )
    interpreter = ai_edge_litert.interpreter.Interpreter("embedder_int8.tflite")
    ```
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"`quantization` must be one of {QUANTIZATIONS}, got {quantization!r}.")
    if quantization == "int8" and representative_data is None:
        raise ValueError(
            "`representative_data` is required for quantization='int8': pass a few hundred "
            "typical inputs so that activation ranges can be calibrated."
        )
    if quantization != "int8" and representative_data is not None:
        raise ValueError(
            "`representative_data` is only used with quantization='int8', got "
            f"quantization={quantization!r}."
        )
    spec = _input_spec(model, input_signature)
    if quantization == "int8":
        representative_dataset = _representative_dataset(representative_data, spec)
    with tempfile.TemporaryDirectory() as saved_model_dir:
        # Converting the serving SavedModel guarantees the same graph (and the
        # same normalisation) as `export_embedding_model`.
        export_embedding_model(model, saved_model_dir, input_signature=spec)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantization == "float16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        elif quantization == "int8":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = representative_dataset
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        flatbuffer = converter.convert()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "wb") as f:
        f.write(flatbuffer)
