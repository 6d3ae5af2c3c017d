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

Most heads are trained with softmax cross-entropy on these logits. A head
whose loss is something else (`ProxyAnchor`; `ProxyNCA` with
`exclude_positive=True`) returns it from `head.default_loss()`, a Keras loss
over `(labels, logits)` that `MarginModel.compile()` picks up. `CenterLoss`
adds its centre term with `add_loss`, as SoftTriple does its regulariser.
"""

from keras_dml.heads.adacos import AdaCos
from keras_dml.heads.arcface import ArcFace, SubCenterArcFace, additive_angular_margin
from keras_dml.heads.base import CosineHead
from keras_dml.heads.center import CenterLoss
from keras_dml.heads.cosface import CosFace
from keras_dml.heads.curricularface import CurricularFace
from keras_dml.heads.dynamic_margin import dynamic_margins
from keras_dml.heads.large_margin_softmax import LargeMarginSoftmax
from keras_dml.heads.manifold import Manifold, ManifoldLoss
from keras_dml.heads.normalized_softmax import NormalizedSoftmax
from keras_dml.heads.p2sgrad import P2SGrad, P2SGradLoss
from keras_dml.heads.proxy import ProxyAnchor, ProxyAnchorLoss, ProxyNCA, ProxyNCALoss
from keras_dml.heads.softtriple import SoftTriple, count_distinct_centers
from keras_dml.heads.sphereface import SphereFace, angular_margin_psi

__all__ = [
    "AdaCos",
    "ArcFace",
    "CenterLoss",
    "CosFace",
    "CosineHead",
    "CurricularFace",
    "ProxyAnchor",
    "ProxyAnchorLoss",
    "ProxyNCA",
    "ProxyNCALoss",
    "SoftTriple",
    "SphereFace",
    "SubCenterArcFace",
    "additive_angular_margin",
    "angular_margin_psi",
    "count_distinct_centers",
    "dynamic_margins",
    "LargeMarginSoftmax",
    "Manifold",
    "ManifoldLoss",
    "NormalizedSoftmax",
    "P2SGrad",
    "P2SGradLoss",
]
