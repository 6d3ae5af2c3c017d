"""Evaluating embeddings: retrieval metrics, verification, query expansion and re-ranking."""

from keras_dml.evaluation.reranking import (
    alpha_query_expansion,
    average_query_expansion,
    database_augmentation,
    index_rows,
    k_reciprocal_rerank,
)
from keras_dml.evaluation.retrieval import nearest_neighbors, retrieval_metrics
from keras_dml.evaluation.verification import (
    ThresholdCalibration,
    calibrate_threshold,
    pair_scores,
    verification_metrics,
    verification_roc,
)

__all__ = [
    "ThresholdCalibration",
    "alpha_query_expansion",
    "average_query_expansion",
    "calibrate_threshold",
    "database_augmentation",
    "index_rows",
    "k_reciprocal_rerank",
    "nearest_neighbors",
    "pair_scores",
    "retrieval_metrics",
    "verification_metrics",
    "verification_roc",
]
