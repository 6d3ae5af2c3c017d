"""Does S2SD help? Baseline vs DSD vs MSD vs MSDF, zero-shot to unseen classes.

Two datasets, no download, both scored leave-one-out (each test sample a
query among all the others) with `keras_dml.evaluation.retrieval_metrics`:
P@1, R-Precision and MAP@R.

- `--dataset digits`: scikit-learn's bundled handwritten digits (8x8). Every
  image of digits 0-4 trains; every image of 5-9 is scored. Backbone: the
  conv layers of the digits example up to their flattened 1024-d feature map
  (`--backbone trunk`, wide φ) or the same plus a `Dense(128, relu)`
  (`--backbone dense128`, narrow φ).
- `--dataset signals`: 1-D signals made here with NumPy (`make_signals`,
  deterministic): 10 classes, 40 samples long, each class a fixed mixture of
  two sinusoids and a Gaussian bump, each sample with a random amplitude,
  phase jitter, circular shift and Gaussian noise. Classes 0-4 train, 5-9 are
  scored. Backbone (`conv1d`, the one of issue 14): Conv1D(32, 5) ->
  Conv1D(64, 3, stride 2) -> Conv1D(64, 3) -> global average pooling, a 64-d
  φ trained from scratch.
- `--dataset glyphs`: the bundled many-class glyphs (`keras_dml.data.glyphs`,
  32x32, 589 characters drawn in matplotlib's 16 fonts): the training
  characters' training images train; the 236 unseen characters are scored.
  Backbones: `glyphconv`, the demo's small conv net (conv 32, pool, conv 64,
  pool, flatten: a wide 4096-d φ), or `glyphgap`, the same with global
  average pooling instead of flatten (a narrow 64-d φ, below the target
  widths).

With `--paired` (the default) every variant of a seed starts from the
baseline's backbone and f weights for that seed and sees the same batches in
the same order, so a per-seed difference is the method's and not the draw's.

All variants share the backbone, the base embedding f (`Dense(embedding_dim)`
+ L2 normalisation on φ, used at test time), the loss (multi-similarity, the
default of the S2SD code), optimiser, epochs, batch size and seeds:

- baseline: backbone + f trained with the loss alone (a plain `Sequential`);
- DSD: S2SD with one target head (the largest target width);
- MSD: S2SD with all target heads;
- MSDF: MSD plus distillation from φ (delay: an eighth of the steps, as the
  code's 1000 of ~8000 steps on CUB200);
- MSD paper: MSD with `distillation_into_backbone=True`, the paper's and
  the authors' code's gradient routing (keras-dml's default before issue 14);
- MSD targets into backbone (not run by default): MSD with
  `targets_into_backbone=True`, the paper's routing of the target heads
  (S2SD's default before "auto");
- MSD detached targets (not run by default): MSD with
  `targets_into_backbone=False`, the target heads trained on φ held constant,
  so only f's metric loss trains the backbone;
- FD (not run by default; `--variants baseline FD`): distillation from φ
  alone, no target heads, at weight `--gamma`: a control for MSDF.

DSD/MSD/MSDF use S2SD's default routing (`distillation_into_backbone=False`:
the distillation trains f's weights only) unless `--distillation-into-backbone`.
Then a sweep of γ (`distillation_weight`) for MSD under both routings, where
γ=0 is the control "target heads trained, nothing distilled", and the
investigation when S2SD does not help: MSD at several temperatures T,
baseline and MSD at several learning rates, and two head designs. Also
reported: the untrained network and the raw inputs (the zero-shot reference
points), MAP@R on the unseen classes during training, training step time
relative to the baseline, and the parameter count at inference.

Target widths default to 128-512 for a 32-d base embedding: the paper's ratio
(512-2048 for 128-d, i.e. 4-16x) scaled to f; `--target-dims 512 1024 1536
2048` runs the paper's widths.

    python benchmarks/bench_s2sd.py                          # digits, full run
    python benchmarks/bench_s2sd.py --dataset signals --epochs 15 --seeds 5 \
        --gammas --temperatures --learning-rates --no-head-designs
    python benchmarks/bench_s2sd.py --epochs 3 --seeds 1 --gammas 0 50   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keras_dml  # noqa: E402
from keras_dml.evaluation import retrieval_metrics  # noqa: E402
from keras_dml.models.s2sd import S2SD  # noqa: E402

METRICS = ("precision_at_1", "r_precision", "map_at_r")
SHORT = {"precision_at_1": "P@1", "r_precision": "RP", "map_at_r": "MAP@R"}


def load_digits_zero_shot():
    """`(x_train, y_train), (x_test, y_test)`: all of digits 0-4, all of digits 5-9."""
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    seen = y < 5
    return (x[seen], y[seen]), (x[~seen], y[~seen])


def make_signals(n_per_class: int, classes: int = 10, length: int = 40, seed: int = 0,
                 noise: float = 0.5, max_shift: int = 20):
    """`(x, y)`: `classes * n_per_class` 1-D signals of shape `(length, 1)`, shuffled.

    Each class is a fixed mixture of two sinusoids (frequency, phase, weight)
    and a Gaussian bump (centre, width, signed height), drawn once from a
    fixed generator, so the classes do not depend on `seed`. Each sample
    scales its class's signal by a random amplitude in [0.7, 1.3], jitters
    the sinusoids' phases (σ 0.4 rad), shifts it circularly by up to
    `max_shift` steps and adds Gaussian noise of standard deviation `noise`.
    The shift makes raw signals poor neighbours (MAP@R 0.15 on classes 5-9)
    while a convolutional network with global pooling can learn to ignore it.
    """
    proto = np.random.default_rng(1234)
    t = np.arange(length, dtype="float64")
    freqs = proto.uniform(0.5, 4.0, size=(classes, 2))
    phases = proto.uniform(0, 2 * np.pi, size=(classes, 2))
    weights = proto.uniform(0.3, 1.0, size=(classes, 2))
    centres = proto.uniform(5, length - 5, size=classes)
    widths = proto.uniform(1.5, 5.0, size=classes)
    heights = proto.choice([-1.5, 1.5], size=classes) * proto.uniform(0.6, 1.2, size=classes)
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    amplitude = rng.uniform(0.7, 1.3, size=(len(y), 1))
    jitter = rng.normal(0, 0.4, size=(len(y), 2))
    x = np.zeros((len(y), length))
    for k in range(2):
        x += weights[y, k:k + 1] * np.sin(
            2 * np.pi * freqs[y, k:k + 1] * t / length + phases[y, k:k + 1] + jitter[:, k:k + 1]
        )
    x += heights[y, None] * np.exp(-0.5 * ((t - centres[y, None]) / widths[y, None]) ** 2)
    x *= amplitude
    shifts = rng.integers(-max_shift, max_shift + 1, size=len(y))
    x = np.stack([np.roll(row, shift) for row, shift in zip(x, shifts, strict=True)])
    x += rng.normal(0, noise, size=x.shape)
    order = rng.permutation(len(y))
    return x[order, :, None].astype("float32"), y[order].astype("int32")


def load_signals_zero_shot(n_per_class: int):
    """`(x_train, y_train), (x_test, y_test)`: classes 0-4 and classes 5-9 of `make_signals`."""
    x, y = make_signals(n_per_class)
    seen = y < 5
    return (x[seen], y[seen]), (x[~seen], y[~seen])


def load_glyphs(num_classes: int | None = None):
    """`(x_train, y_train), (x_test, y_test)`: training characters, unseen characters."""
    from keras_dml.data.glyphs import load_glyphs_zero_shot

    data = load_glyphs_zero_shot(num_classes=num_classes)
    return (data.x_train, data.y_train), (data.x_unseen, data.y_unseen)


def build_backbone(kind: str = "trunk") -> keras.Model:
    """The digits conv net up to its features φ.

    `trunk` (default): conv 32 -> conv 64 -> max-pool -> flatten, φ = 1024-d,
    as in the paper, where f and every g_i sit on the pooled features of the
    backbone (2048-d for ResNet-50) and φ is wider than every head.
    `dense128`: the same plus a `Dense(128, relu)`, the demo network's
    penultimate layer: a φ that is already a learnt 128-d projection,
    narrower than the target heads (an earlier design of this benchmark,
    kept as a head-design control).
    """
    if kind in ("glyphconv", "glyphgap"):
        return keras.Sequential(
            [
                keras.Input((32, 32, 1)),
                keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
                keras.layers.MaxPooling2D(),
                keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
                keras.layers.MaxPooling2D(),
                keras.layers.Flatten() if kind == "glyphconv"
                else keras.layers.GlobalAveragePooling2D(),
            ],
            name="backbone",
        )
    if kind == "conv1d":
        return keras.Sequential(
            [
                keras.Input((40, 1)),
                keras.layers.Conv1D(32, 5, activation="relu"),
                keras.layers.Conv1D(64, 3, strides=2, activation="relu"),
                keras.layers.Conv1D(64, 3, activation="relu"),
                keras.layers.GlobalAveragePooling1D(),
            ],
            name="backbone",
        )
    layers = [
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
    ]
    if kind == "dense128":
        layers.append(keras.layers.Dense(128, activation="relu"))
    elif kind != "trunk":
        raise ValueError(f"unknown backbone {kind!r}")
    return keras.Sequential(layers, name="backbone")


def build_model(variant: str, args, gamma: float, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    backbone = build_backbone(args.backbone)
    if variant == "baseline":
        return keras.Sequential(
            [
                backbone,
                keras.layers.Dense(args.embedding_dim),
                keras.layers.UnitNormalization(),
            ],
            name="baseline",
        )
    model = _build_s2sd(variant, args, gamma, backbone)
    if getattr(args, "paired", False):
        # Common random numbers: the backbone and f start from the baseline's weights for
        # this seed, so a difference to the baseline is the method's, not the draw's.
        baseline = build_model("baseline", args, 0.0, seed)
        model.build((None, *backbone.input_shape[1:]))
        backbone.set_weights(baseline.layers[0].get_weights())
        model.embedding_head.set_weights(baseline.layers[1].get_weights())
        keras.utils.set_random_seed(seed)
    return model


def _build_s2sd(variant: str, args, gamma: float, backbone) -> keras.Model:
    target_dims = {"DSD": (max(args.target_dims),), "FD": ()}.get(
        variant, tuple(args.target_dims)
    )
    into_backbone = variant == "MSD paper" or args.distillation_into_backbone
    targets_into = targets_into_backbone(variant, args)
    return S2SD(
        backbone,
        embedding_dim=args.embedding_dim,
        target_dims=target_dims,
        temperature=args.temperature,
        distillation_weight=gamma,
        feature_distillation=variant in ("MSDF", "FD"),
        feature_distillation_delay=args.feature_delay,
        distillation_into_backbone=into_backbone,
        targets_into_backbone=targets_into,
        distillation_warmup=getattr(args, "distillation_warmup", 0),
    )


def targets_into_backbone(variant: str, args) -> bool | str:
    """Whether the target heads' metric losses train the backbone in this run ("auto": S2SD's)."""
    if variant == "MSD detached targets":
        return False
    if variant in ("MSD paper", "MSD targets into backbone"):
        return True
    value = getattr(args, "targets_into_backbone", "auto")
    return {"true": True, "false": False}.get(value, value)


def make_loss(name: str):
    if name == "multi_similarity":
        return keras_dml.MultiSimilarityLoss()
    if name == "triplet":
        return keras_dml.TripletLoss(margin=0.2, negative_mining="semi-hard")
    raise ValueError(name)


class Recorder(keras.callbacks.Callback):
    """Times training epochs and scores the unseen classes every `every` epochs."""

    def __init__(self, embed, x_test, y_test, every):
        super().__init__()
        self.embed, self.x_test, self.y_test, self.every = embed, x_test, y_test, every
        self.epoch_seconds, self.curve = [], {}

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_seconds.append(time.perf_counter() - self._start)
        if self.every and (epoch + 1) % self.every == 0:
            self.curve[epoch + 1] = score(self.embed(), self.x_test, self.y_test)["map_at_r"]


class EpochBatches(keras.utils.PyDataset):
    """Batches drawn from NumPy with `seed`, anew each epoch.

    `samples_per_class=0`: a fresh permutation each epoch. Otherwise each batch
    holds `batch_size // samples_per_class` random classes with
    `samples_per_class` random samples each (with many classes, random batches
    hold almost no positive pair). The order depends on the seed only, not on
    how many random ops a model created, so the baseline and S2SD of one seed
    see the same batches.
    """

    def __init__(self, x, y, batch_size: int, seed: int, samples_per_class: int = 0):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size
        self.samples_per_class = samples_per_class
        self.members = [np.flatnonzero(y == c) for c in np.unique(y)]
        self.rng = np.random.default_rng(seed)
        self.on_epoch_end()

    def __len__(self) -> int:
        return int(np.ceil(len(self.x) / self.batch_size))

    def __getitem__(self, index):
        rows = self.batches[index]
        return self.x[rows], self.y[rows]

    def on_epoch_end(self):
        if not self.samples_per_class:
            order = self.rng.permutation(len(self.x))
            self.batches = [order[i:i + self.batch_size]
                            for i in range(0, len(order), self.batch_size)]
            return
        per_batch = max(2, self.batch_size // self.samples_per_class)
        self.batches = []
        for _ in range(len(self)):
            classes = self.rng.choice(len(self.members), size=per_batch, replace=False)
            self.batches.append(np.concatenate([
                self.rng.choice(self.members[c], size=self.samples_per_class,
                                replace=len(self.members[c]) < self.samples_per_class)
                for c in classes
            ]))


def score(model_or_array, x, y) -> dict:
    embeddings = model_or_array
    if isinstance(model_or_array, keras.Model):
        embeddings = model_or_array.predict(x, batch_size=512, verbose=0)
    metrics = retrieval_metrics(embeddings, y, nmi=False)
    return {name: metrics[name] for name in METRICS}


def run(variant: str, gamma: float, seed: int, args, data) -> dict:
    (x_train, y_train), (x_test, y_test) = data
    model = build_model(variant, args, gamma, seed)
    embedding_model = model if variant == "baseline" else model.embedding_model()
    model.compile(optimizer=keras.optimizers.Adam(args.learning_rate), loss=make_loss(args.loss))
    recorder = Recorder(lambda: embedding_model, x_test, y_test, args.eval_every)
    if getattr(args, "paired", False):
        batches = EpochBatches(x_train, y_train, args.batch_size, seed,
                               getattr(args, "samples_per_class", 0))
        history = model.fit(batches, epochs=args.epochs, shuffle=False, verbose=0,
                            callbacks=[recorder])
    else:
        history = model.fit(
            x_train, y_train, batch_size=args.batch_size, epochs=args.epochs, shuffle=True,
            verbose=0, callbacks=[recorder],
        )
    steps = int(np.ceil(len(x_train) / args.batch_size))
    # The first epoch includes tracing; the step time is taken from the others.
    timed = recorder.epoch_seconds[1:] or recorder.epoch_seconds
    result = score(embedding_model, x_test, y_test)
    result.update(
        variant=variant,
        gamma=gamma,
        seed=seed,
        step_seconds=statistics.median(timed) / steps,
        curve=recorder.curve,
        inference_params=embedding_model.count_params(),
        training_params=model.count_params(),
        final_loss=history.history["loss"][-1],
        history={k: [float(v) for v in values] for k, values in history.history.items()},
    )
    return result


def mean_std(values):
    values = np.asarray(values, dtype="float64")
    return values.mean(), (values.std(ddof=1) if len(values) > 1 else 0.0)


def print_table(title, groups, baseline_step):
    print(f"\n{title}")
    header = f"{'variant':<34}" + "".join(f"{SHORT[m]:>16}" for m in METRICS)
    print(header + f"{'base loss':>11}{'step time':>12}{'train params':>14}{'test params':>13}")
    for name, runs in groups.items():
        cells = "".join(
            "{:>16}".format("{:.3f} ± {:.3f}".format(*mean_std([r[m] for r in runs])))
            for m in METRICS
        )
        step = statistics.mean(r["step_seconds"] for r in runs) / baseline_step
        # The last epoch's metric loss of f (the baseline's only loss).
        base = statistics.mean(
            r["history"].get("base_loss", r["history"]["loss"])[-1] for r in runs
        )
        print(
            f"{name:<34}{cells}{base:>11.3f}{step:>11.2f}x{runs[0]['training_params']:>14,}"
            f"{runs[0]['inference_params']:>13,}"
        )


def with_overrides(args, **changes) -> argparse.Namespace:
    """A copy of `args` with some settings changed (one configuration of a sweep)."""
    return argparse.Namespace(**{**vars(args), **changes})


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--embedding-dim", type=int, default=32)
    parser.add_argument("--dataset", choices=["digits", "signals", "glyphs"], default="digits")
    parser.add_argument("--glyph-classes", type=int, default=None,
                        help="glyphs: use only this many characters (default: all 589)")
    parser.add_argument("--n-per-class", type=int, default=400,
                        help="signals: samples per class (half the classes train)")
    parser.add_argument("--backbone", choices=["trunk", "dense128", "conv1d", "glyphconv",
                                               "glyphgap"], default=None,
                        help="features φ: digits' conv trunk (1024-d, the default there) or a "
                             "Dense(128, relu) on it; conv1d for signals (64-d)")
    parser.add_argument("--distillation-warmup", type=int, default=0,
                        help="S2SD's `distillation_warmup` (steps) for every S2SD variant")
    parser.add_argument("--distillation-into-backbone", action="store_true",
                        help="DSD/MSD/MSDF distil into the backbone too (the paper's routing)")
    parser.add_argument("--targets-into-backbone", choices=["auto", "true", "false"],
                        default="auto", help="DSD/MSD/MSDF: whether the target heads' metric "
                        "losses train the backbone (false: heads on φ held constant; auto, "
                        "S2SD's default: true when φ is at least as wide as every target head)")
    parser.add_argument("--no-targets-into-backbone", dest="targets_into_backbone",
                        action="store_const", const="false", help="same as "
                        "--targets-into-backbone false")
    parser.add_argument("--target-dims", type=int, nargs="+", default=[128, 256, 384, 512])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--gamma", type=float, default=50.0, help="γ of DSD/MSD/MSDF")
    parser.add_argument("--gammas", type=float, nargs="*", default=[0.0, 5.0, 20.0, 50.0, 200.0],
                        help="γ values of the MSD sweep, run under both routings (none: no sweep)")
    parser.add_argument("--warmups", type=float, nargs="*", default=[],
                        help="MSD at --gamma with `distillation_warmup` set to these fractions "
                             "of all training steps (γ ramps in linearly); none by default")
    parser.add_argument("--sweep-seeds", type=int, default=None,
                        help="seeds of the γ sweep (default: --seeds)")
    parser.add_argument("--sweep-paper-routing", action=argparse.BooleanOptionalAction,
                        default=True, help="also sweep γ with distillation into the backbone")
    parser.add_argument("--temperatures", type=float, nargs="*", default=[0.25, 1.0, 4.0],
                        help="T values of the MSD temperature sweep at --gamma (none: no sweep)")
    parser.add_argument("--learning-rates", type=float, nargs="*", default=[3e-4, 1e-3, 3e-3],
                        help="learning rates for baseline and MSD (none: no sweep)")
    parser.add_argument("--head-designs", action=argparse.BooleanOptionalAction, default=True,
                        help="also run MSD with the paper's target widths (512-2048) and "
                             "baseline/MSD/MSDF with the other backbone's φ")
    parser.add_argument("--feature-delay", type=int, default=None,
                        help="MSDF delay in steps (default: an eighth of all steps)")
    parser.add_argument("--loss", choices=["multi_similarity", "triplet"],
                        default="multi_similarity")
    parser.add_argument("--variants", nargs="+", default=["baseline", "DSD", "MSD", "MSDF"],
                        choices=["baseline", "DSD", "MSD", "MSDF", "MSD paper",
                                 "MSD detached targets", "MSD targets into backbone", "FD"])
    parser.add_argument("--eval-every", type=int, default=5,
                        help="score 5-9 every N epochs (0: only at the end)")
    parser.add_argument("--paired", action=argparse.BooleanOptionalAction, default=True,
                        help="common random numbers: every variant of a seed starts from the "
                             "baseline's backbone and f weights and sees the same batches "
                             "(--no-paired: the draws of the first tables of issue 14)")
    parser.add_argument("--samples-per-class", type=int, default=None,
                        help="with --paired: batches of classes x this many samples "
                             "(default: 4 for glyphs, 0 = random batches otherwise)")
    parser.add_argument("--output", help="write all runs as JSON here")
    args = parser.parse_args(argv)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # Each run builds new models, so Keras's predict functions are traced
        # again on purpose; TensorFlow's retracing warnings are noise here.
        tf.get_logger().setLevel("ERROR")
    if "baseline" not in args.variants:
        args.variants.insert(0, "baseline")

    start = time.time()
    if args.backbone is None:
        args.backbone = {"signals": "conv1d", "glyphs": "glyphconv"}.get(args.dataset, "trunk")
    if args.samples_per_class is None:
        args.samples_per_class = 4 if args.dataset == "glyphs" else 0
    if args.dataset == "signals":
        data = load_signals_zero_shot(args.n_per_class)
    elif args.dataset == "glyphs":
        data = load_glyphs(args.glyph_classes)
    else:
        data = load_digits_zero_shot()
    (x_train, _), (x_test, y_test) = data
    steps = int(np.ceil(len(x_train) / args.batch_size))
    if args.feature_delay is None:
        args.feature_delay = (args.epochs * steps) // 8
    print(
        f"{args.dataset}: train {len(x_train)} samples of the training classes, test "
        f"{len(x_test)} of the unseen classes "
        f"(leave-one-out); {args.epochs} epochs x {steps} steps, batch {args.batch_size}, "
        f"Adam {args.learning_rate}, loss {args.loss}, φ {args.backbone}, "
        f"f {args.embedding_dim}-d, targets {args.target_dims}, T={args.temperature}, "
        f"MSDF delay {args.feature_delay} steps, distillation into backbone "
        f"{args.distillation_into_backbone}, targets into backbone "
        f"{args.targets_into_backbone}; keras {keras.__version__} "
        f"({keras.backend.backend()}), {platform.processor() or ''} {os.cpu_count()} CPUs"
    )

    seeds = list(range(args.seeds))
    reference = {
        "raw inputs": [score(x_test.reshape(len(x_test), -1), x_test, y_test)],
        "untrained": [],
    }
    for seed in seeds:
        untrained = build_model("baseline", args, 0.0, seed)
        reference["untrained"].append(score(untrained, x_test, y_test))

    runs = []
    done: dict[tuple, list] = {}

    def configuration(name, variant, gamma, run_seeds=None, **changes) -> list:
        """Runs (or reuses) one configuration over all seeds; returns its results."""
        config = with_overrides(args, **changes)
        run_seeds = seeds if run_seeds is None else run_seeds
        into = variant == "MSD paper" or config.distillation_into_backbone
        key = (variant.split()[0], gamma, config.temperature, config.learning_rate,
               config.backbone, tuple(config.target_dims), into,
               targets_into_backbone(variant, config), len(run_seeds),
               getattr(config, "distillation_warmup", 0))
        if key not in done:
            done[key] = []
            for seed in run_seeds:
                result = run(variant, gamma, seed, config, data)
                result.update(name=name, temperature=config.temperature,
                              learning_rate=config.learning_rate, backbone=config.backbone,
                              target_dims=list(config.target_dims))
                runs.append(result)
                done[key].append(result)
                print(f"  {name:<26} seed {seed}: MAP@R {result['map_at_r']:.3f}  "
                      f"P@1 {result['precision_at_1']:.3f}  ({time.time() - start:.0f} s)",
                      flush=True)
        return done[key]

    groups: dict[str, list] = {}
    for variant in args.variants:
        gamma = 0.0 if variant == "baseline" else args.gamma
        name = variant if variant == "baseline" else f"{variant} γ={gamma:g}"
        groups[name] = configuration(name, variant, gamma)
    sweep_seeds = seeds if args.sweep_seeds is None else list(range(args.sweep_seeds))
    sweep = {}
    for g in args.gammas:
        for variant, routing in (("MSD", "f only"), ("MSD paper", "into backbone")):
            name = f"MSD γ={g:g} ({routing})"
            if variant == "MSD paper" and (g == 0 or not args.sweep_paper_routing):
                continue  # at γ=0 nothing is distilled: both routings are the same model
            sweep[name] = configuration(name, variant, g, run_seeds=sweep_seeds,
                                        distillation_into_backbone=False)

    # Warm-up sweep: MSD at --gamma with γ ramped in over a fraction of all training steps.
    steps_per_epoch = len(range(0, len(data[0][0]), args.batch_size))
    for fraction in args.warmups:
        warmup = int(round(fraction * args.epochs * steps_per_epoch))
        name = f"MSD γ={args.gamma:g} warm-up {fraction:g} ({warmup} steps)"
        sweep[name] = configuration(name, "MSD", args.gamma, run_seeds=sweep_seeds,
                                    distillation_into_backbone=False,
                                    distillation_warmup=warmup)

    investigation: dict[str, list] = {}
    for temperature in args.temperatures:
        name = f"MSD γ={args.gamma:g} T={temperature:g}"
        investigation[name] = configuration(name, "MSD", args.gamma, temperature=temperature)
    for lr in args.learning_rates:
        for variant, gamma in (("baseline", 0.0), ("MSD", args.gamma)):
            name = f"{variant}{f' γ={gamma:g}' if gamma else ''} lr={lr:g}"
            investigation[name] = configuration(name, variant, gamma, learning_rate=lr)
    if args.head_designs:
        paper_widths = [512, 1024, 1536, 2048]
        name = f"MSD γ={args.gamma:g} targets 512-2048"
        investigation[name] = configuration(name, "MSD", args.gamma, target_dims=paper_widths)
        other = "dense128" if args.backbone == "trunk" else "trunk"
        for variant in ("baseline", "MSD", "MSDF"):
            gamma = 0.0 if variant == "baseline" else args.gamma
            name = f"{variant}{f' γ={gamma:g}' if gamma else ''} φ={other}"
            investigation[name] = configuration(name, variant, gamma, backbone=other)

    baseline_step = statistics.mean(r["step_seconds"] for r in groups["baseline"])
    print(f"\nreference points on the unseen {args.dataset} classes (no training):")
    for name, results in reference.items():
        cells = "  ".join(
            "{} {:.3f} ± {:.3f}".format(SHORT[m], *mean_std([r[m] for r in results]))
            for m in METRICS
        )
        print(f"  {name:<12}{cells}")
    print_table(
        f"unseen {args.dataset} classes, mean ± std over {len(seeds)} seeds "
        "(step time relative to baseline)",
        groups, baseline_step,
    )
    if sweep:
        print_table(f"γ sweep (MSD, {len(sweep_seeds)} seeds; γ=0: target heads trained, "
                    "nothing distilled)", sweep, baseline_step)
    if investigation:
        print_table("investigation: temperature, learning rate, head design", investigation,
                    baseline_step)
    curve_groups = {**groups, **{k: v for k, v in sweep.items() if k not in groups}}
    epochs_scored = sorted(groups["baseline"][0]["curve"])
    if epochs_scored:
        print("\nMAP@R on 5-9 during training (mean over seeds)")
        print(f"{'variant':<26}{'epoch 0':>9}" + "".join(f"{e:>9}" for e in epochs_scored))
        untrained_map = mean_std([r["map_at_r"] for r in reference["untrained"]])[0]
        for name, results in curve_groups.items():
            cells = "".join(
                f"{np.mean([r['curve'][e] for r in results]):>9.3f}" for e in epochs_scored
            )
            print(f"{name:<26}{untrained_map:>9.3f}{cells}")
    print(f"\ndone in {time.time() - start:.0f} s")
    summary = {"args": vars(args), "reference": reference, "runs": runs}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(summary, f, indent=1, default=float)
    return summary


if __name__ == "__main__":
    main()
