"""Serve image retrieval from one SavedModel: embed the query and search a ScaNN index inside it.

Steps: get an embedding model (train a small triplet model on digits 0-4,
or load one written by `keras-dml train --out DIR` with `--run DIR`); put
the unseen digits 5-9 (the gallery) in a `ScaNNIndex`; export one SavedModel
that maps raw images to the ids and scores of their nearest gallery items;
load it back as a server would and query it.

The SavedModel has an exact top-k signature with stock TensorFlow ops
(`retrieve_exact`, what a stock TensorFlow Serving binary runs) and, with
`use_scann=True`, ScaNN's approximate search (`retrieve_scann`, which needs
ScaNN's ops in the server; in Python, `import scann` before loading).

    python examples/serve_scann.py --epochs 10
    saved_model_cli show --dir runs/serve_scann/retriever/1 --all
"""

from __future__ import annotations

import argparse
import os

import keras
import numpy as np

import keras_dml
from keras_dml.data.digits import load_digits_zero_shot
from keras_dml.export import export_retrieval_model
from keras_dml.index import ScaNNIndex


def embedding_model(run_dir: str | None, data, epochs: int, seed: int) -> keras.Model:
    """The embedding model of a `keras-dml train` run, or a small one trained here."""
    if run_dir:
        return keras.saving.load_model(os.path.join(run_dir, "embedding.keras"), compile=False)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras_dml.layers.MetricEmbedding(32),
    ])
    model.compile(optimizer="adam", loss=keras_dml.TripletLoss(margin=0.2))
    model.fit(data.x_train, data.y_train, batch_size=128, epochs=epochs, shuffle=True, verbose=2)
    return model


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a keras-dml train output directory")
    parser.add_argument("--epochs", type=int, default=10, help="when training here")
    parser.add_argument("-k", type=int, default=5)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/serve_scann")
    args = parser.parse_args(argv)

    data = load_digits_zero_shot(seed=args.seed)
    embedder = embedding_model(args.run, data, args.epochs, args.seed)
    rng = np.random.default_rng(args.seed)
    query_rows = rng.choice(len(data.x_unseen), args.queries, replace=False)
    gallery_rows = np.setdiff1d(np.arange(len(data.x_unseen)), query_rows)
    x_gallery, y_gallery = data.x_unseen[gallery_rows], data.y_unseen[gallery_rows]

    # Ids are the gallery rows; metadata travels with the index (here the digit).
    index = ScaNNIndex()
    index.add(embedder.predict(x_gallery, verbose=0), ids=gallery_rows,
              metadata=[{"digit": int(y)} for y in y_gallery])
    path = os.path.join(args.out, "retriever", "1")  # TF Serving wants a version directory
    export_retrieval_model(embedder, index, path, k=args.k, use_scann=True)
    print(f"\nexported {path} ({len(index)} gallery images, top-{args.k})")

    import scann  # noqa: F401  (registers ScaNN's ops before loading the SavedModel)
    import tensorflow as tf

    served = tf.saved_model.load(path)
    queries = tf.constant(data.x_unseen[query_rows])
    approximate = served.signatures["retrieve_scann"](inputs=queries)
    exact = served.signatures["retrieve_exact"](inputs=queries)
    labels_of = dict(zip(gallery_rows.tolist(), y_gallery.tolist(), strict=True))
    hits = 0
    for row, ids in zip(query_rows, approximate["ids"].numpy(), strict=True):
        digits = [labels_of[int(i)] for i in ids]
        hits += sum(d == data.y_unseen[row] for d in digits)
        print(f"query row {row:>4} (digit {data.y_unseen[row]}): neighbour digits {digits}")
    overlap = np.mean([len(set(a) & set(e)) / args.k for a, e in
                       zip(approximate["ids"].numpy(), exact["ids"].numpy(), strict=True)])
    precision = hits / (args.queries * args.k)
    print(f"\nprecision@{args.k} of the served results: {precision:.3f}; ScaNN vs exact "
          f"top-{args.k} overlap: {overlap:.3f}")
    return {"precision_at_k": precision, "scann_exact_overlap": float(overlap)}


if __name__ == "__main__":
    main()
