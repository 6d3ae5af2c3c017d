"""Metric-learning losses: `keras.losses.Loss` subclasses taking integer labels and embeddings."""

from keras_dml.losses.base import MetricLoss
from keras_dml.losses.triplet import (
    TripletHardLoss,
    TripletLoss,
    TripletSemiHardLoss,
    triplet_hard_loss,
    triplet_loss,
    triplet_semihard_loss,
)

__all__ = [
    "MetricLoss",
    "TripletHardLoss",
    "TripletLoss",
    "TripletSemiHardLoss",
    "triplet_hard_loss",
    "triplet_loss",
    "triplet_semihard_loss",
]
