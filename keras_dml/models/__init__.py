"""Models that wrap a backbone for training.

- `MarginModel`: backbone + margin head (ArcFace, CosFace, SoftTriple, ...).
- `S2SD`: similarity-based self-distillation from high-dimensional target heads.
"""

from keras_dml.models.margin_model import MarginModel
from keras_dml.models.s2sd import S2SD, similarity_distillation

__all__ = ["MarginModel", "S2SD", "similarity_distillation"]
