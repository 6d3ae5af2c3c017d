"""What `keras-dml train | evaluate | search | export` do; `keras_dml.cli.main` calls these.

A run directory holds everything one `train` wrote; `config.json` records
how to rebuild its data, so `evaluate` and `export` reload the same split.
The file names are `rundir.RunDir`'s. Training is a library journey,
`train_run(config)` (prepare the data, build, fit, score, write the run),
which the `train` command calls and reports on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import keras
import numpy as np

import keras_dml
from keras_dml.cli import registry, rundir
from keras_dml.cli.errors import CommandError
from keras_dml.cli.rundir import RunDir
from keras_dml.data.tfds import DatasetUnavailableError

keras_dml._load_all()  # registers the losses, heads and layers that saved models name

# Errors whose message is enough for the user; main prints them as one line.
ExpectedError = DatasetUnavailableError

K_VALUES = (1, 2, 4, 8)
# Datasets of small images, trained from scratch with the small conv backbone.
SMALL_DATASETS = ("glyphs", "digits", "mnist")
METRIC_ROWS = ("precision_at_1", "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8",
               "r_precision", "map_at_r", "nmi")
# Above this many input values per image, raw pixels are not scored (memory).
RAW_PIXEL_MAX_DIM = 4096
PROJECTOR_MAX_POINTS = 5000


# -- data ---------------------------------------------------------------------------


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


def _bundled_data(config: dict) -> RunData:
    """The bundled offline datasets: scikit-learn's digits, glyphs from matplotlib's fonts."""
    from keras_dml.data.sampler import m_per_class_dataset

    if config["dataset"] == "glyphs":
        from keras_dml.data.glyphs import load_glyphs_zero_shot

        data = load_glyphs_zero_shot(image_size=config.get("image_size") or 32,
                                     validation_fraction=config["holdout"], seed=config["seed"],
                                     num_classes=config.get("max_classes"))
    else:
        from keras_dml.data.digits import load_digits_zero_shot

        data = load_digits_zero_shot(holdout_fraction=config["holdout"], seed=config["seed"])
    x_train, y_train = data.x_train, data.y_train
    if config.get("max_images") and config["max_images"] < len(x_train):
        # A seeded draw, not the first images: those can be a few classes only (glyphs).
        keep = np.sort(np.random.default_rng(config["seed"]).permutation(len(x_train))[
            : config["max_images"]])
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


def _tfds_data(config: dict) -> RunData:
    from keras_dml.data import tfds as dml_tfds

    name = registry.DATASETS[config["dataset"]]
    spec = dml_tfds.zero_shot_spec(name)
    common = {"data_dir": config.get("data_dir"), "download": config.get("download", False),
              "max_examples": config.get("max_images")}
    train_all = dml_tfds.load_zero_shot(name, "train", **common)
    train, seen = dml_tfds.holdout_split(train_all, config["holdout"], config["seed"])
    unseen = dml_tfds.load_zero_shot(name, "test", **common)
    pipeline = {"image_size": config.get("image_size"), "preprocessing": config["preprocessing"]}

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


def load_run_data(config: dict) -> RunData:
    """Rebuilds the data of a run from its config (same split, same preprocessing)."""
    if registry.DATASETS[config["dataset"]] is None:
        return _bundled_data(config)
    return _tfds_data(config)


# -- models -------------------------------------------------------------------------


def _resolve_backbone(config: dict, dataset: str) -> None:
    """Fills `backbone`, `preprocessing`, `image_size`, `embedding_dim` and `learning_rate`."""
    from keras_dml.data.tfds import backbone_preprocessing

    if config["backbone"] == "auto":
        config["backbone"] = "small_conv" if dataset in SMALL_DATASETS else "resnet50"
    mode, size = backbone_preprocessing(config["backbone"])
    config["preprocessing"] = mode
    if config.get("image_size") is None:
        config["image_size"] = size
    small = config["backbone"] == "small_conv"
    if config.get("embedding_dim") is None:
        config["embedding_dim"] = 32 if small else 128
    if config.get("learning_rate") is None:
        config["learning_rate"] = 1e-3 if small else 1e-4


def _small_conv(input_shape) -> keras.Model:
    """The demo's conv net up to its flattened feature map (one more pooling for inputs >= 16 px).

    The features (1024-d for 8x8 digits, 4096-d for 32x32 glyphs) are wider than the embedding and
    S2SD's target heads, as a ResNet's pooled features are: a narrow learnt
    projection here would make S2SD hurt and transfer to unseen classes worse
    (BENCHMARKS.md).
    """
    layers = [keras.Input(input_shape),
              keras.layers.Conv2D(32, 3, padding="same", activation="relu")]
    if input_shape[0] >= 16:
        layers.append(keras.layers.MaxPooling2D())
    layers += [keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
               keras.layers.MaxPooling2D(),
               keras.layers.Flatten()]
    return keras.Sequential(layers, name="small_conv")


def build_features(config: dict, input_shape) -> keras.Model:
    """The backbone φ: inputs -> `(batch, F)` pooled features."""
    name = config["backbone"]
    if name == "small_conv":
        return _small_conv(input_shape)
    weights = None if config.get("weights") == "none" else "imagenet"
    if weights and input_shape[-1] != 3:
        raise CommandError(f"ImageNet weights need RGB inputs; got {input_shape[-1]} channel(s): "
                           "pass --weights none or --backbone small_conv")
    application = getattr(keras.applications, registry.KERAS_APPLICATIONS[name])
    try:
        return application(include_top=False, weights=weights, input_shape=tuple(input_shape),
                           pooling="avg")
    except Exception as error:  # no network, bad cache: the user can pick other weights
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CommandError(f"could not build {name} with {weights} weights ({first}); pass "
                           "--weights none to start from random weights") from error


def build_training_model(config: dict, input_shape, num_classes: int):
    """Returns `(model to fit, its embedding model, the backbone φ)`, compiled as the loss asks."""
    from keras_dml.layers import MetricEmbedding

    spec = registry.LOSSES[config["loss"]]
    try:
        target = spec.resolve()
    except LookupError as error:
        raise CommandError(f"loss {config['loss']!r} is not available: {error}") from None
    features = build_features(config, input_shape)
    dim = config["embedding_dim"]
    optimizer = keras.optimizers.Adam(config["learning_rate"])
    head = target(num_classes, **spec.kwargs) if spec.kind == "head" else None
    loss = target(**spec.kwargs) if spec.kind == "loss" else None
    if config.get("s2sd"):
        from keras_dml.models.s2sd import S2SD

        dims = config.get("s2sd_target_dims")
        if dims is None:
            dims = [min(2048, dim * factor) for factor in (4, 8, 16)]
            config["s2sd_target_dims"] = dims
        feature_distillation = bool(config.get("s2sd_features"))
        delay = 0
        if feature_distillation:
            # The S2SD code's 1000 of ~8000 steps: an eighth of this run's steps.
            delay = config.get("epochs", 1) * config.get("steps_per_epoch", 1) // 8
            config["s2sd_feature_delay"] = delay
        model = S2SD(features, embedding_dim=dim, target_dims=tuple(dims),
                     distillation_weight=config.get("distillation_weight", 50.0), base_head=head,
                     feature_distillation=feature_distillation, feature_distillation_delay=delay)
        model.compile(optimizer=optimizer, loss=loss)
        model.build((None, *input_shape))
        return model, model.embedding_model(), features
    inputs = keras.Input(input_shape)
    embedder = keras.Model(inputs, MetricEmbedding(dim, name="embedding")(features(inputs)),
                           name="embedder")
    if head is None:
        embedder.compile(optimizer=optimizer, loss=loss)
        return embedder, embedder, features
    from keras_dml.models import MarginModel

    model = MarginModel(embedder, head)
    model.compile(optimizer=optimizer,
                  centers_optimizer=config["learning_rate"] * config["centers_lr_multiplier"])
    return model, embedder, features


# -- embedding with any artefact ------------------------------------------------------


def _batches(x, batch_size: int = 256):
    if isinstance(x, np.ndarray):
        for start in range(0, len(x), batch_size):
            yield x[start : start + batch_size]
    else:
        for batch in x:
            yield np.asarray(batch)


def _tflite_embed_fn(path: str):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    source = interpreter.get_input_details()[0]
    target = interpreter.get_output_details()[0]
    shape = [None]

    def embed(batch):
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if shape[0] != batch.shape:
            interpreter.resize_tensor_input(source["index"], list(batch.shape))
            interpreter.allocate_tensors()
            shape[0] = batch.shape
        interpreter.set_tensor(source["index"], batch)
        interpreter.invoke()
        return np.array(interpreter.get_tensor(target["index"]))

    return embed


def embed_fn(run_dir: str, using: str = "keras", config: dict | None = None):
    """A function mapping an input batch to embeddings with one artefact of the run.

    The artefact must carry the run id of `config` (default: the run's
    `config.json`); a missing, foreign or unreadable one raises `CommandError`.
    """
    if config is None:
        config = rundir.read_config(run_dir)
    path = RunDir(run_dir).artefact(using)
    if using.startswith("tflite-") or using == "tflite":
        precision = {"tflite": "float32", "tflite-float16": "float16", "tflite-int8": "int8"}
        fix = f"run: keras-dml export {run_dir} --tflite {precision[using]}"
    elif using == "saved_model":
        fix = f"run: keras-dml export {run_dir}"
    else:
        fix = "run keras-dml train again"
    if not os.path.exists(path):
        raise CommandError(f"{path} does not exist; {fix}")
    rundir.check_stamp(path, config, fix)
    if using == "keras":
        model = rundir.load_artefact(path, _load_keras_model, fix)
        return lambda batch: np.asarray(model.predict_on_batch(batch))
    if using == "saved_model":
        import tensorflow as tf

        def load(path):
            return tf.saved_model.load(path).signatures["serving_default"]

        serve = rundir.load_artefact(path, load, fix)
        return lambda batch: serve(inputs=tf.constant(batch, tf.float32))["embeddings"].numpy()
    return rundir.load_artefact(path, _tflite_embed_fn, fix)


def _load_keras_model(path: str) -> keras.Model:
    import keras_dml.layers  # noqa: F401  (registers the layers the model uses)

    return keras.saving.load_model(path, compile=False)


def embed_all(embed, x):
    """Embeddings of every input of `x` (array or dataset of batches).

    `embed` maps a batch to an array, or to a tuple of arrays (then so is the result).
    """
    chunks = [embed(batch) for batch in _batches(x)]
    if not chunks:
        return np.zeros((0, 0), "float32")
    if isinstance(chunks[0], tuple):
        return tuple(np.concatenate(parts).astype("float32") for parts in zip(*chunks, strict=True))
    return np.concatenate(chunks).astype("float32")


def embedding_and_features_model(embedder: keras.Model, features: keras.Model) -> keras.Model:
    """One model returning `(embedding, φ)` from a single pass through the backbone φ.

    `embedder` is what `build_training_model` returns: a functional model that
    applies `features` to its input, then a chain of one-input layers (the
    embedding layer; S2SD's head and normalisation). Scoring the embedding and
    the features with this model runs the backbone once per batch, not twice.
    """
    layers = [layer for layer in embedder.layers
              if not isinstance(layer, keras.layers.InputLayer)]
    if not layers or layers[0] is not features:
        raise ValueError(f"{embedder.name} does not start with the backbone {features.name}")
    inputs = keras.Input(shape=embedder.input_shape[1:], dtype=embedder.inputs[0].dtype)
    phi = features(inputs)
    embeddings = phi
    for layer in layers[1:]:
        embeddings = layer(embeddings)
    return keras.Model(inputs, [embeddings, phi], name=f"{embedder.name}_and_features")


def _raw_pixels(x) -> np.ndarray | None:
    sample = x[:1] if isinstance(x, np.ndarray) else None
    if sample is not None and int(np.prod(sample.shape[1:])) > RAW_PIXEL_MAX_DIM:
        return None
    chunks = []
    for batch in _batches(x):
        if int(np.prod(batch.shape[1:])) > RAW_PIXEL_MAX_DIM:
            return None
        chunks.append(batch.reshape(len(batch), -1))
    return np.concatenate(chunks).astype("float32") if chunks else None


# -- metrics, reports and plots ------------------------------------------------------------


def _score(embeddings, labels) -> dict[str, float] | None:
    from keras_dml.evaluation import retrieval_metrics

    if embeddings is None or len(labels) < 2:
        return None
    return retrieval_metrics(embeddings, labels, k=K_VALUES, distance="cosine", seed=0)


def _protocol(config: dict, data: RunData) -> str:
    last = data.num_train_classes - 1
    return (f"trained on classes 0-{last}; 'seen' = held-out images of those classes, "
            f"'unseen' = the other classes, never trained on; each split scored on its own, "
            "leave-one-out (queries = references), cosine")


def format_metrics_table(metrics: dict) -> str:
    """The metrics of a run as a text table: seen and unseen classes, baselines beside trained."""
    columns = []
    for split in ("seen", "unseen"):
        for source, label in (("raw_pixels", "raw px"), ("untrained", "untrained"),
                              ("trained", "trained"), ("features", "features")):
            if source == "trained":
                values = metrics.get(split)
            elif source == "features":
                values = (metrics.get("features") or {}).get(split)
            else:
                values = metrics.get("baselines", {}).get(source, {}).get(split)
            if values:
                columns.append((split, label, values))
    if not columns:
        return "(no metrics)"
    header_groups = {"seen": "held-out images, seen classes", "unseen": "unseen classes"}
    widths = 11
    lines = []
    groups = []
    for split in ("seen", "unseen"):
        n = sum(1 for c in columns if c[0] == split)
        if n:
            groups.append(f"{header_groups[split]:^{n * widths}}")
    lines.append(f"{'':<16}" + " | ".join(groups))
    parts = []
    for split in ("seen", "unseen"):
        cells = "".join(f"{c[1]:>{widths}}" for c in columns if c[0] == split)
        if cells:
            parts.append(cells)
    lines.append(f"{'metric':<16}" + " | ".join(parts))
    for row in METRIC_ROWS:
        parts = []
        for split in ("seen", "unseen"):
            cells = "".join(f"{c[2].get(row, float('nan')):>{widths}.3f}" for c in columns
                            if c[0] == split)
            if cells:
                parts.append(cells)
        lines.append(f"{row:<16}" + " | ".join(parts))
    return "\n".join(lines)


def transfer_note(metrics: dict) -> str | None:
    """A note when the trained embedding retrieves unseen classes worse than a baseline.

    If the trained backbone's features (column "features") beat that baseline,
    the note says so: index them rather than the embedding for such classes.
    """
    trained = (metrics.get("unseen") or {}).get("map_at_r")
    if trained is None or not np.isfinite(trained):
        return None
    features = ((metrics.get("features") or {}).get("unseen") or {}).get("map_at_r")
    for name, label in (("raw_pixels", "raw pixels"), ("untrained", "the untrained network")):
        baseline = (metrics.get("baselines", {}).get(name) or {}).get("unseen") or {}
        value = baseline.get("map_at_r")
        if value is not None and np.isfinite(value) and trained < value:
            note = (f"note: on the unseen classes the trained embedding retrieves worse than "
                    f"{label} (MAP@R {trained:.3f} vs {value:.3f}); it is specialised to the "
                    "training classes.")
            if features is not None and np.isfinite(features) and features > value:
                note += (f" The trained backbone's features before the embedding layer do "
                         f"transfer (MAP@R {features:.3f}): index those for classes unlike the "
                         "training ones (README: \"Which layer to index\").")
            else:
                note += " What it learnt from the training classes does not transfer to them."
            return note
    return None


# What `format_artefacts` lists, by role of `rundir.RUN_FILES`.
ARTEFACTS = (
    ("model", "training model (.keras)"),
    ("embedding", "embedding model (.keras)"),
    ("saved_model", "embedding SavedModel (serving_default)"),
    ("retrieval_model", "retrieval SavedModel (embed + top-k)"),
    ("tflite", "TFLite float32"),
    ("tflite_float16", "TFLite float16"),
    ("tflite_int8", "TFLite int8"),
    ("index", "ScaNN index of the unseen classes"),
    ("metrics", "metrics (P@1, R@K, R-Precision, MAP@R, NMI)"),
    ("history", "training history"),
    ("embeddings_2d", "plot: 2-D projection of unseen embeddings"),
    ("retrieval_plot", "plot: retrieval examples"),
    ("distances_plot", "plot: positive vs negative distances"),
    ("training_curves", "plot: training curves"),
    ("projector", "TensorBoard projector (tensorboard --logdir)"),
)


def format_artefacts(run_dir: str) -> str:
    """Where each artefact of the run is, one per line, existing ones only."""
    run = RunDir(run_dir)
    lines = [f"artefacts in {run_dir}:"]
    names = [rundir.RUN_FILES[role] for role, _ in ARTEFACTS]
    extra = sorted(f for f in os.listdir(run_dir)
                   if f.startswith(("search_", "metrics_")) and f not in names)
    listed = [(run.file(role), what) for role, what in ARTEFACTS]
    listed += [(os.path.join(run_dir, f), "search strip" if f.startswith("search_")
                else "metrics of another artefact") for f in extra]
    for path, what in listed:
        if os.path.exists(path):
            lines.append(f"  {what:<46} {path}")
    return "\n".join(lines)


def write_plots(run_dir, embeddings, labels, thumbnails, history, projection) -> None:
    """Writes the run's PNG plots and the TensorBoard projector files."""
    from keras_dml import plots
    from keras_dml.evaluation import nearest_neighbors
    from keras_dml.projector import export_embedding_projector

    run = RunDir(run_dir)
    plots.plot_embeddings_2d(embeddings, labels, method=projection,
                             title="unseen test classes (trained embeddings)",
                             path=run.embeddings_2d)
    plots.plot_distance_histograms(embeddings, labels, title="unseen test classes",
                                   path=run.distances_plot)
    k = min(5, len(labels) - 1)
    if k >= 1:
        queries = np.linspace(0, len(labels) - 1, num=min(4, len(labels)), dtype=int)
        neighbors, distances = nearest_neighbors(embeddings, k=k)
        plots.plot_retrieval(thumbnails[queries], thumbnails[neighbors[queries]],
                             labels[queries], labels[neighbors[queries]],
                             scores=distances[queries], title="unseen classes: query, top-k "
                             "(cosine distance)", path=run.retrieval_plot)
    if history:
        plots.plot_training_curves(
            history, title="training (val_: held-out images of the training classes)",
            path=run.training_curves)
    keep = np.arange(len(labels))
    if len(keep) > PROJECTOR_MAX_POINTS:
        keep = np.sort(np.random.default_rng(0).choice(keep, PROJECTOR_MAX_POINTS, replace=False))
    rundir.replace_file(
        run.projector,
        lambda staging: export_embedding_projector(
            staging, embeddings[keep], labels=labels[keep], images=thumbnails[keep]),
    )


def _write_json(path: str, value) -> None:
    """Writes `value` as JSON; an interruption leaves the old file or the new one, whole."""
    from keras_dml._atomic import write_text

    write_text(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def _require_tensorflow(command: str) -> None:
    if keras.backend.backend() != "tensorflow":
        raise CommandError(f"keras-dml {command} writes SavedModels and TFLite files, which need "
                           f"KERAS_BACKEND=tensorflow (it is {keras.backend.backend()!r})")


# -- the training journey, as library functions ------------------------------------------


@dataclasses.dataclass
class TrainResult:
    """What `train_run` did: the run's metrics, where a previous run was kept, time taken."""

    metrics: dict
    kept: str | None
    seconds: float


def prepare_run(config: dict) -> RunData:
    """Fills `config` (run id, backbone, batch sizes) and loads its data, seeded.

    `config` holds the `train` options (`dataset`, `loss`, `seed`, ...); this
    adds what the run decides: `run_id`, the backbone's defaults, the input
    shape and the P x M batch sizing.
    """
    config["version"] = 1
    config["run_id"] = rundir.new_run_id()
    _resolve_backbone(config, config["dataset"])
    keras.utils.set_random_seed(config["seed"])
    data = load_run_data(config)
    config["input_shape"] = list(data.input_shape)
    config["num_train_classes"] = data.num_train_classes

    small = config["dataset"] in SMALL_DATASETS
    batch_size = config.get("batch_size") or (80 if small else 64)
    # Classes present in the training images (--max-images can leave out some).
    present = data.num_train_classes if data.train_labels is None else len(
        np.unique(data.train_labels))
    classes = config.get("classes_per_batch") or min(present, 16)
    classes = min(classes, present)
    samples = max(2, batch_size // classes)
    steps = config.get("steps_per_epoch") or max(
        1, math.ceil(data.train_size / (classes * samples)))
    config.update(classes_per_batch=classes, samples_per_class=samples, steps_per_epoch=steps)
    return data


def score_baselines(data: RunData, embedder: keras.Model) -> dict:
    """Retrieval of raw pixels and of the untrained embedding, on both splits."""
    embed = lambda batch: np.asarray(embedder.predict_on_batch(batch))  # noqa: E731
    baselines = {
        "raw_pixels": {"seen": _score(_raw_pixels(data.seen_x), data.seen_y),
                       "unseen": _score(_raw_pixels(data.unseen_x), data.unseen_y)},
        "untrained": {"seen": _score(embed_all(embed, data.seen_x), data.seen_y),
                      "unseen": _score(embed_all(embed, data.unseen_x), data.unseen_y)},
    }
    return {name: value for name, value in baselines.items() if value["unseen"]}


def fit_run(model, embedder, data: RunData, config: dict, verbose: int = 0) -> dict:
    """Fits `model` on the run's P x M batches; returns the history as lists of floats."""
    from keras_dml.callbacks import RetrievalMetricsCallback

    callbacks = []
    if len(data.seen_y) > 1:
        callbacks.append(RetrievalMetricsCallback(data.seen_validation_data(), k=K_VALUES,
                                                  embedding_model=embedder))
    history = model.fit(
        data.make_train_batches(config["classes_per_batch"], config["samples_per_class"],
                                config["seed"]),
        epochs=config["epochs"], steps_per_epoch=config["steps_per_epoch"],
        callbacks=callbacks, verbose=verbose, shuffle=False)
    return {k: [float(v) for v in values] for k, values in history.history.items()}


def score_run(embedder, features, data: RunData, config: dict, baselines: dict):
    """The run's metrics (embedding and backbone features, both splits) and unseen embeddings."""
    # The embedding and the backbone's features φ from one backbone pass.
    both = embedding_and_features_model(embedder, features)
    embed_both = lambda batch: tuple(  # noqa: E731
        np.asarray(o) for o in both.predict_on_batch(batch))
    seen, seen_features = (embed_all(embed_both, data.seen_x) if len(data.seen_y)
                           else (None, None))
    unseen, unseen_features = embed_all(embed_both, data.unseen_x)
    metrics = {
        "dataset": config["dataset"],
        "loss": config["loss"],
        "s2sd": bool(config.get("s2sd")),
        "protocol": _protocol(config, data),
        "sizes": {"train": data.train_size, "seen": int(len(data.seen_y)),
                  "unseen": int(len(data.unseen_y))},
        "seen": _score(seen, data.seen_y),
        "unseen": _score(unseen, data.unseen_y),
        "baselines": baselines,
        # The trained backbone's features φ, before the embedding layer: they
        # can transfer to unseen classes better than the embedding does.
        "features": {
            "seen": _score(seen_features, data.seen_y) if len(data.seen_y) else None,
            "unseen": _score(unseen_features, data.unseen_y),
        },
        "artefact": "keras",
        "run_id": config["run_id"],
    }
    return metrics, unseen


def write_run_files(run: RunDir, config: dict, data: RunData, model, embedder,
                    history: dict, metrics: dict, unseen) -> None:
    """Writes every file of a run into `run` (models, exports, index, metrics, plots, config)."""
    from keras_dml.export import export_embedding_model, export_retrieval_model, export_tflite
    from keras_dml.index import ScaNNIndex

    run_id = config["run_id"]
    for path, saved in ((run.model, model), (run.embedding, embedder)):
        saved.save(path)
        rundir.stamp(path, run_id)
    _write_json(run.metrics, metrics)
    _write_json(run.history, history)
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
    write_plots(run.path, unseen, data.unseen_y, data.unseen_thumbnails, history,
                config["projection"])
    _write_json(run.config, config)


def train_run(config: dict, out: str, verbose: int = 0, log=None) -> TrainResult:
    """Trains and writes a whole run at `out`: the `keras-dml train` journey, without printing.

    Args:
        config: the `train` options (`dataset`, `loss`, `epochs`, `seed`,
            `projection`, ...; see `keras-dml train --help`), completed in
            place with what the run decides and saved as `config.json`.
        out: the run directory; written whole or not at all
            (`rundir.write_run`).
        verbose: Keras `fit` verbosity.
        log: optional callable given one progress line before fitting.
    """
    start = time.time()
    data = prepare_run(config)
    model, embedder, features = build_training_model(config, data.input_shape,
                                                     data.num_train_classes)
    baselines = score_baselines(data, embedder)
    if log is not None:
        s2sd = config.get("s2sd")
        variant = (" + S2SD (MSDF)" if config.get("s2sd_features") else " + S2SD") if s2sd else ""
        log(f"keras-dml: training {config['loss']}{variant} on {config['dataset']} "
            f"({data.train_size} images of {data.num_train_classes} classes; "
            f"{config['classes_per_batch']} classes x {config['samples_per_class']} images per "
            f"batch, {config['steps_per_epoch']} steps per epoch)")
    history = fit_run(model, embedder, data, config, verbose)
    config["fit_seconds"] = round(time.time() - start, 1)
    written = {}

    # Everything is written into a hidden sibling, then swapped in whole (rundir.write_run):
    # an interruption leaves the previous run in `out`, or the new one, never a mix.
    def write(staging):
        metrics, unseen = score_run(embedder, features, data, config, baselines)
        write_run_files(RunDir(staging), config, data, model, embedder, history, metrics, unseen)
        written["metrics"] = metrics

    kept = rundir.write_run(out, write)
    return TrainResult(metrics=written["metrics"], kept=kept, seconds=time.time() - start)


# -- commands --------------------------------------------------------------------------


def train(args) -> int:
    """`keras-dml train`: fit, then write model, exports, index, metrics and plots."""
    _require_tensorflow("train")
    config = {key: value for key, value in vars(args).items() if key not in ("handler",)}
    result = train_run(config, args.out, verbose=args.verbose,
                       log=lambda line: print(line, flush=True))
    metrics = result.metrics
    print()
    print(format_metrics_table(metrics))
    print(f"({metrics['protocol']})")
    note = transfer_note(metrics)
    if note:
        print(note)
    print()
    print(format_artefacts(args.out))
    if result.kept:
        print(f"\nthe previous run in {args.out} held files no run writes; it is kept, whole, in "
              f"{result.kept}")
    print(f"\ndone in {result.seconds:.0f} s")
    return 0


def evaluate(args) -> int:
    """`keras-dml evaluate DIR`: re-embed the run's test data with one artefact and report."""
    run_dir = args.run_dir
    run = RunDir(run_dir)
    config = run.read_config()
    embed = embed_fn(run_dir, args.using, config)
    data = load_run_data(config)
    seen = embed_all(embed, data.seen_x) if len(data.seen_y) else None
    unseen = embed_all(embed, data.unseen_x)
    previous = rundir.read_metrics(run.metrics, config)  # {} if absent or from another run
    metrics = {
        **{k: previous[k] for k in ("dataset", "loss", "s2sd") if k in previous},
        "protocol": _protocol(config, data),
        "sizes": {"seen": int(len(data.seen_y)), "unseen": int(len(data.unseen_y))},
        "seen": _score(seen, data.seen_y),
        "unseen": _score(unseen, data.unseen_y),
        "baselines": previous.get("baselines", {}),
        **({"features": previous["features"]} if "features" in previous else {}),
        "artefact": args.using,
        **({"run_id": config["run_id"]} if "run_id" in config else {}),
    }
    _write_json(run.metrics_for(args.using), metrics)
    history = rundir.read_metrics(run.history, {}) or None
    write_plots(run_dir, unseen, data.unseen_y, data.unseen_thumbnails, history, args.projection)
    print(format_artefacts(run_dir))
    print(f"\nretrieval metrics of {config['dataset']} with the {args.using} artefact "
          f"({rundir.MODEL_FILES[args.using]}):")
    print(format_metrics_table(metrics))
    print(f"({metrics['protocol']})")
    note = transfer_note(metrics)
    if note:
        print(note)
    return 0


def search(args) -> int:
    """`keras-dml search DIR --query-index N`: neighbours of test image N, printed and drawn."""
    from keras_dml import plots
    from keras_dml.index import Index

    run_dir = args.run_dir
    run = RunDir(run_dir)
    config = run.read_config()
    index_dir = run.index
    index = rundir.load_artefact(index_dir, Index.load)
    rundir.check_index_stamp(index_dir, config)

    def load_npy(path):
        return np.load(path, allow_pickle=False)

    labels = rundir.load_artefact(run.test_labels, load_npy)
    thumbnails = rundir.load_artefact(run.test_thumbnails, load_npy)
    indexed = np.array([(item or {}).get("label", -1) for item in index.metadata or []])
    ids = index.ids
    if (len(labels) != len(index) or len(thumbnails) != len(index)
            or ids.dtype.kind != "i" or (len(ids) and (ids.min() < 0 or ids.max() >= len(labels)))
            or (len(indexed) and not np.array_equal(indexed, labels[ids]))):
        raise CommandError(f"{run.test_labels} and {rundir.RUN_FILES['test_thumbnails']} "
                           f"({len(labels)} and {len(thumbnails)} rows) do not match the index "
                           f"{index_dir} ({len(index)} items): they come from different runs; "
                           "run keras-dml train again")
    n = args.query_index
    if n >= len(index):
        raise CommandError(f"--query-index {n} is out of range: the test set has {len(index)} "
                           f"images (0-{len(index) - 1})")
    k = min(args.k, len(index) - 1)
    query_row = int(np.flatnonzero(index.ids == n)[0])
    ids, scores = index.search(index.embeddings[query_row], k=k + 1)
    keep = ids != n  # the query is in the index: drop it from its own results
    ids, scores = ids[keep][:k], scores[keep][:k]
    query_label = labels[n]
    print(f"query: test image {n}, label {query_label}; {k} nearest of {len(index)} "
          "(ScaNN index of the unseen classes, cosine similarity):")
    print(f"{'rank':>4}  {'id':>6}  {'label':>6}  {'similarity':>10}  match")
    for rank, (item, score) in enumerate(zip(ids, scores, strict=True), start=1):
        match = "yes" if labels[item] == query_label else "no"
        print(f"{rank:>4}  {item:>6}  {labels[item]:>6}  {score:>10.4f}  {match}")
    correct = int(np.sum(labels[ids] == query_label))
    print(f"precision@{k}: {correct / k:.2f}")
    png = args.png or run.search_png(n)
    plots.plot_retrieval(thumbnails[n][None], thumbnails[ids][None], [query_label],
                         labels[ids][None], scores[None],
                         title=f"test image {n}: {correct}/{k} neighbours of its class",
                         path=png)
    print(f"saved {png}")
    return 0


def export(args) -> int:
    """`keras-dml export DIR --tflite int8`: TFLite (+ SavedModel) and agreement with Keras."""
    from keras_dml.export import export_embedding_model, export_tflite

    _require_tensorflow("export")
    run_dir = args.run_dir
    run = RunDir(run_dir)
    config = run.read_config()
    run_id = config.get("run_id")
    model_path = run.artefact("keras")
    if not os.path.exists(model_path):
        raise CommandError(f"{model_path} does not exist; run keras-dml train again")
    rundir.check_stamp(model_path, config, "run keras-dml train again")
    embedder = rundir.load_artefact(model_path, _load_keras_model)
    data = load_run_data(config)
    name = {"float32": "tflite", "float16": "tflite-float16", "int8": "tflite-int8"}[args.tflite]
    path = run.artefact(name)
    quantization = None if args.tflite == "float32" else args.tflite

    # Each file is written beside its final path and swapped in, then stamped with the run id.
    def write_saved_model(target):
        export_embedding_model(embedder, target)
        if run_id:
            rundir.stamp(target, run_id)

    def write_tflite(target):
        export_tflite(embedder, target, quantization=quantization,
                      representative_data=data.representative if args.tflite == "int8" else None)

    rundir.replace_file(run.saved_model, write_saved_model)
    rundir.replace_file(path, write_tflite)
    if run_id:
        rundir.stamp(path, run_id)
    sample = next(iter(_batches(data.unseen_x)))
    reference = np.asarray(embedder.predict_on_batch(sample))
    exported = _tflite_embed_fn(path)(sample)
    cosine = np.sum(reference * exported, axis=1) / np.maximum(
        np.linalg.norm(reference, axis=1) * np.linalg.norm(exported, axis=1), 1e-12)
    size = os.path.getsize(path) / 1024
    saved_model = run.saved_model
    print(f"wrote {path} ({args.tflite}, {size:.0f} KiB) and {saved_model}")
    print(f"TFLite vs Keras embeddings on {len(sample)} test images: cosine similarity "
          f"mean {cosine.mean():.4f}, min {cosine.min():.4f}")
    print(f"full metrics with this file: keras-dml evaluate {run_dir} --using {name}")
    return 0


def index(args) -> int:
    """`keras-dml index`: embeds and indexes a gallery on Apache Beam (`keras_dml.beam`)."""
    from keras_dml.beam.index_pipeline import build_index

    pipeline_args = list(args.pipeline_args or [])
    if args.workers is not None:
        pipeline_args.append(f"--direct_num_workers={args.workers}")
        if not any(arg.startswith("--direct_running_mode") for arg in pipeline_args):
            # Not multi_threading: Beam 2.77 dropped items in that mode (BENCHMARKS.md).
            pipeline_args.append("--direct_running_mode=multi_processing")
    try:
        summary = build_index(
            args.source, args.model, args.out, num_shards=args.num_shards, index=args.index,
            shard_by=args.shard_by, distance=args.distance, batch_size=args.batch_size,
            image_feature=args.image_feature, id_feature=args.id_feature,
            data_dir=args.data_dir, overwrite=args.overwrite, pipeline_args=pipeline_args,
        )
    except (ValueError, FileExistsError) as error:
        raise CommandError(str(error)) from None
    dead = sum(summary[f"dead_letter_{stage}"] for stage in ("decode", "embed", "index"))
    print(f"indexed {summary['indexed']} of {summary['read']} items into "
          f"{args.num_shards} {args.index} shards in {summary['seconds']:.1f} s: "
          f"{os.path.join(args.out, 'index')}")
    if dead:
        print(f"{dead} items failed (decode {summary['dead_letter_decode']}, embed "
              f"{summary['dead_letter_embed']}, index {summary['dead_letter_index']}): "
              f"{os.path.join(args.out, 'dead_letter')}")
    return 0

