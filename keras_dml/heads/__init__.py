"""Margin heads: Keras layers that own the class centres and return logits.

Calling convention, for every head:

- `head(embeddings, labels)` (training): margin-adjusted, scaled logits
  `(batch, num_classes)` for `SparseCategoricalCrossentropy(from_logits=True)`;
- `head(embeddings)` (inference): scaled cosine logits, no margin.

`head.kernel` holds the centres, shape `(embedding_dim, num_classes *
centers_per_class)`, columns class-major (column `c * K + k` is centre `k` of
class `c`). Constructors take `num_classes` first, then the paper's
hyperparameters by name. Wrap a backbone and a head in
`keras_dml.models.MarginModel` to train with `compile()`/`fit()`.
"""

from keras_dml.heads.adacos import AdaCos
from keras_dml.heads.arcface import ArcFace, SubCenterArcFace, additive_angular_margin
from keras_dml.heads.base import CosineHead
from keras_dml.heads.cosface import CosFace
from keras_dml.heads.dynamic_margin import dynamic_margins
from keras_dml.heads.softtriple import SoftTriple, count_distinct_centers

__all__ = [
    "AdaCos",
    "ArcFace",
    "CosFace",
    "CosineHead",
    "SoftTriple",
    "SubCenterArcFace",
    "additive_angular_margin",
    "count_distinct_centers",
    "dynamic_margins",
]
