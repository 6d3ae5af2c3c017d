"""Layers for embedding networks: GeM pooling, L2 normalisation, an embedding projection.

And `CrossBatchMemory`, the variables of a cross-batch memory (XBM) a model owns.
"""

from keras_dml.layers.embedding import L2Normalize, MetricEmbedding
from keras_dml.layers.memory import CrossBatchMemory
from keras_dml.layers.pooling import GeneralizedMeanPooling1D, GeneralizedMeanPooling2D

__all__ = [
    "CrossBatchMemory",
    "GeneralizedMeanPooling1D",
    "GeneralizedMeanPooling2D",
    "L2Normalize",
    "MetricEmbedding",
]
