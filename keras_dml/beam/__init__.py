"""Embed and index a gallery on Apache Beam (`pip install keras-dml[beam]`).

`build_index` reads items (TFRecords, image files, a TFDS split), embeds them
with Beam ML's `RunInference` and `KerasModelHandler`, and writes one index
per shard plus the `ShardedIndex` manifest; `keras-dml index` runs it from the
shell. The names below import `apache_beam` when first used
(`keras_dml.beam.checks` needs neither Beam nor TensorFlow).
"""

import importlib

_NAMES = {
    "IndexEmbeddings": "keras_dml.beam.index_pipeline",
    "build_index": "keras_dml.beam.index_pipeline",
    "read_embeddings": "keras_dml.beam.index_pipeline",
    "train_kmeans": "keras_dml.beam.index_pipeline",
    "KerasModelHandler": "keras_dml.beam.model_handler",
    "fit_image": "keras_dml.beam.model_handler",
}

__all__ = sorted(_NAMES)


def __getattr__(name):
    if name not in _NAMES:
        raise AttributeError(f"module 'keras_dml.beam' has no attribute {name!r}")
    return getattr(importlib.import_module(_NAMES[name]), name)
