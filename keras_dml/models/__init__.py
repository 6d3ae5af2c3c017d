"""Models that wrap a backbone for training.

- `MarginModel`: backbone + margin head (ArcFace, CosFace, SoftTriple, ...).
- `PartialFCModel`: a `MarginModel` whose margin softmax is computed shard-wise over
  devices (Partial FC), with optional negative-centre sampling.
- `S2SD`: similarity-based self-distillation from high-dimensional target heads.
- `LoCo`: local contrastive learning with overlapping, gradient-isolated units.
- `SiameseModel`: two inputs, one shared backbone, a distance output (contrastive loss).
- `XBMModel`: a metric loss against a cross-batch memory of past batches (XBM).
"""

from keras_dml.models.loco import LoCo, LoCoDecoder
from keras_dml.models.margin_model import (
    MarginCrossentropy,
    MarginModel,
    inverse_frequency_weights,
)
from keras_dml.models.partial_fc import PartialFCModel, margin_softmax_cross_entropy
from keras_dml.models.s2sd import S2SD, similarity_distillation
from keras_dml.models.siamese import (
    ContrastivePairLoss,
    SiameseModel,
    make_pair_indices,
    make_pairs,
    paired_distance,
)
from keras_dml.models.xbm import XBMModel

__all__ = [
    "ContrastivePairLoss",
    "LoCo",
    "LoCoDecoder",
    "MarginCrossentropy",
    "MarginModel",
    "PartialFCModel",
    "inverse_frequency_weights",
    "S2SD",
    "SiameseModel",
    "make_pair_indices",
    "make_pairs",
    "margin_softmax_cross_entropy",
    "paired_distance",
    "similarity_distillation",
    "XBMModel",
]
