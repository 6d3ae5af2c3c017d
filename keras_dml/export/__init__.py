"""Deployment: SavedModels for TensorFlow Serving and TFLite / LiteRT flatbuffers.

- `export_embedding_model(model, path)`: raw input -> L2-normalised embedding.
- `export_retrieval_model(model, index, path, k=10, use_scann=False)`: raw
  input -> top-k ids and scores from a `keras_dml.index` index.
- `export_tflite(model, path, quantization=None | "float16" | "int8")`.
- `export_verification_model(model, path, threshold_or_calibration, far=None,
  distance=None)`: two raw inputs -> score, same, threshold, far.

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
from keras_dml.export.verification import (
    CALIBRATION_SIGNATURE,
    VERIFY_SIGNATURE,
    export_verification_model,
    load_calibration,
)

__all__ = [
    "CALIBRATION_SIGNATURE",
    "VERIFY_SIGNATURE",
    "export_verification_model",
    "load_calibration",
    "EMBED_SIGNATURE",
    "EXACT_SIGNATURE",
    "SCANN_SIGNATURE",
    "SERVING_SIGNATURE",
    "export_embedding_model",
    "export_retrieval_model",
    "export_tflite",
]
