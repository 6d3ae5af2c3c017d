"""Embed and index a gallery on Apache Beam (`pip install keras-dml[beam]`).

`build_index` reads items (TFRecords, image files, a TFDS split), embeds them
with Beam ML's `RunInference` and `KerasModelHandler`, and writes one index
per shard plus the `ShardedIndex` manifest; `keras-dml index` runs it from the
shell. Importing this package needs `apache_beam`.
"""

from keras_dml.beam.index_pipeline import build_index, read_embeddings, train_kmeans
from keras_dml.beam.model_handler import KerasModelHandler, fit_image

__all__ = ["KerasModelHandler", "build_index", "fit_image", "read_embeddings", "train_kmeans"]
