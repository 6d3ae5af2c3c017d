"""Siamese and triplet networks on handwritten digits: the classic walk-through, in Keras.

Three steps, as in the usual introduction to metric learning:

1. A Siamese network: one backbone embeds both images of a pair; the
   contrastive loss pulls same-digit pairs together and pushes other pairs
   beyond a margin (`keras_dml.models.siamese.SiameseModel`).
2. A triplet network with 2-D embeddings, so the embedding space can be
   drawn: `keras_dml.TripletLoss(margin=1.5, distance="euclidean")`, Adam,
   `EarlyStopping` and `ReduceLROnPlateau` watching retrieval quality
   (`val_map_at_r`, put in the logs by `RetrievalMetricsCallback`). The
   train and test embeddings are plotted, one viridis colour per digit.
3. 64-D embeddings, then a linear classifier on the frozen embeddings, with
   its classification report.

All ten digits are in both splits here (the classic setting). For the
zero-shot protocol of the metric-learning literature (train 0-4, test on
unseen 5-9), see `examples/digits_triplet.py` and `keras-dml train`.

Runs offline on scikit-learn's 8x8 digits by default; `--dataset mnist`
uses TFDS's MNIST if it is prepared (`tfds build mnist`):

    python examples/mnist_triplet.py --epochs 30 --out runs/mnist_triplet
"""

from __future__ import annotations

import argparse
import os

import keras
import numpy as np

import keras_dml
from keras_dml import plots
from keras_dml.callbacks import RetrievalMetricsCallback
from keras_dml.evaluation import retrieval_metrics
from keras_dml.models.siamese import ContrastivePairLoss, SiameseModel, make_pairs


def load_data(dataset: str, seed: int = 0, data_dir: str | None = None):
    """`(x_train, y_train), (x_test, y_test)`, images `(n, h, w, 1)` in [0, 1], all ten digits."""
    if dataset == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = (digits.images / 16.0).astype("float32")[..., None]
        y = digits.target.astype("int32")
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=0.25, stratify=y, random_state=seed
        )
        return (x_train, y_train), (x_test, y_test)
    import tensorflow_datasets as tfds

    try:
        splits = tfds.load("mnist", split=["train", "test"], as_supervised=True,
                           data_dir=data_dir, download=False)
    except AssertionError:
        raise SystemExit("MNIST is not prepared for TFDS: run `tfds build mnist`, or use "
                         "--dataset digits") from None

    def arrays(dataset):
        batches = list(dataset.batch(10_000).as_numpy_iterator())
        images = np.concatenate([x for x, _ in batches])
        labels = np.concatenate([y for _, y in batches])
        return (images / 255.0).astype("float32"), labels.astype("int32")

    return arrays(splits[0]), arrays(splits[1])


def build_backbone(input_shape, embedding_dim: int, normalize: bool) -> keras.Model:
    """A small CNN ending in an `embedding_dim` vector (on the unit sphere if `normalize`)."""
    layers = [
        keras.Input(input_shape),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D() if input_shape[0] >= 16 else keras.layers.Identity(),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(embedding_dim),
    ]
    if normalize:
        layers.append(keras_dml.layers.L2Normalize())
    return keras.Sequential(layers)


def siamese_step(x_train, y_train, x_test, y_test, epochs: int, seed: int) -> None:
    """Step 1: a Siamese network trained on labelled pairs with the contrastive loss."""
    keras.utils.set_random_seed(seed)
    backbone = build_backbone(x_train.shape[1:], 32, normalize=True)
    model = SiameseModel(backbone, distance="euclidean")
    # On the unit sphere distances are at most 2: a margin of 1 separates well.
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=ContrastivePairLoss(neg_margin=1.0))
    (test_a, test_b), test_same = make_pairs(x_test, y_test, num_pairs=2000, seed=seed + 1)

    def mean_distances():
        d = model.predict((test_a, test_b), verbose=0)
        return d[test_same == 1].mean(), d[test_same == 0].mean()

    before = mean_distances()
    pairs, same = make_pairs(x_train, y_train, num_pairs=4 * len(x_train), seed=seed)
    model.fit(pairs, same, batch_size=128, epochs=epochs, verbose=2)
    after = mean_distances()
    print(f"\n[1] Siamese: mean test distance of same-digit pairs {before[0]:.3f} -> "
          f"{after[0]:.3f}, "
          f"of different-digit pairs {before[1]:.3f} -> {after[1]:.3f}\n")


def triplet_2d_step(x_train, y_train, x_test, y_test, epochs: int, seed: int, out: str):
    """Step 2: a triplet network with 2-D embeddings, plotted."""
    keras.utils.set_random_seed(seed)
    model = build_backbone(x_train.shape[1:], 2, normalize=False)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras_dml.TripletLoss(margin=1.5, distance="euclidean"))
    callbacks = [
        # First in the list: the callbacks after it read `val_map_at_r` from the logs.
        RetrievalMetricsCallback((x_test, y_test), k=(1, 4), distance="euclidean", nmi=False),
        keras.callbacks.EarlyStopping(monitor="val_map_at_r", mode="max", patience=5,
                                      restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_map_at_r", mode="max", factor=0.5,
                                          patience=3),
    ]
    history = model.fit(x_train, y_train, batch_size=128, epochs=epochs, shuffle=True,
                        callbacks=callbacks, verbose=2)
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        plots.plot_embeddings_2d(model.predict(x, verbose=0), y,
                                 title=f"2-D triplet embeddings, {name} set",
                                 path=os.path.join(out, f"embeddings_2d_{name}.png"))
    plots.plot_training_curves(history, path=os.path.join(out, "training_curves_2d.png"))
    print(f"\n[2] 2-D embeddings: plots in {out}/embeddings_2d_train.png and "
          "embeddings_2d_test.png\n")


def triplet_64d_step(x_train, y_train, x_test, y_test, epochs: int, seed: int, out: str) -> dict:
    """Step 3: 64-D embeddings, a linear classifier on them and retrieval metrics."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import classification_report

    keras.utils.set_random_seed(seed)
    model = build_backbone(x_train.shape[1:], 64, normalize=True)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras_dml.TripletLoss(margin=0.2, negative_mining="semi-hard"))
    model.fit(x_train, y_train, batch_size=128, epochs=epochs, shuffle=True, verbose=2)
    train_embeddings = model.predict(x_train, verbose=0)
    test_embeddings = model.predict(x_test, verbose=0)
    classifier = LogisticRegression(max_iter=1000).fit(train_embeddings, y_train)
    print("\n[3] linear classifier on frozen 64-D triplet embeddings, test set:")
    print(classification_report(y_test, classifier.predict(test_embeddings), digits=3))
    metrics = retrieval_metrics(test_embeddings, y_test)
    print("retrieval on the test set: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    plots.plot_embeddings_2d(test_embeddings, y_test, title="64-D test embeddings (PCA)",
                             path=os.path.join(out, "embeddings_64d_test.png"))
    return metrics


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("digits", "mnist"), default="digits")
    parser.add_argument("--epochs", type=int, default=30, help="epochs of each step (budget)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-images", type=int, default=None,
                        help="train on at most this many images (budget)")
    parser.add_argument("--data-dir", default=None, help="TFDS data directory (mnist)")
    parser.add_argument("--out", default="runs/mnist_triplet", help="where to save the plots")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    (x_train, y_train), (x_test, y_test) = load_data(args.dataset, args.seed, args.data_dir)
    if args.max_images:
        x_train, y_train = x_train[: args.max_images], y_train[: args.max_images]
    print(f"{args.dataset}: {len(x_train)} training and {len(x_test)} test images "
          f"{x_train.shape[1:]}, 10 classes")
    siamese_step(x_train, y_train, x_test, y_test, args.epochs, args.seed)
    triplet_2d_step(x_train, y_train, x_test, y_test, args.epochs, args.seed, args.out)
    return triplet_64d_step(x_train, y_train, x_test, y_test, args.epochs, args.seed, args.out)


if __name__ == "__main__":
    main()
