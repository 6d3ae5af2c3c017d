"""Names the command line accepts: `keras_dml.runs.registry`, re-exported.

The run library owns the names (datasets, losses and heads, backbones) that
`keras_dml.runs.TrainConfig` checks; this module keeps the old import path
`keras_dml.cli.registry` working. No TensorFlow import.
"""

from keras_dml.runs.registry import (  # noqa: F401
    BACKBONES,
    DATASET_ALIASES,
    DATASETS,
    KERAS_APPLICATIONS,
    LOSSES,
    MODEL_FILES,
    LossSpec,
    canonical_dataset,
    canonical_loss,
)
