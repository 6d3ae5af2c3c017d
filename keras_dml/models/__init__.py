"""Models that wrap a backbone for training.

- `MarginModel`: backbone + margin head (ArcFace, CosFace, SoftTriple, ...).
- `S2SD`: similarity-based self-distillation from high-dimensional target heads.
- `SiameseModel`: two inputs, one shared backbone, a distance output (contrastive loss).
"""

from keras_dml.models.margin_model import MarginModel
from keras_dml.models.s2sd import S2SD, similarity_distillation
from keras_dml.models.siamese import (
    ContrastivePairLoss,
    SiameseModel,
    make_pair_indices,
    make_pairs,
    paired_distance,
)

__all__ = [
    "ContrastivePairLoss",
    "MarginModel",
    "S2SD",
    "SiameseModel",
    "make_pair_indices",
    "make_pairs",
    "paired_distance",
    "similarity_distillation",
]
