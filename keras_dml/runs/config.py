"""`TrainConfig`: the options of one training run, typed, checked and frozen.

`keras-dml train` builds one from its arguments; `train_run` takes one (or a
plain dict, which it converts with `TrainConfig.from_dict`). A run writes the
config it resolved (backbone defaults, batch sizing, run id) as its
`config.json` with `to_dict`, and `from_dict` reads that file back, including
the shape written before run ids and `--max-classes` existed.

No Keras or TensorFlow import: the command line checks a config before
loading anything heavy.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

from keras_dml.runs import registry

PROJECTIONS = ("pca", "umap", "auto")
WEIGHTS = ("imagenet", "none")
VERBOSITIES = (0, 1, 2)
# Keys `keras-dml train` has always written into config.json that are not
# options of a run: the subcommand and the (empty) Beam options of `index`.
CLI_KEYS = {"command": "train", "pipeline_args": []}


# -- checks: each returns the value in its stored type or raises a ValueError naming the key --


def _integer(value, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"`{key}` must be {what}, got {value!r}.")
    return int(value)


def _number(value, key: str, minimum: float = 0.0, strict: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"`{key}` must be a finite number, got {value!r}.")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"`{key}` must be {'>' if strict else '>='} {minimum}, got {value!r}.")
    return float(value)


def _flag(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{key}` must be True or False, got {value!r}.")
    return value


def _text(value, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"`{key}` must be a non-empty string, got {value!r}.")
    return value


def _one_of(options: tuple) -> Callable[[Any, str], Any]:
    def check(value, key):
        if isinstance(value, bool) or value not in options:
            raise ValueError(f"`{key}` must be one of {', '.join(map(str, options))}; "
                             f"got {value!r}.")
        return value

    return check


def _dims(value, key: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"`{key}` must be a list of positive integers, got {value!r}.")
    return tuple(_integer(d, f"{key}[{i}]", 1) for i, d in enumerate(value))


def _holdout(value, key: str) -> float:
    value = _number(value, key, strict=False)
    if value >= 1.0:
        raise ValueError(f"`{key}` must be a fraction in [0, 1), got {value!r}.")
    return value


def _positive_int(value, key):
    return _integer(value, key, 1)


def _non_negative_int(value, key):
    return _integer(value, key, 0)


def _positive(value, key):
    return _number(value, key)


def _non_negative(value, key):
    return _number(value, key, strict=False)


def _option(default, check, optional: bool = False, run: bool = False):
    """A field: `check` converts and checks a value; `run`: decided by the run, not the user."""
    return dataclasses.field(default=default,
                             metadata={"check": check, "optional": optional, "run": run})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The options of one training run (`keras-dml train`), typed and checked.

    Defaults are the command line's. `None` means "decided by the run":
    `train_run` returns the config it resolved in `TrainResult.config` and
    writes it as the run's `config.json` (`to_dict`).

    Attributes:
        dataset: `glyphs`, `digits` (bundled, offline), `mnist`,
            `caltech_birds2011`, `cars196`, `stanford_online_products` (TFDS);
            aliases such as `cub` and `sop` are accepted and stored canonical.
        loss: a loss or margin head of `keras_dml.runs.registry.LOSSES`
            (`triplet`, `multisimilarity`, `arcface`, ...), stored canonical.
        s2sd: train with S2SD self-distillation.
        s2sd_target_dims: S2SD target head widths (None: 4x, 8x and 16x the
            embedding dim, at most 2048).
        distillation_weight: S2SD distillation weight (>= 0).
        s2sd_features: also distil from the backbone features (MSDF); needs
            `s2sd`.
        epochs: training epochs.
        steps_per_epoch: None: one pass over the training images.
        batch_size: images per batch (None: 80 on glyphs, digits and MNIST,
            64 otherwise).
        classes_per_batch: P of the P x M batches (None: min(classes, 16)).
        embedding_dim: None: 32 for `small_conv`, 128 otherwise.
        learning_rate: Adam's (None: 1e-3 for `small_conv`, 1e-4 otherwise).
        centers_lr_multiplier: margin heads: the class centres' learning
            rate is this times `learning_rate`.
        backbone: `auto` (`small_conv` on the small-image datasets,
            `resnet50` otherwise), `small_conv` or a Keras application.
        weights: `imagenet` or `none`, a Keras application's initial weights.
        image_size: input side in pixels (None: the backbone's).
        holdout: fraction in [0, 1) of the training classes' images held
            out to measure retrieval on seen classes.
        max_images: use at most this many images per part.
        max_classes: glyphs only: this many characters (>= 2), drawn at random.
        data_dir: TFDS data directory.
        download: let TFDS download and prepare a missing dataset.
        projection: 2-D projection of the embedding plot: `pca`, `umap`, `auto`.
        seed: seed of the split, the draws and the weights (>= 0).
        verbose: Keras `fit` verbosity: 0, 1 or 2.
        out: the run directory (`train_run` records where it wrote).
        version, run_id, preprocessing, input_shape, num_train_classes,
        samples_per_class, s2sd_feature_delay, fit_seconds: decided by the
            run; None before it (and absent from `to_dict`).

    Raises:
        ValueError: naming the key, for a value of the wrong type or out of
            range, an unknown dataset, loss, backbone or projection,
            `s2sd_features` without `s2sd`, `max_classes` on another dataset
            than glyphs.

    Example:

    >>> from keras_dml.runs import TrainConfig
    >>> config = TrainConfig(dataset="digits", loss="Multi_Similarity", epochs=1)
    >>> config.loss, config.backbone, config.embedding_dim
    ('multisimilarity', 'auto', None)
    >>> TrainConfig.from_dict(config.to_dict()) == config
    True
    >>> TrainConfig(epochs=0)
    Traceback (most recent call last):
    ...
    ValueError: `epochs` must be a positive integer, got 0.
    """

    dataset: str = _option("glyphs", lambda value, key: registry.canonical_dataset(
        _text(value, key)))
    loss: str = _option("triplet", lambda value, key: registry.canonical_loss(_text(value, key)))
    s2sd: bool = _option(False, _flag)
    s2sd_target_dims: tuple[int, ...] | None = _option(None, _dims, optional=True)
    distillation_weight: float = _option(50.0, _non_negative)
    s2sd_features: bool = _option(False, _flag)
    epochs: int = _option(15, _positive_int)
    steps_per_epoch: int | None = _option(None, _positive_int, optional=True)
    batch_size: int | None = _option(None, _positive_int, optional=True)
    classes_per_batch: int | None = _option(None, _positive_int, optional=True)
    embedding_dim: int | None = _option(None, _positive_int, optional=True)
    learning_rate: float | None = _option(None, _positive, optional=True)
    centers_lr_multiplier: float = _option(10.0, _positive)
    backbone: str = _option("auto", _one_of(registry.BACKBONES))
    weights: str = _option("imagenet", _one_of(WEIGHTS))
    image_size: int | None = _option(None, _positive_int, optional=True)
    holdout: float = _option(0.2, _holdout)
    max_images: int | None = _option(None, _positive_int, optional=True)
    max_classes: int | None = _option(None, lambda value, key: _integer(value, key, 2),
                                      optional=True)
    data_dir: str | None = _option(None, _text, optional=True)
    download: bool = _option(False, _flag)
    projection: str = _option("pca", _one_of(PROJECTIONS))
    seed: int = _option(0, _non_negative_int)
    verbose: int = _option(1, _one_of(VERBOSITIES))
    out: str | None = _option(None, _text, optional=True)
    # Decided by the run (prepare_run, build_training_model, train_run).
    version: int | None = _option(None, _positive_int, optional=True, run=True)
    run_id: str | None = _option(None, _text, optional=True, run=True)
    preprocessing: str | None = _option(None, _text, optional=True, run=True)
    input_shape: tuple[int, ...] | None = _option(None, _dims, optional=True, run=True)
    num_train_classes: int | None = _option(None, _positive_int, optional=True, run=True)
    samples_per_class: int | None = _option(None, _positive_int, optional=True, run=True)
    s2sd_feature_delay: int | None = _option(None, _non_negative_int, optional=True, run=True)
    fit_seconds: float | None = _option(None, _non_negative, optional=True, run=True)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and field.metadata["optional"]:
                continue
            object.__setattr__(self, field.name, field.metadata["check"](value, field.name))
        if self.s2sd_features and not self.s2sd:
            raise ValueError("`s2sd_features=True` needs `s2sd=True`.")
        if self.max_classes is not None and self.dataset != "glyphs":
            raise ValueError(f"`max_classes` applies to dataset 'glyphs' only, got dataset "
                             f"{self.dataset!r}.")

    @classmethod
    def all_keys(cls) -> tuple[str, ...]:
        """Every key `from_dict` accepts, in the order `to_dict` writes them."""
        names = [field.name for field in dataclasses.fields(cls)]
        cut = names.index("out") + 1
        return ("command", *names[:cut], "pipeline_args", *names[cut:])

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> TrainConfig:
        """The config of a dict of options, such as a run's `config.json`.

        Missing keys take their defaults (runs written before a key existed
        still load); `command` and `pipeline_args`, which `keras-dml train`
        writes too, must be `"train"` and empty.

        Raises:
            ValueError: for a key `TrainConfig` does not have (naming it) or
                a value it refuses.
        """
        if not isinstance(config, Mapping):
            raise ValueError(f"a train config must be a dict, got {type(config).__name__}.")
        known = cls.all_keys()
        unknown = [key for key in config if key not in known]
        if unknown:
            raise ValueError(f"unknown train config key(s): {', '.join(map(str, unknown))}; "
                             f"known keys: {', '.join(known)}.")
        for key, expected in CLI_KEYS.items():
            if key in config and config[key] != expected and not (
                    expected == [] and isinstance(config[key], tuple) and not config[key]):
                raise ValueError(f"`{key}` must be {expected!r} in a train config, got "
                                 f"{config[key]!r}.")
        return cls(**{key: value for key, value in config.items() if key not in CLI_KEYS})

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict a run writes as `config.json`, keys in the command line's order.

        `from_dict(config.to_dict()) == config`, and `to_dict` of a config
        read from a `config.json` written by this version gives that file's
        dict back, key order included. Values decided by the run are left
        out while they are None; tuples are written as lists.
        """
        fields = {field.name: field for field in dataclasses.fields(self)}
        result: dict[str, Any] = {}
        for key in self.all_keys():
            if key in CLI_KEYS:
                result[key] = list(CLI_KEYS[key]) if key == "pipeline_args" else CLI_KEYS[key]
                continue
            value = getattr(self, key)
            if value is None and fields[key].metadata["run"]:
                continue
            result[key] = list(value) if isinstance(value, tuple) else value
        return result

    def replace(self, **changes) -> TrainConfig:
        """A copy with `changes` applied (and checked)."""
        return dataclasses.replace(self, **changes)


def as_train_config(config: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    """`config` itself, or `TrainConfig.from_dict(config)` for a dict."""
    return config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
