"""Before/after table of retrieval post-processing on unseen digits: AQE, αQE, DBA, k-reciprocal.

Protocol: the conv net of `examples/digits_triplet.py` is trained with the
semi-hard triplet loss on digits 0-4 (its training split, the demo's
settings); the images of digits 5-9, never seen in training, are split per
class into half queries and half gallery (a different split per seed). Each
query is searched in the gallery by cosine similarity, then the same search
is post-processed. The same is done on raw pixels (the flattened 8x8 images).
Scores are P@1, R-Precision and MAP@R (Musgrave et al. 2020), R being the
number of gallery images of the query's class; mean ± std over seeds.

A separate gallery (not leave-one-out among all images) keeps DBA honest: in
leave-one-out a query would be averaged into its own neighbours' augmented
vectors.

Full run (3 seeds; about 30 s on 2 CPU cores):

    python benchmarks/bench_reranking.py

Quick run:

    python benchmarks/bench_reranking.py --seeds 0 --epochs 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import keras
import numpy as np

import keras_dml
from keras_dml.evaluation import nearest_neighbors, retrieval_metrics
from keras_dml.evaluation.reranking import (
    alpha_query_expansion,
    average_query_expansion,
    database_augmentation,
    k_reciprocal_rerank,
)

METRICS = ("precision_at_1", "r_precision", "map_at_r")
HEADERS = ("P@1", "R-Precision", "MAP@R")
_EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "digits_triplet.py")


def load_example():
    """The demo module (`load_split`, `build_embedding_model`), loaded from its file."""
    spec = importlib.util.spec_from_file_location("digits_triplet", _EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def query_gallery_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Half of each class as queries, the other half as gallery (indices)."""
    rng = np.random.default_rng(seed)
    queries, gallery = [], []
    for value in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == value))
        queries.append(members[: len(members) // 2])
        gallery.append(members[len(members) // 2 :])
    return np.concatenate(queries), np.concatenate(gallery)


def ranking_metrics(ranked: np.ndarray, query_labels, gallery_labels) -> dict[str, float]:
    """P@1, R-Precision and MAP@R of rankings (`ranked`: gallery rows, best first)."""
    relevant_counts = np.bincount(gallery_labels, minlength=int(gallery_labels.max()) + 1)
    r = relevant_counts[query_labels]
    hits = gallery_labels[ranked] == query_labels[:, None]
    within_r = np.arange(ranked.shape[1])[None, :] < r[:, None]
    precision_at_i = np.cumsum(hits, axis=1) / np.arange(1, ranked.shape[1] + 1)
    return {
        "precision_at_1": float(hits[:, 0].mean()),
        "r_precision": float(np.mean((hits & within_r).sum(axis=1) / r)),
        "map_at_r": float(np.mean((precision_at_i * (hits & within_r)).sum(axis=1) / r)),
    }


def cosine_ranking(queries, gallery, depth):
    return nearest_neighbors(queries, gallery, k=depth, distance="cosine")[0]


def evaluate_methods(queries, gallery, query_labels, gallery_labels, args) -> dict:
    """Scores the plain search and every post-processing on one query/gallery split."""
    depth = int(np.bincount(gallery_labels).max())  # the largest R
    results = {}

    def score(name, ranked):
        results[name] = ranking_metrics(ranked, query_labels, gallery_labels)

    baseline = cosine_ranking(queries, gallery, depth)
    score("baseline (cosine)", baseline)
    # The hand-written metrics must agree with the library's on the plain search.
    reference = retrieval_metrics(
        queries, query_labels, reference_embeddings=gallery, reference_labels=gallery_labels,
        k=(1,), nmi=False,
    )
    for name in METRICS:
        assert abs(reference[name] - results["baseline (cosine)"][name]) < 1e-9, name

    expanded = average_query_expansion(queries, gallery, k=args.aqe_k, neighbors=baseline)
    score(f"AQE (k={args.aqe_k})", cosine_ranking(expanded, gallery, depth))
    expanded = alpha_query_expansion(
        queries, gallery, k=args.qe_k, alpha=args.alpha, neighbors=baseline
    )
    score(f"αQE (k={args.qe_k}, α={args.alpha:g})", cosine_ranking(expanded, gallery, depth))
    augmented = database_augmentation(gallery, k=args.dba_k, alpha=args.alpha)
    ranked = cosine_ranking(queries, augmented, depth)
    score(f"αDBA (k={args.dba_k}, α={args.alpha:g})", ranked)
    expanded = alpha_query_expansion(
        queries, augmented, k=args.qe_k, alpha=args.alpha, neighbors=ranked
    )
    score("αDBA + αQE", cosine_ranking(expanded, augmented, depth))
    ranked, _ = k_reciprocal_rerank(
        queries, gallery, k=depth, k1=args.k1, k2=args.k2, lambda_value=args.lambda_value
    )
    score(f"k-reciprocal (k1={args.k1}, k2={args.k2}, λ={args.lambda_value:g})", ranked)
    return results


def train_embedder(example, seed: int, epochs: int):
    (x_train, y_train), _, (x_test, y_test) = example.load_split(seed)
    model = example.build_embedding_model(seed=seed)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras_dml.TripletLoss(margin=0.2, negative_mining="semi-hard"),
    )
    model.fit(x_train, y_train, batch_size=128, epochs=epochs, verbose=0, shuffle=True)
    return model.predict(x_test, verbose=0), x_test.reshape(len(x_test), -1), y_test


def print_table(title: str, per_seed: list[dict]) -> None:
    print(f"\n{title}\n")
    print("| method | " + " | ".join(HEADERS) + " |")
    print("| --- |" + " --- |" * len(HEADERS))
    for method in per_seed[0]:
        cells = []
        for metric in METRICS:
            values = np.array([run[method][metric] for run in per_seed])
            cells.append(f"{values.mean():.3f} ± {values.std():.3f}")
        print(f"| {method} | " + " | ".join(cells) + " |")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--aqe-k", type=int, default=5)
    parser.add_argument("--qe-k", type=int, default=10)
    parser.add_argument("--dba-k", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=3.0)
    parser.add_argument("--k1", type=int, default=20)
    parser.add_argument("--k2", type=int, default=6)
    parser.add_argument("--lambda-value", type=float, default=0.3)
    parser.add_argument("--json", help="also write the per-seed results here")
    args = parser.parse_args(argv)

    start = time.time()
    example = load_example()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = {"trained embeddings": [], "raw pixels": []}
    for seed in seeds:
        embeddings, pixels, labels = train_embedder(example, seed, args.epochs)
        query_rows, gallery_rows = query_gallery_split(labels, seed)
        for name, features in (("trained embeddings", embeddings), ("raw pixels", pixels)):
            runs[name].append(
                evaluate_methods(
                    features[query_rows], features[gallery_rows],
                    labels[query_rows], labels[gallery_rows], args,
                )
            )
    n_queries, n_gallery = len(query_rows), len(gallery_rows)
    print(
        f"digits 5-9 (unseen in training): {n_queries} queries, {n_gallery} gallery images; "
        f"seeds {seeds}; mean ± std over seeds"
    )
    for name, per_seed in runs.items():
        print_table(f"{name} (model trained on digits 0-4, {args.epochs} epochs)"
                    if name == "trained embeddings" else name, per_seed)
    print(f"\ndone in {time.time() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=2)
    return runs


if __name__ == "__main__":
    main()
