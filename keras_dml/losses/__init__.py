"""Metric-learning losses: `keras.losses.Loss` subclasses taking integer labels and embeddings."""

from keras_dml.losses.base import MetricLoss, multi_hot
from keras_dml.losses.circle import CircleLoss, circle_loss
from keras_dml.losses.contrastive import ContrastiveLoss, contrastive_loss
from keras_dml.losses.lifted_struct import LiftedStructLoss, lifted_struct_loss
from keras_dml.losses.multi_similarity import MultiSimilarityLoss, multi_similarity_loss
from keras_dml.losses.npairs import NPairsLoss, npairs_loss, npairs_loss_from_similarity
from keras_dml.losses.ntxent import NTXentLoss, nt_xent_loss
from keras_dml.losses.quadruplet import QuadrupletLoss, hardest_negative_pair, quadruplet_loss
from keras_dml.losses.supcon import SupConLoss, supcon_loss
from keras_dml.losses.triplet import (
    TripletHardLoss,
    TripletLoss,
    TripletSemiHardLoss,
    triplet_hard_loss,
    triplet_loss,
    triplet_semihard_loss,
)

__all__ = [
    "CircleLoss",
    "ContrastiveLoss",
    "LiftedStructLoss",
    "MetricLoss",
    "MultiSimilarityLoss",
    "NPairsLoss",
    "NTXentLoss",
    "QuadrupletLoss",
    "SupConLoss",
    "TripletHardLoss",
    "TripletLoss",
    "TripletSemiHardLoss",
    "circle_loss",
    "hardest_negative_pair",
    "quadruplet_loss",
    "contrastive_loss",
    "lifted_struct_loss",
    "multi_similarity_loss",
    "npairs_loss",
    "npairs_loss_from_similarity",
    "nt_xent_loss",
    "supcon_loss",
    "triplet_hard_loss",
    "triplet_loss",
    "triplet_semihard_loss",
    "multi_hot",
]
