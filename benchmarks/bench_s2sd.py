"""Does S2SD help? Baseline vs DSD vs MSD vs MSDF on digits, zero-shot to unseen classes.

Protocol: scikit-learn's bundled handwritten digits (8x8, no download). Every
image of digits 0-4 trains; every image of digits 5-9, never seen in training,
is scored leave-one-out (each image a query among all the others) with
`keras_dml.evaluation.retrieval_metrics`: P@1, R-Precision and MAP@R.

All variants share the backbone (the conv layers of the digits example up to
their flattened 1024-d feature map: the features φ), the base embedding f
(`Dense(embedding_dim)` + L2 normalisation on φ, used at test time), the loss
(multi-similarity, the default of the S2SD code), optimiser, epochs, batch
size and seeds:

- baseline: backbone + f trained with the loss alone (a plain `Sequential`);
- DSD: S2SD with one target head (the largest target width);
- MSD: S2SD with all target heads;
- MSDF: MSD plus distillation from φ (delay: an eighth of the steps, as the
  code's 1000 of ~8000 steps on CUB200);
- FD (not run by default; `--variants baseline FD`): distillation from φ
  alone, no target heads, at weight `--gamma`: a control for MSDF.

Then a sweep of γ (`distillation_weight`) for MSD, where γ=0 is the control
"target heads trained, nothing distilled", and the investigation the issue
asks for when S2SD does not help: MSD at several temperatures T, baseline
and MSD at several learning rates, and two head designs (the paper's target
widths 512-2048, and φ = a `Dense(128, relu)` on the trunk, i.e. features
narrower than the target heads, this benchmark's first design, under which
S2SD lost). Also reported: the untrained network and raw pixels (the
zero-shot reference points), MAP@R on 5-9 during training, training step
time relative to the baseline, and the parameter count at inference
(backbone + f, the same for every variant).

Target widths default to 128-512 for a 32-d base embedding: the paper's ratio
(512-2048 for 128-d, i.e. 4-16x) scaled to f; `--target-dims 512 1024 1536
2048` runs the paper's widths.

    python benchmarks/bench_s2sd.py                          # full run, ~14 min on 2 cores
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
    target_dims = {"DSD": (max(args.target_dims),), "FD": ()}.get(
        variant, tuple(args.target_dims)
    )
    return S2SD(
        backbone,
        embedding_dim=args.embedding_dim,
        target_dims=target_dims,
        temperature=args.temperature,
        distillation_weight=gamma,
        feature_distillation=variant in ("MSDF", "FD"),
        feature_distillation_delay=args.feature_delay,
    )


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
    print(header + f"{'step time':>12}{'train params':>14}{'test params':>13}")
    for name, runs in groups.items():
        cells = "".join(
            "{:>16}".format("{:.3f} ± {:.3f}".format(*mean_std([r[m] for r in runs])))
            for m in METRICS
        )
        step = statistics.mean(r["step_seconds"] for r in runs) / baseline_step
        print(
            f"{name:<34}{cells}{step:>11.2f}x{runs[0]['training_params']:>14,}"
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
    parser.add_argument("--backbone", choices=["trunk", "dense128"], default="trunk",
                        help="features φ: the conv trunk (1024-d) or a Dense(128, relu) on it")
    parser.add_argument("--target-dims", type=int, nargs="+", default=[128, 256, 384, 512])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--gamma", type=float, default=50.0, help="γ of DSD/MSD/MSDF")
    parser.add_argument("--gammas", type=float, nargs="*", default=[0.0, 5.0, 20.0, 50.0, 200.0],
                        help="γ values of the MSD sweep (none: no sweep)")
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
                        choices=["baseline", "DSD", "MSD", "MSDF", "FD"])
    parser.add_argument("--eval-every", type=int, default=5,
                        help="score 5-9 every N epochs (0: only at the end)")
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
    data = load_digits_zero_shot()
    (x_train, _), (x_test, y_test) = data
    steps = int(np.ceil(len(x_train) / args.batch_size))
    if args.feature_delay is None:
        args.feature_delay = (args.epochs * steps) // 8
    print(
        f"digits: train {len(x_train)} images of 0-4, test {len(x_test)} images of 5-9 "
        f"(leave-one-out); {args.epochs} epochs x {steps} steps, batch {args.batch_size}, "
        f"Adam {args.learning_rate}, loss {args.loss}, φ {args.backbone}, "
        f"f {args.embedding_dim}-d, targets {args.target_dims}, T={args.temperature}, "
        f"MSDF delay {args.feature_delay} steps; keras {keras.__version__} "
        f"({keras.backend.backend()}), {platform.processor() or ''} {os.cpu_count()} CPUs"
    )

    seeds = list(range(args.seeds))
    reference = {
        "raw pixels": [score(x_test.reshape(len(x_test), -1), x_test, y_test)],
        "untrained": [],
    }
    for seed in seeds:
        untrained = build_model("baseline", args, 0.0, seed)
        reference["untrained"].append(score(untrained, x_test, y_test))

    runs = []
    done: dict[tuple, list] = {}

    def configuration(name, variant, gamma, **changes) -> list:
        """Runs (or reuses) one configuration over all seeds; returns its results."""
        config = with_overrides(args, **changes)
        key = (variant, gamma, config.temperature, config.learning_rate, config.backbone,
               tuple(config.target_dims))
        if key not in done:
            done[key] = []
            for seed in seeds:
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
    sweep = {f"MSD γ={g:g}": configuration(f"MSD γ={g:g}", "MSD", g) for g in args.gammas}

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
    print("\nreference points on digits 5-9 (no training on 0-4):")
    for name, results in reference.items():
        cells = "  ".join(
            "{} {:.3f} ± {:.3f}".format(SHORT[m], *mean_std([r[m] for r in results]))
            for m in METRICS
        )
        print(f"  {name:<12}{cells}")
    print_table(
        f"unseen digits 5-9, mean ± std over {len(seeds)} seeds (step time relative to baseline)",
        groups, baseline_step,
    )
    if sweep:
        print_table("γ sweep (MSD; γ=0: target heads trained, nothing distilled)", sweep,
                    baseline_step)
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
