"""Metric-learning losses: `keras.losses.Loss` subclasses taking integer labels and embeddings."""

from keras_dml.losses.angular import AngularLoss, angular_loss
from keras_dml.losses.base import MetricLoss, multi_hot
from keras_dml.losses.circle import CircleLoss, circle_loss
from keras_dml.losses.contrastive import ContrastiveLoss, contrastive_loss
from keras_dml.losses.dynamic_soft_margin import DynamicSoftMarginLoss, dynamic_soft_margin_loss
from keras_dml.losses.fast_ap import FastAPLoss, fast_ap_loss
from keras_dml.losses.generalized_lifted_structure import (
    GeneralizedLiftedStructureLoss,
    generalized_lifted_structure_loss,
)
from keras_dml.losses.histogram import HistogramLoss, histogram_loss
from keras_dml.losses.instance import InstanceLoss, instance_loss
from keras_dml.losses.intra_pair_variance import IntraPairVarianceLoss, intra_pair_variance_loss
from keras_dml.losses.lifted_struct import LiftedStructLoss, lifted_struct_loss
from keras_dml.losses.margin import MarginLoss, margin_loss
from keras_dml.losses.multi_similarity import MultiSimilarityLoss, multi_similarity_loss
from keras_dml.losses.multiple import MultipleLosses
from keras_dml.losses.nca import NCALoss, nca_loss
from keras_dml.losses.npairs import NPairsLoss, npairs_loss, npairs_loss_from_similarity
from keras_dml.losses.ntxent import NTXentLoss, nt_xent_loss
from keras_dml.losses.pnp import PNPLoss, pnp_loss
from keras_dml.losses.quadruplet import QuadrupletLoss, hardest_negative_pair, quadruplet_loss
from keras_dml.losses.ranked_list import RankedListLoss, ranked_list_loss
from keras_dml.losses.smooth_ap import SmoothAPLoss, smooth_ap_loss
from keras_dml.losses.snr_contrastive import SignalToNoiseRatioContrastiveLoss, snr_contrastive_loss
from keras_dml.losses.supcon import SupConLoss, supcon_loss
from keras_dml.losses.threshold_consistent_margin import (
    ThresholdConsistentMarginLoss,
    threshold_consistent_margin_loss,
)
from keras_dml.losses.triplet import (
    TripletHardLoss,
    TripletLoss,
    TripletSemiHardLoss,
    triplet_hard_loss,
    triplet_loss,
    triplet_semihard_loss,
)
from keras_dml.losses.tuplet_margin import TupletMarginLoss, tuplet_margin_loss
from keras_dml.losses.vicreg import VICRegLoss, vicreg_loss

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
    "AngularLoss",
    "angular_loss",
    "GeneralizedLiftedStructureLoss",
    "generalized_lifted_structure_loss",
    "InstanceLoss",
    "instance_loss",
    "IntraPairVarianceLoss",
    "intra_pair_variance_loss",
    "MarginLoss",
    "margin_loss",
    "NCALoss",
    "nca_loss",
    "RankedListLoss",
    "ranked_list_loss",
    "SignalToNoiseRatioContrastiveLoss",
    "snr_contrastive_loss",
    "ThresholdConsistentMarginLoss",
    "threshold_consistent_margin_loss",
    "TupletMarginLoss",
    "tuplet_margin_loss",
    "FastAPLoss",
    "HistogramLoss",
    "PNPLoss",
    "SmoothAPLoss",
    "VICRegLoss",
    "fast_ap_loss",
    "histogram_loss",
    "pnp_loss",
    "smooth_ap_loss",
    "vicreg_loss",
    "multi_hot",
    "DynamicSoftMarginLoss",
    "dynamic_soft_margin_loss",
    "MultipleLosses",
]
