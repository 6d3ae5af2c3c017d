"""keras-dml: deep metric learning for Keras 3.

The losses are importable from the top level (`keras_dml.TripletLoss`); the
other parts live in sub-packages named after what they are:
`keras_dml.distances`, `keras_dml.losses`, `keras_dml.mining`,
`keras_dml.heads`, `keras_dml.layers`, `keras_dml.models`,
`keras_dml.evaluation`, `keras_dml.index`. Two sub-packages need TensorFlow
whatever the Keras backend and are imported explicitly:
`keras_dml.data` (tf.data pipelines) and `keras_dml.export` (SavedModel,
TFLite).
"""

from keras_dml import (
    callbacks,
    distances,
    evaluation,
    heads,
    index,
    layers,
    losses,
    mining,
    models,
    plots,
)
from keras_dml.losses import (
    CircleLoss,
    ContrastiveLoss,
    LiftedStructLoss,
    MetricLoss,
    MultiSimilarityLoss,
    NPairsLoss,
    NTXentLoss,
    QuadrupletLoss,
    SupConLoss,
    TripletHardLoss,
    TripletLoss,
    TripletSemiHardLoss,
)
from keras_dml.version import __version__

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
    "__version__",
    "callbacks",
    "distances",
    "evaluation",
    "heads",
    "index",
    "layers",
    "losses",
    "mining",
    "models",
    "plots",
]
