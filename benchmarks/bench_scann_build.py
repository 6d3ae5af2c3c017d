"""Benchmark ScaNN builds: reproducible (`seed=0`, the default) vs ScaNN's random start.

ScaNN starts its k-means tree from random centres by default, and that start
is not reproducible: two builds of the same data give different trees, so
different neighbours. `ScaNNIndex(seed=...)` starts k-means from ScaNN's
seeded k-means++ instead; `seed=None` keeps ScaNN's random start. For each
variant and size: build time (median of the builds), batched QPS, recall@10
against `ExactIndex`, and how many builds return neighbour ids different from
the first build's.

    python benchmarks/bench_scann_build.py
    python benchmarks/bench_scann_build.py --sizes 20000 --builds 3   # quick
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from bench_serving import embedding_like  # noqa: E402

from keras_dml.index import ExactIndex, ScaNNIndex  # noqa: E402


def run(size: int, dim: int, builds: int, num_queries: int, k: int) -> list[dict]:
    data = embedding_like(size, dim, seed=0)
    queries = embedding_like(num_queries, dim, seed=1)
    exact = ExactIndex()
    exact.add(data)
    truth, _ = exact.search(queries, k=k)
    rows = []
    variants = {
        "seed=None (ScaNN's random start)": {"seed": None},
        "seed=0 (default, k-means++)": {"seed": 0},
        "seed=0, training_threads=1": {"seed": 0, "training_threads": 1},
        "seed=1": {"seed": 1},
    }
    for name, options in variants.items():
        times, found, qps = [], [], []
        for _ in range(builds):
            index = ScaNNIndex(**options)
            index.add(data)
            start = time.perf_counter()
            index.build()
            times.append(time.perf_counter() - start)
            index.search(queries[:10], k=k)
            start = time.perf_counter()
            ids, _ = index.search(queries, k=k)
            qps.append(len(queries) / (time.perf_counter() - start))
            found.append(ids)
        recalls = [
            np.mean([len(set(a) & set(b)) / k for a, b in zip(rows_, truth, strict=True)])
            for rows_ in found
        ]
        differing = sum(int(np.any(found[0] != other)) for other in found[1:])
        rows.append(
            {
                "size": size,
                "variant": name,
                "build_s": float(np.median(times)),
                "qps": float(np.median(qps)),
                "recall_min": float(min(recalls)),
                "recall_max": float(max(recalls)),
                "differing": f"{differing}/{builds - 1}",
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--builds", type=int, default=5)
    parser.add_argument("--num-queries", type=int, default=2000)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    print(
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    )
    print()
    print("| N | build | build s | QPS (batched) | recall@10 | builds differing from the first |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        for row in run(size, args.dim, args.builds, args.num_queries, args.k):
            recall = (
                f"{row['recall_min']:.4f}"
                if row["recall_min"] == row["recall_max"]
                else f"{row['recall_min']:.4f}–{row['recall_max']:.4f}"
            )
            print(
                f"| {row['size']:,} | {row['variant']} "
                f"| {row['build_s']:.2f} | {row['qps']:,.0f} | {recall} | {row['differing']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
