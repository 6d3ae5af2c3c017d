"""The data of a run: its zero-shot split, rebuilt the same from its config.

A run trains on some classes and is scored on classes never trained on.
`load_run_data(config)` returns a `RunData` for the bundled offline datasets
(scikit-learn's digits, glyphs from matplotlib's fonts) or a prepared TFDS
dataset; the same config gives the same split and preprocessing, so
`evaluate` and `export` reload what `train` used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from keras_dml.runs import registry
from keras_dml.runs.config import TrainConfig, as_train_config

# Datasets of small images, trained from scratch with the small conv backbone.
SMALL_DATASETS = ("glyphs", "digits", "mnist")


@dataclasses.dataclass
class RunData:
    """Everything a run needs from its dataset.

    `seen_*` are held-out images of the training classes, `unseen_*` the test
    classes never trained on. Inputs are NumPy arrays (digits, glyphs) or
    `tf.data.Dataset`s of input batches (TFDS), in the order of the labels.
    """

    input_shape: tuple[int, ...]
    num_train_classes: int
    train_size: int
    seen_x: Any
    seen_y: np.ndarray
    unseen_x: Any
    unseen_y: np.ndarray
    unseen_thumbnails: np.ndarray
    representative: np.ndarray
    make_train_batches: Any = None  # (classes_per_batch, samples_per_class, seed) -> dataset
    train_labels: np.ndarray | None = None  # labels of the training images, when in memory
    seen_batches_with_labels: Any = None  # TFDS: a dataset of (x, y) batches of the seen split

    def seen_validation_data(self):
        """`(x, y)` or a dataset of `(x, y)` batches for `RetrievalMetricsCallback`."""
        if isinstance(self.seen_x, np.ndarray):
            return self.seen_x, self.seen_y
        return self.seen_batches_with_labels


def batches(x, batch_size: int = 256) -> Iterator[np.ndarray]:
    """The input batches of `x`: slices of an array, or the batches of a dataset as arrays."""
    if isinstance(x, np.ndarray):
        for start in range(0, len(x), batch_size):
            yield x[start : start + batch_size]
    else:
        for batch in x:
            yield np.asarray(batch)


def _bundled_data(config: TrainConfig) -> RunData:
    """The bundled offline datasets: scikit-learn's digits, glyphs from matplotlib's fonts."""
    from keras_dml.data.sampler import m_per_class_dataset

    if config.dataset == "glyphs":
        from keras_dml.data.glyphs import load_glyphs_zero_shot

        data = load_glyphs_zero_shot(image_size=config.image_size or 32,
                                     validation_fraction=config.holdout, seed=config.seed,
                                     num_classes=config.max_classes)
    else:
        from keras_dml.data.digits import load_digits_zero_shot

        data = load_digits_zero_shot(holdout_fraction=config.holdout, seed=config.seed)
    x_train, y_train = data.x_train, data.y_train
    if config.max_images and config.max_images < len(x_train):
        # A seeded draw, not the first images: those can be a few classes only (glyphs).
        keep = np.sort(np.random.default_rng(config.seed).permutation(len(x_train))[
            : config.max_images])
        x_train, y_train = x_train[keep], y_train[keep]

    def make_train_batches(classes_per_batch, samples_per_class, seed):
        return m_per_class_dataset(x_train, y_train, classes_per_batch=classes_per_batch,
                                   samples_per_class=samples_per_class, seed=seed)

    return RunData(
        input_shape=tuple(x_train.shape[1:]),
        num_train_classes=data.num_train_classes,
        train_size=len(x_train),
        seen_x=data.x_seen,
        seen_y=data.y_seen,
        unseen_x=data.x_unseen,
        unseen_y=data.y_unseen,
        unseen_thumbnails=np.round(data.x_unseen * 255).astype("uint8"),
        representative=x_train[:200],
        make_train_batches=make_train_batches,
        train_labels=y_train,
    )


def _tfds_data(config: TrainConfig) -> RunData:
    from keras_dml.data import tfds as dml_tfds

    name = registry.DATASETS[config.dataset]
    spec = dml_tfds.zero_shot_spec(name)
    common = {"data_dir": config.data_dir, "download": config.download,
              "max_examples": config.max_images}
    train_all = dml_tfds.load_zero_shot(name, "train", **common)
    train, seen = dml_tfds.holdout_split(train_all, config.holdout, config.seed)
    unseen = dml_tfds.load_zero_shot(name, "test", **common)
    pipeline = {"image_size": config.image_size, "preprocessing": config.preprocessing}

    def inference(data, with_labels=False):
        return dml_tfds.inference_batches(data, batch_size=128, with_labels=with_labels,
                                          **pipeline)

    first = next(iter(inference(train.subset(range(min(len(train), 200))))))
    representative = np.asarray(first)

    def make_train_batches(classes_per_batch, samples_per_class, seed):
        return dml_tfds.training_batches(
            train, classes_per_batch=classes_per_batch, samples_per_class=samples_per_class,
            seed=seed, augment=True, **pipeline)

    side = 64 if len(unseen) <= 20_000 else 32
    return RunData(
        input_shape=tuple(representative.shape[1:]),
        num_train_classes=spec.num_train_classes,
        train_size=len(train),
        seen_x=inference(seen) if len(seen) else np.zeros((0, *representative.shape[1:])),
        seen_y=seen.labels,
        unseen_x=inference(unseen),
        unseen_y=unseen.labels,
        unseen_thumbnails=dml_tfds.thumbnails(unseen, size=min(side, representative.shape[1])),
        representative=representative,
        make_train_batches=make_train_batches,
        seen_batches_with_labels=inference(seen, with_labels=True),
    )


def load_run_data(config: TrainConfig | Mapping[str, Any]) -> RunData:
    """Rebuilds the data of a run from its config (same split, same preprocessing).

    Args:
        config: a `TrainConfig`, or a dict of its options (a `config.json`).
            TFDS datasets need `preprocessing`, which `train_run` resolves.

    Raises:
        keras_dml.data.tfds.DatasetUnavailableError: a TFDS dataset that is
            not prepared (and `download` is off).

    Example:

    >>> from keras_dml.runs import load_run_data
    >>> data = load_run_data({"dataset": "digits", "seed": 0})
    >>> data.input_shape, data.num_train_classes
    ((8, 8, 1), 5)
    """
    config = as_train_config(config)
    if registry.DATASETS[config.dataset] is None:
        return _bundled_data(config)
    return _tfds_data(config)
