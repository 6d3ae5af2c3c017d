"""Names a run accepts (`TrainConfig`, the command line): datasets, losses and heads, backbones.

Plain data with no TensorFlow import, so that a config (and the command line) rejects a
wrong name at once, before loading anything heavy.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from keras_dml.runs import rundir

# Name -> TFDS name (None: bundled, offline: glyphs rendered from matplotlib's fonts,
# scikit-learn's digits). Short aliases are the names the papers use.
DATASETS: dict[str, str | None] = {
    "glyphs": None,
    "digits": None,
    "mnist": "mnist",
    "caltech_birds2011": "caltech_birds2011",
    "cars196": "cars196",
    "stanford_online_products": "stanford_online_products",
}
DATASET_ALIASES = {"cub": "caltech_birds2011", "cub200": "caltech_birds2011", "cars": "cars196",
                   "sop": "stanford_online_products"}


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A training objective: a metric loss on embeddings, or a margin head over classes.

    Attributes:
        kind: `"loss"` (compiled on the embedding model) or `"head"` (a
            `keras_dml.heads` layer trained through `MarginModel`).
        module: module holding the class.
        class_name: class in `module`.
        kwargs: constructor arguments (besides `num_classes` for heads).
        help: one line for `--help`.
    """

    kind: str
    module: str
    class_name: str
    kwargs: dict[str, Any]
    help: str

    def resolve(self):
        """The loss or head class; `LookupError` if this keras-dml does not have it."""
        try:
            module = importlib.import_module(self.module)
            return getattr(module, self.class_name)
        except (ImportError, AttributeError) as error:
            raise LookupError(
                f"{self.module}.{self.class_name} is not available in this keras-dml"
            ) from error


LOSSES: dict[str, LossSpec] = {
    "triplet": LossSpec("loss", "keras_dml.losses", "TripletLoss",
                        {"margin": 0.2, "negative_mining": "semi-hard"},
                        "triplet loss, semi-hard negatives, margin 0.2, cosine embeddings"),
    "triplet-hard": LossSpec("loss", "keras_dml.losses", "TripletLoss",
                             {"margin": 0.2, "negative_mining": "hard"},
                             "triplet loss, batch-hard negatives"),
    "contrastive": LossSpec("loss", "keras_dml.losses", "ContrastiveLoss", {},
                            "contrastive loss over all pairs of the batch"),
    "multisimilarity": LossSpec("loss", "keras_dml.losses", "MultiSimilarityLoss", {},
                                "multi-similarity loss with its pair mining"),
    "circle": LossSpec("loss", "keras_dml.losses", "CircleLoss", {}, "circle loss"),
    "lifted": LossSpec("loss", "keras_dml.losses", "LiftedStructLoss", {},
                       "lifted structured loss"),
    "npairs": LossSpec("loss", "keras_dml.losses", "NPairsLoss", {}, "multi-class N-pair loss"),
    "supcon": LossSpec("loss", "keras_dml.losses", "SupConLoss", {},
                       "supervised contrastive loss"),
    "quadruplet": LossSpec("loss", "keras_dml.losses.quadruplet", "QuadrupletLoss", {},
                           "quadruplet loss"),
    "arcface": LossSpec("head", "keras_dml.heads", "ArcFace", {}, "ArcFace head (s=64, m=0.5)"),
    "subcenter-arcface": LossSpec("head", "keras_dml.heads", "SubCenterArcFace", {},
                                  "sub-center ArcFace head (K=3)"),
    "cosface": LossSpec("head", "keras_dml.heads", "CosFace", {}, "CosFace head (s=64, m=0.35)"),
    "adacos": LossSpec("head", "keras_dml.heads", "AdaCos", {}, "AdaCos head (adaptive scale)"),
    "softtriple": LossSpec("head", "keras_dml.heads", "SoftTriple", {},
                           "SoftTriple head (K=10 centres per class)"),
    "sphereface": LossSpec("head", "keras_dml.heads", "SphereFace", {}, "SphereFace head (m=4)"),
    "curricularface": LossSpec("head", "keras_dml.heads", "CurricularFace", {},
                               "CurricularFace head"),
    "proxy-anchor": LossSpec("head", "keras_dml.heads", "ProxyAnchor", {}, "Proxy-Anchor loss"),
    "proxy-nca": LossSpec("head", "keras_dml.heads", "ProxyNCA", {}, "ProxyNCA loss"),
    "center": LossSpec("head", "keras_dml.heads", "CenterLoss", {},
                       "softmax + centre loss head"),
}

# The Keras application behind each backbone name of keras_dml.data.tfds.BACKBONES.
KERAS_APPLICATIONS = {
    "resnet50": "ResNet50",
    "resnet50v2": "ResNet50V2",
    "mobilenetv2": "MobileNetV2",
    "efficientnetb0": "EfficientNetB0",
    "efficientnetv2b0": "EfficientNetV2B0",
    "convnexttiny": "ConvNeXtTiny",
    "densenet121": "DenseNet121",
    "inceptionv3": "InceptionV3",
}
BACKBONES = ("auto", "small_conv", *KERAS_APPLICATIONS)

# Artefacts of a run directory, by the name `evaluate --using` takes: the names
# are `keras_dml.runs.rundir`'s (one table of run-file names), re-exported here.
MODEL_FILES = rundir.MODEL_FILES


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def canonical_dataset(name: str) -> str:
    """The registered dataset for `name` (aliases, case, `-`/`_` ignored); `ValueError` else."""
    wanted = _key(name)
    for known in DATASETS:
        if _key(known) == wanted:
            return known
    for alias, known in DATASET_ALIASES.items():
        if _key(alias) == wanted:
            return known
    raise ValueError(f"unknown dataset {name!r}; choose from: {', '.join(DATASETS)}")


def canonical_loss(name: str) -> str:
    """The registered loss name for `name` (case, `-`/`_` ignored); `ValueError` otherwise."""
    wanted = _key(name)
    for known in LOSSES:
        if _key(known) == wanted:
            return known
    raise ValueError(f"unknown loss {name!r}; choose from: {', '.join(LOSSES)}")
