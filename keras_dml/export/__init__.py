"""Deployment: SavedModels for TensorFlow Serving and TFLite / LiteRT flatbuffers.

- `export_embedding_model(model, path)`: raw input -> L2-normalised embedding.
- `export_retrieval_model(model, index, path, k=10, use_scann=False)`: raw
  input -> top-k ids and scores from a `keras_dml.index` index.
- `export_tflite(model, path, quantization=None | "float16" | "int8")`.

These use TensorFlow directly and need the TensorFlow backend's models.
"""

from keras_dml.export.saved_model import (
    EMBED_SIGNATURE,
    EXACT_SIGNATURE,
    SCANN_SIGNATURE,
    SERVING_SIGNATURE,
    export_embedding_model,
    export_retrieval_model,
)
from keras_dml.export.tflite import export_tflite

__all__ = [
    "EMBED_SIGNATURE",
    "EXACT_SIGNATURE",
    "SCANN_SIGNATURE",
    "SERVING_SIGNATURE",
    "export_embedding_model",
    "export_retrieval_model",
    "export_tflite",
]
