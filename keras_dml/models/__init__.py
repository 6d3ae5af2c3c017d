"""Models that wrap a backbone for training: `MarginModel` (backbone + margin head)."""

from keras_dml.models.margin_model import MarginModel

__all__ = ["MarginModel"]
