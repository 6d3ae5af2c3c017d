"""Quality table on unseen classes: metric losses vs margin heads on scikit-learn digits.

Zero-shot protocol (DESIGN.md): train on digits 0-4, embed digits 5-9 and
score leave-one-out retrieval among them (P@1, R-Precision, MAP@R, cosine).
Every method trains the same backbone (small conv net, L2-normalised
embedding) with the same optimizer, the same P x M class-balanced batches
(`keras_dml.data.m_per_class_dataset`) and the same number of steps; only the
loss differs. Metric losses use `model.compile(loss=...)`; heads are trained
through `keras_dml.models.MarginModel` (centres with a `--centers-lr-multiplier`
times larger learning rate; each head's own loss, e.g. Proxy-Anchor's, where
it has one) and dropped for evaluation. The raw-pixel
baseline retrieves the flattened 8x8 images directly; `untrained_network` is
the backbone at its initialisation.

Every trained network is scored twice: on the L2-normalised embedding the loss
trains, and on its trunk features (the conv layers' flattened feature map,
before the two Dense layers of the embedding). With five training classes the
embedding specialises to them and retrieves the unseen digits worse than raw
pixels, while the trunk features beat both baselines (BENCHMARKS.md).

Full run (3 seeds, 14 methods and 2 baselines; ~4 minutes on 2 quiet CPU cores):

    python benchmarks/bench_quality_digits.py

Small smoke run:

    python benchmarks/bench_quality_digits.py --seeds 0 --epochs 2 --methods raw_pixels,arcface

`--dataset glyphs` runs the same table on the bundled many-class glyphs
(`keras_dml.data.glyphs`: 32x32, 353 training characters, 236 unseen ones
scored), with the same network plus one pooling after the first conv layer
(trunk 4096-d), 32 classes x 4 samples per batch and the heads' centres for
the 353 training classes:

    python benchmarks/bench_quality_digits.py --dataset glyphs --epochs 3
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

import keras
import numpy as np
from sklearn.datasets import load_digits

from keras_dml.data import m_per_class_dataset
from keras_dml.heads import (
    ArcFace,
    CenterLoss,
    CosFace,
    CurricularFace,
    ProxyAnchor,
    ProxyNCA,
    SoftTriple,
    SphereFace,
    SubCenterArcFace,
)
from keras_dml.layers import L2Normalize
from keras_dml.losses.quadruplet import QuadrupletLoss
from keras_dml.models import MarginModel

METRICS = ("precision_at_1", "r_precision", "map_at_r")
# The conv backbone's flattened feature map (1024-d), before the two Dense
# layers that project it to the embedding the loss sees.
TRUNK_LAYER = "trunk"
REPRESENTATIONS = ("embedding", "trunk")
TRAIN_CLASSES = 5
CENTER_LOSS_WEIGHT = 0.1

# method -> (kind, name in keras_dml.losses or head class, constructor kwargs).
# Paper defaults throughout (DESIGN.md); the loss modules are looked up by
# name so that this file runs with whatever losses exist.
METHODS: dict[str, tuple[str, object, dict]] = {
    "raw_pixels": ("baseline", None, {}),
    "untrained_network": ("untrained", None, {}),
    "triplet_semihard": ("loss", "TripletLoss", {"negative_mining": "semi-hard", "margin": 0.2}),
    "contrastive": ("loss", "ContrastiveLoss", {}),
    "multi_similarity": ("loss", "MultiSimilarityLoss", {}),
    "supcon": ("loss", "SupConLoss", {}),
    "cosface": ("head", CosFace, {}),
    "arcface": ("head", ArcFace, {}),
    "subcenter_arcface": ("head", SubCenterArcFace, {}),
    "softtriple": ("head", SoftTriple, {}),
    "quadruplet": ("loss", QuadrupletLoss, {"margin": 0.2, "pair_margin": 0.1}),
    # The paper's λ = 0.003 is for unnormalised face features; on the unit
    # sphere squared distances are < 4, so the centre term needs more weight.
    "center_loss": ("head", CenterLoss, {"weight": CENTER_LOSS_WEIGHT}),
    "proxy_nca": ("head", ProxyNCA, {}),
    "proxy_anchor": ("head", ProxyAnchor, {}),
    # The backbone L2-normalises, so ‖x‖ = 1 cannot be SphereFace's scale; and its
    # λ schedule (γ = 0.12) is paced for ~30k iterations: γ = 1 reaches λ_min
    # within this budget of a few hundred steps.
    "sphereface": ("head", SphereFace, {"scale": 64.0, "lambda_gamma": 1.0}),
    "curricularface": ("head", CurricularFace, {}),
}


def load_split(dataset: str = "digits"):
    """Images in [0, 1]: (training classes, unseen test classes).

    Digits: (8, 8, 1), classes 0-4 / 5-9. Glyphs: (32, 32, 1), the default
    split of `load_glyphs_zero_shot` (its held-out images of the training
    characters are not used).
    """
    if dataset == "glyphs":
        from keras_dml.data.glyphs import load_glyphs_zero_shot

        glyphs = load_glyphs_zero_shot()
        return (glyphs.x_train, glyphs.y_train), (glyphs.x_unseen, glyphs.y_unseen)
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    train, test = y < TRAIN_CLASSES, y >= TRAIN_CLASSES
    return (x[train], y[train]), (x[test], y[test])


def build_backbone(embedding_dim: int, kind: str = "conv", input_shape=(8, 8, 1)) -> keras.Model:
    """The one backbone every method trains, ending in an L2-normalised embedding.

    `conv`: conv net -> Dense(embedding_dim) (the demo's network). `linear`: a
    64 x 64 linear map of the flattened pixels initialised to the identity, so
    that before training it *is* the raw-pixel baseline and any change in the
    scores is the effect of the loss on unseen classes.
    """
    if kind == "linear":
        return keras.Sequential(
            [
                keras.Input((8, 8, 1)),
                keras.layers.Flatten(),
                keras.layers.Dense(64, use_bias=False, kernel_initializer="identity"),
                L2Normalize(),
            ],
            name="digits_linear_backbone",
        )
    pool = [keras.layers.MaxPooling2D()] if input_shape[0] >= 16 else []
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            *pool,
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(name=TRUNK_LAYER),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(embedding_dim),
            L2Normalize(),
        ],
        name="digits_backbone",
    )


def resolve(name: str):
    """`keras_dml.losses.<name>` / `keras_dml.evaluation.<name>`, or None if not there yet."""
    for module_name in ("keras_dml.losses", "keras_dml.evaluation"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, name):
            return getattr(module, name)
    return None


def evaluate(embeddings: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    retrieval_metrics = resolve("retrieval_metrics")
    if retrieval_metrics is None:
        raise SystemExit("keras_dml.evaluation.retrieval_metrics is not available yet.")
    scores = retrieval_metrics(embeddings, labels, k=(1,), distance="cosine", nmi=False)
    return {name: float(scores[name]) for name in METRICS}


def representations(backbone: keras.Model, x: np.ndarray) -> dict[str, np.ndarray]:
    """The embedding the loss trained and, for the conv backbone, the trunk features.

    Both come from one pass through the backbone (a two-output model on its layers).
    """
    if not any(layer.name == TRUNK_LAYER for layer in backbone.layers):
        return {"embedding": backbone.predict(x, batch_size=512, verbose=0)}
    both = keras.Model(backbone.inputs,
                       [backbone.outputs[0], backbone.get_layer(TRUNK_LAYER).output])
    embedding, trunk = both.predict(x, batch_size=512, verbose=0)
    return {"embedding": embedding, "trunk": trunk}


def train_and_embed(method: str, seed: int, data, args) -> dict[str, np.ndarray]:
    """Trains `method` with the shared backbone and budget; returns test representations."""
    (x_train, y_train), (x_test, _) = data
    kind, target, kwargs = METHODS[method]
    keras.utils.set_random_seed(seed)
    backbone = build_backbone(args.embedding_dim, args.backbone, x_train.shape[1:])
    if kind == "untrained":
        return representations(backbone, x_test)
    optimizer = keras.optimizers.Adam(args.learning_rate)
    if kind == "loss":
        loss_class = resolve(target) if isinstance(target, str) else target
        if loss_class is None:
            raise LookupError(f"keras_dml.losses.{target} is not available")
        model = backbone
        model.compile(optimizer=optimizer, loss=loss_class(**kwargs))
    else:
        model = MarginModel(backbone, target(args.num_train_classes, **kwargs))
        model.compile(
            optimizer=optimizer,
            centers_optimizer=args.learning_rate * args.centers_lr_multiplier,
        )
    batches = m_per_class_dataset(
        x_train,
        y_train,
        classes_per_batch=args.classes_per_batch,
        samples_per_class=args.samples_per_class,
        seed=seed,
    )
    steps = int(np.ceil(len(y_train) / (args.classes_per_batch * args.samples_per_class)))
    model.fit(batches, epochs=args.epochs, steps_per_epoch=steps, shuffle=False, verbose=0)
    return representations(backbone, x_test)


def run(args) -> dict:
    """results[method][representation][metric] = (mean, std) over seeds."""
    data = load_split(args.dataset)
    (_, y_train), (x_test, y_test) = data
    args.num_train_classes = int(len(np.unique(y_train)))
    results: dict[str, dict] = {}
    for method in args.methods:
        runs: dict[str, list] = {}
        seconds = []
        for seed in args.seeds:
            start = time.time()
            if METHODS[method][0] == "baseline":
                pixels = x_test.reshape(len(x_test), -1)
                embedded = {name: pixels for name in REPRESENTATIONS}
            else:
                try:
                    embedded = train_and_embed(method, seed, data, args)
                except LookupError as error:
                    print(f"{method:<20} skipped: {error}", file=sys.stderr)
                    break
            for name, embeddings in embedded.items():
                runs.setdefault(name, []).append(evaluate(embeddings, y_test))
            seconds.append(time.time() - start)
            print(f"{method:<20} seed {seed}: " + "; ".join(
                f"{name} " + ", ".join(f"{k}={v:.3f}" for k, v in scores[-1].items())
                for name, scores in runs.items()) + f" ({seconds[-1]:.1f}s)",
                file=sys.stderr, flush=True)
            if METHODS[method][0] == "baseline":
                break  # deterministic: one run is every seed
        if runs:
            results[method] = {
                name: {
                    metric: (float(np.mean(values)), float(np.std(values)))
                    for metric in METRICS
                    for values in [[r[metric] for r in scores]]
                }
                for name, scores in runs.items()
            }
            results[method]["seconds_per_run"] = float(np.mean(seconds))
            results[method]["runs"] = len(seconds)
    return results


def markdown_table(results: dict, representation: str = "embedding") -> str:
    """One row per method, scored on `representation`; "beats" compares MAP@R."""
    references = {
        name: results[name][representation]["map_at_r"][0]
        for name in ("raw_pixels", "untrained_network")
        if representation in results.get(name, {})
    }
    header = "| method | P@1 | R-Precision | MAP@R |"
    header += "".join(f" beats {name.replace('_', ' ')} |" for name in references)
    lines = [header + " s/run |", "|" + " --- |" * (5 + len(references))]
    for method, row in results.items():
        if representation not in row:
            continue
        cells = [f"{row[representation][m][0]:.3f} ± {row[representation][m][1]:.3f}"
                 for m in METRICS]
        for reference in references.values():
            if METHODS[method][0] in ("baseline", "untrained"):
                cells.append("—")
            else:
                cells.append("yes" if row[representation]["map_at_r"][0] > reference else "**no**")
        lines.append(f"| {method} | {' | '.join(cells)} | {row['seconds_per_run']:.1f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument(
        "--methods",
        type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
        default=list(METHODS),
        help=f"comma-separated subset of: {','.join(METHODS)}",
    )
    parser.add_argument("--backbone", choices=("conv", "linear"), default="conv")
    parser.add_argument("--embedding-dim", type=int, default=32, help="conv backbone only")
    parser.add_argument("--dataset", choices=("digits", "glyphs"), default="digits")
    parser.add_argument("--classes-per-batch", type=int, default=None,
                        help="P (default: 5 for digits, 32 for glyphs)")
    parser.add_argument("--samples-per-class", type=int, default=None,
                        help="M (default: 16 for digits, 4 for glyphs)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--centers-lr-multiplier", type=float, default=10.0)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    glyphs = args.dataset == "glyphs"
    if args.classes_per_batch is None:
        args.classes_per_batch = 32 if glyphs else TRAIN_CLASSES
    if args.samples_per_class is None:
        args.samples_per_class = 4 if glyphs else 16
    if glyphs and args.backbone == "linear":
        parser.error("the linear backbone is for 8x8 digits only")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # Every run builds new models (and a trunk model to score), so Keras's
        # predict functions are traced again on purpose: the warnings are noise.
        tf.get_logger().setLevel("ERROR")
    start = time.time()
    results = run(args)
    split = ("train 0-4 / test 5-9" if args.dataset == "digits" else
             f"train {args.num_train_classes} characters / test the unseen ones")
    print(
        f"\n{args.dataset}, {split} (leave-one-out, cosine), seeds {args.seeds}, "
        f"{args.epochs} epochs, {args.backbone} backbone, "
        f"P x M = {args.classes_per_batch} x {args.samples_per_class}, "
        f"backend {keras.backend.backend()}, total {time.time() - start:.0f}s\n"
    )
    for representation, title in (
        ("embedding", f"Embedding ({args.embedding_dim}-d output the loss trains)"),
        ("trunk", "Trunk features (the conv backbone's flattened feature map: "
                  f"{'4096' if args.dataset == 'glyphs' else '1024'}-d)"),
    ):
        if any(representation in row for row in results.values()):
            print(f"\n{title}\n")
            print(markdown_table(results, representation))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
