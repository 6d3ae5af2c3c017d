"""Layers for embedding networks: GeM pooling, L2 normalisation, an embedding projection."""

from keras_dml.layers.embedding import L2Normalize, MetricEmbedding
from keras_dml.layers.pooling import GeneralizedMeanPooling1D, GeneralizedMeanPooling2D

__all__ = [
    "GeneralizedMeanPooling1D",
    "GeneralizedMeanPooling2D",
    "L2Normalize",
    "MetricEmbedding",
]
