"""Evaluating embeddings: retrieval metrics and exact nearest neighbours."""

from keras_dml.evaluation.retrieval import nearest_neighbors, retrieval_metrics

__all__ = ["nearest_neighbors", "retrieval_metrics"]
