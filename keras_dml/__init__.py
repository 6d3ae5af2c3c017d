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

import os as _os
import sys as _sys

from keras_dml.version import __version__

_SUBMODULES = ("callbacks", "distances", "evaluation", "heads", "index", "layers", "losses",
               "mining", "models", "plots", "miners", "reducers", "regularizers")
_LOSSES = ("CircleLoss", "ContrastiveLoss", "LiftedStructLoss", "MetricLoss",
           "MultiSimilarityLoss", "NPairsLoss", "NTXentLoss", "QuadrupletLoss", "SupConLoss",
           "TripletHardLoss", "TripletLoss", "TripletSemiHardLoss")
# Issue 19: pair and tuple losses ported from pytorch-metric-learning.
_LOSSES += ("AngularLoss", "GeneralizedLiftedStructureLoss", "InstanceLoss",
            "IntraPairVarianceLoss", "MarginLoss", "NCALoss", "RankedListLoss",
            "SignalToNoiseRatioContrastiveLoss", "ThresholdConsistentMarginLoss",
            "TupletMarginLoss")
_LOSSES += ("FastAPLoss", "HistogramLoss", "PNPLoss", "SmoothAPLoss", "VICRegLoss")
_LOSSES += ("DynamicSoftMarginLoss", "MultipleLosses")


def _load_all() -> None:
    """Imports every sub-package (and so Keras and its backend) and the top-level losses."""
    import importlib

    namespace = globals()
    for name in _SUBMODULES:
        namespace[name] = importlib.import_module(f"keras_dml.{name}")
    for name in _LOSSES:
        namespace[name] = getattr(namespace["losses"], name)


def __getattr__(name):
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f"keras_dml.{name}")
    if name in _LOSSES:
        return getattr(importlib.import_module("keras_dml.losses"), name)
    raise AttributeError(f"module 'keras_dml' has no attribute {name!r}")


def _started_by_the_command_line() -> bool:
    # `keras-dml ...` (console script) or `python -m keras_dml.cli` (argv[0] is
    # "-m" while the module is located): the command line checks its
    # arguments before importing Keras and TensorFlow (seconds), then calls
    # `_load_all()` itself.
    first = _os.path.basename(_sys.argv[0]) if _sys.argv else ""
    return first in ("keras-dml", "-m")


if not _started_by_the_command_line():
    _load_all()

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
    "AngularLoss",
    "GeneralizedLiftedStructureLoss",
    "InstanceLoss",
    "IntraPairVarianceLoss",
    "MarginLoss",
    "NCALoss",
    "RankedListLoss",
    "SignalToNoiseRatioContrastiveLoss",
    "ThresholdConsistentMarginLoss",
    "TupletMarginLoss",
    "FastAPLoss",
    "HistogramLoss",
    "PNPLoss",
    "SmoothAPLoss",
    "VICRegLoss",
    "DynamicSoftMarginLoss",
    "MultipleLosses",
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
    "miners",
    "reducers",
    "regularizers",
    "plots",
]
