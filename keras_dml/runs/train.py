"""`train_run(config, out)`: the whole training journey of `keras-dml train`, as a library call.

Prepare the data (seeded split, batch sizing), build the model, score the
baselines, fit, score the trained embedding and backbone features, and write
every file of the run directory (models, SavedModels, TFLite, ScaNN index,
metrics, plots, `config.json`), whole or not at all. Nothing is printed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import keras
import numpy as np

from keras_dml.runs import report, rundir
from keras_dml.runs.build import (
    build_training_model,
    embedding_and_features_model,
    resolve_model_options,
    s2sd_feature_delay,
    s2sd_target_dims,
)
from keras_dml.runs.config import TrainConfig, as_train_config
from keras_dml.runs.data import SMALL_DATASETS, RunData, load_run_data
from keras_dml.runs.embed import embed_all
from keras_dml.runs.errors import RunError
from keras_dml.runs.metrics import K_VALUES, protocol, raw_pixels, score
from keras_dml.runs.rundir import RunDir

CONFIG_VERSION = 1


@dataclasses.dataclass
class TrainResult:
    """What `train_run` did.

    Attributes:
        metrics: the run's `metrics.json`.
        kept: where the previous run in `out` was kept because it held files
            no run writes (None when it was removed, or there was none).
        seconds: wall time of the whole run.
        config: the config the run resolved, as written to `config.json`.
        run: the run directory.
    """

    metrics: dict
    kept: str | None
    seconds: float
    config: TrainConfig | None = None
    run: RunDir | None = None


def require_tensorflow(what: str) -> None:
    """Raises `RunError` unless Keras runs on TensorFlow (SavedModel and TFLite need it)."""
    if keras.backend.backend() != "tensorflow":
        raise RunError(f"{what} writes SavedModels and TFLite files, which need "
                       f"KERAS_BACKEND=tensorflow (it is {keras.backend.backend()!r})")


def prepare_run(config: TrainConfig | Mapping[str, Any]) -> tuple[TrainConfig, RunData]:
    """Resolves `config` (run id, backbone, batch sizes) and loads its data, seeded.

    Returns the config with what the run decides filled in (`version`,
    `run_id`, the backbone's defaults, `input_shape`, `num_train_classes`, the
    P x M batch sizing, S2SD's target widths and feature delay) and the data.
    """
    config = as_train_config(config)
    config = resolve_model_options(config.replace(version=CONFIG_VERSION,
                                                  run_id=rundir.new_run_id()))
    keras.utils.set_random_seed(config.seed)
    data = load_run_data(config)

    small = config.dataset in SMALL_DATASETS
    batch_size = config.batch_size or (80 if small else 64)
    # Classes present in the training images (max_images can leave out some).
    present = data.num_train_classes if data.train_labels is None else len(
        np.unique(data.train_labels))
    classes = min(config.classes_per_batch or min(present, 16), present)
    samples = max(2, batch_size // classes)
    steps = config.steps_per_epoch or max(1, math.ceil(data.train_size / (classes * samples)))
    config = config.replace(input_shape=tuple(data.input_shape),
                            num_train_classes=data.num_train_classes,
                            classes_per_batch=classes, samples_per_class=samples,
                            steps_per_epoch=steps)
    if config.s2sd:
        config = config.replace(s2sd_target_dims=s2sd_target_dims(config))
        if config.s2sd_features:
            config = config.replace(s2sd_feature_delay=s2sd_feature_delay(config))
    return config, data


def score_baselines(data: RunData, embedder: keras.Model) -> dict:
    """Retrieval of raw pixels and of the untrained embedding, on both splits."""
    embed = lambda batch: np.asarray(embedder.predict_on_batch(batch))  # noqa: E731
    baselines = {
        "raw_pixels": {"seen": score(raw_pixels(data.seen_x), data.seen_y),
                       "unseen": score(raw_pixels(data.unseen_x), data.unseen_y)},
        "untrained": {"seen": score(embed_all(embed, data.seen_x), data.seen_y),
                      "unseen": score(embed_all(embed, data.unseen_x), data.unseen_y)},
    }
    return {name: value for name, value in baselines.items() if value["unseen"]}


def fit_run(model, embedder, data: RunData, config: TrainConfig) -> dict:
    """Fits `model` on the run's P x M batches; returns the history as lists of floats."""
    from keras_dml.callbacks import RetrievalMetricsCallback

    callbacks = []
    if len(data.seen_y) > 1:
        callbacks.append(RetrievalMetricsCallback(data.seen_validation_data(), k=K_VALUES,
                                                  embedding_model=embedder))
    history = model.fit(
        data.make_train_batches(config.classes_per_batch, config.samples_per_class, config.seed),
        epochs=config.epochs, steps_per_epoch=config.steps_per_epoch,
        callbacks=callbacks, verbose=config.verbose, shuffle=False)
    return {k: [float(v) for v in values] for k, values in history.history.items()}


def score_run(embedder, features, data: RunData, config: TrainConfig, baselines: dict):
    """The run's metrics (embedding and backbone features, both splits) and unseen embeddings."""
    # The embedding and the backbone's features φ from one backbone pass.
    both = embedding_and_features_model(embedder, features)
    embed_both = lambda batch: tuple(  # noqa: E731
        np.asarray(o) for o in both.predict_on_batch(batch))
    seen, seen_features = (embed_all(embed_both, data.seen_x) if len(data.seen_y)
                           else (None, None))
    unseen, unseen_features = embed_all(embed_both, data.unseen_x)
    metrics = {
        "dataset": config.dataset,
        "loss": config.loss,
        "s2sd": config.s2sd,
        "protocol": protocol(data),
        "sizes": {"train": data.train_size, "seen": int(len(data.seen_y)),
                  "unseen": int(len(data.unseen_y))},
        "seen": score(seen, data.seen_y),
        "unseen": score(unseen, data.unseen_y),
        "baselines": baselines,
        # The trained backbone's features φ, before the embedding layer: they
        # can transfer to unseen classes better than the embedding does.
        "features": {
            "seen": score(seen_features, data.seen_y) if len(data.seen_y) else None,
            "unseen": score(unseen_features, data.unseen_y),
        },
        "artefact": "keras",
        "run_id": config.run_id,
    }
    return metrics, unseen


def write_run_files(run: RunDir, config: TrainConfig, data: RunData, model, embedder,
                    history: dict, metrics: dict, unseen) -> None:
    """Writes every file of a run into `run` (models, exports, index, metrics, plots, config)."""
    from keras_dml.export import export_embedding_model, export_retrieval_model, export_tflite
    from keras_dml.index import ScaNNIndex

    run_id = config.run_id
    for path, saved in ((run.model, model), (run.embedding, embedder)):
        saved.save(path)
        rundir.stamp(path, run_id)
    report.write_json(run.metrics, metrics)
    report.write_json(run.history, history)
    export_embedding_model(embedder, run.saved_model)
    rundir.stamp(run.saved_model, run_id)
    export_tflite(embedder, run.tflite)
    rundir.stamp(run.tflite, run_id)
    index = ScaNNIndex()
    index.add(unseen, ids=np.arange(len(unseen)),
              metadata=[{"label": int(label)} for label in data.unseen_y])
    index.save(run.index, info={"run_id": run_id})
    export_retrieval_model(embedder, index, run.retrieval_model, k=min(10, len(index)))
    rundir.stamp(run.retrieval_model, run_id)
    np.save(run.test_labels, data.unseen_y)
    np.save(run.test_thumbnails, data.unseen_thumbnails)
    report.write_plots(run.path, unseen, data.unseen_y, data.unseen_thumbnails, history,
                       config.projection)
    report.write_json(run.config, config.to_dict())


def training_line(config: TrainConfig, data: RunData) -> str:
    """The one progress line `train_run` gives `log` before fitting."""
    variant = ""
    if config.s2sd:
        variant = " + S2SD (MSDF)" if config.s2sd_features else " + S2SD"
    return (f"keras-dml: training {config.loss}{variant} on {config.dataset} "
            f"({data.train_size} images of {data.num_train_classes} classes; "
            f"{config.classes_per_batch} classes x {config.samples_per_class} images per "
            f"batch, {config.steps_per_epoch} steps per epoch)")


def train_run(config: TrainConfig | Mapping[str, Any], out: str | os.PathLike,
              log: Callable[[str], None] | None = None) -> TrainResult:
    """Trains and writes a whole run at `out`: the `keras-dml train` journey, without printing.

    Args:
        config: the run's options, a `TrainConfig` or a dict of its keys
            (`dataset`, `loss`, `epochs`, `seed`, `projection`, ...); `fit`
            verbosity is `config.verbose`. The run resolves what it leaves
            to the run and saves the result as `config.json`.
        out: the run directory: new, empty or a previous run; written whole
            or not at all (`rundir.write_run`); a previous run's files that
            no run writes are kept beside it (`TrainResult.kept`).
        log: optional callable given one progress line before fitting.

    Returns:
        A `TrainResult`: the metrics, the resolved config, the run directory.

    Raises:
        ValueError: a bad option (see `TrainConfig`).
        RunError: Keras not on TensorFlow, a backbone that cannot be built,
            `out` replaced by something else during training.
        keras_dml.data.tfds.DatasetUnavailableError: a TFDS dataset that is
            not prepared.

    Example:

    >>> import tempfile
    >>> from keras_dml.runs import train_run
    >>> result = train_run({"dataset": "digits", "epochs": 1, "steps_per_epoch": 2,
    ...                     "max_images": 120, "verbose": 0},
    ...                    tempfile.mkdtemp() + "/digits")  # doctest: +SKIP
    >>> result.config.backbone, sorted(result.metrics["unseen"])[:2]  # doctest: +SKIP
    ('small_conv', ['map_at_r', 'nmi'])
    >>> result.run.metrics  # doctest: +SKIP
    '/tmp/.../digits/metrics.json'
    """
    config = as_train_config(config).replace(out=os.fspath(out))
    require_tensorflow("keras-dml train")
    start = time.time()
    config, data = prepare_run(config)
    model, embedder, features = build_training_model(config, data.input_shape,
                                                     data.num_train_classes)
    baselines = score_baselines(data, embedder)
    if log is not None:
        log(training_line(config, data))
    history = fit_run(model, embedder, data, config)
    config = config.replace(fit_seconds=round(time.time() - start, 1))
    written = {}

    # Everything is written into a hidden sibling, then swapped in whole (rundir.write_run):
    # an interruption leaves the previous run in `out`, or the new one, never a mix.
    def write(staging):
        metrics, unseen = score_run(embedder, features, data, config, baselines)
        write_run_files(RunDir(staging), config, data, model, embedder, history, metrics, unseen)
        written["metrics"] = metrics

    kept = rundir.write_run(out, write)
    return TrainResult(metrics=written["metrics"], kept=kept, seconds=time.time() - start,
                       config=config, run=RunDir(out))
