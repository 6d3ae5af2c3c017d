"""Train an embedding on digits 0-4 with TripletLoss; retrieve unseen digits 5-9.

This is the zero-shot protocol of the metric-learning literature on
scikit-learn's bundled handwritten digits (1,797 real 8x8 images, no
download): the network never sees classes 5-9, and retrieval quality on them
is measured before and after training (queries = references, leave-one-out).
A fifth of the images of digits 0-4 is held out as well, to show retrieval on
seen classes. With only five training classes of 8x8 images, the gain on
seen classes is large while transfer to unseen ones is not: see BENCHMARKS.md.

Run it with `make demo`, or directly:

    python examples/digits_triplet.py --epochs 30
"""

from __future__ import annotations

import argparse
import time

import keras
import numpy as np
from sklearn.datasets import load_digits

import keras_dml
from keras_dml.evaluation import retrieval_metrics

METRIC_NAMES = ("precision_at_1", "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8",
                "r_precision", "map_at_r", "nmi")


def load_split(seed: int = 0):
    """Digits as (8, 8, 1) images in [0, 1]: (train, held-out seen, unseen) splits.

    Classes 0-4 are split 80/20 into training images and held-out images of
    the same classes; classes 5-9 are the unseen test classes.
    """
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    seen = np.flatnonzero(y < 5)
    held_out = np.random.default_rng(seed).random(len(seen)) < 0.2
    train, val = seen[~held_out], seen[held_out]
    unseen = np.flatnonzero(y >= 5)
    return (x[train], y[train]), (x[val], y[val]), (x[unseen], y[unseen])


def build_embedding_model(embedding_dim: int = 32, seed: int = 0) -> keras.Model:
    """A small conv net ending in an L2-normalised embedding."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(embedding_dim),
            keras.layers.UnitNormalization(),
        ],
        name="digits_embedding",
    )


def print_table(title: str, before: dict, after: dict) -> None:
    print(f"\n{title:<28}{'before':>10}{'after':>10}")
    for name in METRIC_NAMES:
        print(f"{name:<28}{before[name]:>10.3f}{after[name]:>10.3f}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--margin", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.time()
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = load_split(args.seed)
    print(
        f"train: {len(x_train)} images of digits 0-4; held out: {len(x_val)} images of "
        f"digits 0-4; unseen: {len(x_test)} images of digits 5-9"
    )
    model = build_embedding_model(seed=args.seed)

    def evaluate():
        return {
            "seen": retrieval_metrics(model.predict(x_val, verbose=0), y_val),
            "unseen": retrieval_metrics(model.predict(x_test, verbose=0), y_test),
        }

    before = evaluate()

    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras_dml.TripletLoss(margin=args.margin, negative_mining="semi-hard"),
    )
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs, verbose=1,
              shuffle=True)
    after = evaluate()
    print_table("held-out images, digits 0-4", before["seen"], after["seen"])
    print_table("unseen digits 5-9", before["unseen"], after["unseen"])
    print(f"\ndone in {time.time() - start:.0f} s")
    return after


if __name__ == "__main__":
    main()
