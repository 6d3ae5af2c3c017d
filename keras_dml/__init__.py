"""keras-dml: deep metric learning for Keras 3.

The losses are importable from the top level (`keras_dml.TripletLoss`); the
other parts live in sub-packages named after what they are:
`keras_dml.distances`, `keras_dml.losses`, `keras_dml.evaluation`.
"""

from keras_dml import distances, losses, mining
from keras_dml.losses import (
    MetricLoss,
    TripletHardLoss,
    TripletLoss,
    TripletSemiHardLoss,
)
from keras_dml.version import __version__

__all__ = [
    "MetricLoss",
    "TripletHardLoss",
    "TripletLoss",
    "TripletSemiHardLoss",
    "__version__",
    "distances",
    "losses",
    "mining",
]
