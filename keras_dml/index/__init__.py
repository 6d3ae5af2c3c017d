"""Nearest-neighbour indexes over embeddings: exact (NumPy), approximate (ScaNN), sharded, Milvus.

All share one interface: `add(embeddings, ids=None, metadata=None)`,
`search(queries, k)` -> `(ids, scores)`, `save(directory)`,
`Index.load(directory)` and `len(index)`.

Example:

>>> import numpy as np
>>> from keras_dml.index import ExactIndex
>>> index = ExactIndex()  # cosine similarity: "dot" on L2-normalised vectors
>>> index.add(np.eye(4, dtype="float32"), ids=[7, 8, 9, 10])
>>> index.search(np.array([[0.0, 0.0, 1.0, 0.2]], "float32"), k=2)[0].tolist()
[[9, 10]]
"""

from keras_dml.index.base import Index
from keras_dml.index.exact import ExactIndex
from keras_dml.index.milvus import MilvusIndex
from keras_dml.index.scann_index import ScaNNIndex
from keras_dml.index.sharded import ShardedIndex

__all__ = ["ExactIndex", "Index", "MilvusIndex", "ScaNNIndex", "ShardedIndex"]
