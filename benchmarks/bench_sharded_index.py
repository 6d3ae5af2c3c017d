"""Benchmark ShardedIndex (ScaNN shards, exact merge) and MilvusIndex (Milvus Lite) at 200k x 128.

For 1 shard (a plain `ScaNNIndex`) and `ShardedIndex` with 2, 4 and 8 ScaNN
shards (hashed by id): build time, batched QPS over 1000 queries and
recall@10 against `ExactIndex` over the same items. Then `MilvusIndex` on
Milvus Lite (FLAT, exact) over the same vectors, if `pymilvus` is installed:
insert time, QPS and recall@10. Prints a Markdown table.

    python benchmarks/bench_sharded_index.py
    python benchmarks/bench_sharded_index.py --items 20000 --no-milvus   # quick
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from bench_serving import embedding_like  # noqa: E402

from keras_dml.index import ExactIndex, MilvusIndex, ScaNNIndex, ShardedIndex  # noqa: E402


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    pairs = zip(found.tolist(), truth.tolist(), strict=True)
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in pairs]))


def best_qps(index, queries: np.ndarray, k: int, repeats: int) -> float:
    index.search(queries, k)  # warm-up
    best = min(_timed(lambda: index.search(queries, k)) for _ in range(repeats))
    return queries.shape[0] / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-milvus", action="store_true")
    args = parser.parse_args()

    x = embedding_like(args.items + args.queries, args.dim, seed=0)
    base, queries = x[: args.items], x[args.items :]
    ids = np.arange(args.items, dtype=np.int64)
    start = time.perf_counter()
    exact = ExactIndex()
    exact.add(base, ids=ids)
    truth = exact.search(queries, args.k)[0]
    exact_seconds = time.perf_counter() - start
    load_before = os.getloadavg()

    rows = []
    for shards in args.shards:
        start = time.perf_counter()
        if shards == 1:
            index = ScaNNIndex()
            index.add(base, ids=ids)
            index.build()
            name = "ScaNNIndex (1 shard)"
        else:
            index = ShardedIndex(num_shards=shards, shard_class="ScaNNIndex")
            index.add(base, ids=ids)
            index.build()
            name = f"ShardedIndex, {shards} ScaNN shards"
        build = time.perf_counter() - start
        qps = best_qps(index, queries, args.k, args.repeats)
        recall = recall_at_k(index.search(queries, args.k)[0], truth)
        rows.append((name, build, qps, recall))
        print(f"{name}: build {build:.1f} s, {qps:,.0f} QPS, recall@10 {recall:.4f}", flush=True)
        if isinstance(index, ShardedIndex):
            index.close()
        del index

    qps = best_qps(exact, queries, args.k, args.repeats)
    # Its first column is `add` plus the one search that gives the ground truth.
    rows.append(("ExactIndex (reference)", exact_seconds, qps, 1.0))

    if not args.no_milvus and importlib.util.find_spec("pymilvus") is not None:
        with tempfile.TemporaryDirectory() as scratch:
            start = time.perf_counter()
            with MilvusIndex(os.path.join(scratch, "bench.db"), index_type="FLAT") as milvus:
                milvus.add(base, ids=ids)
                build = time.perf_counter() - start
                qps = best_qps(milvus, queries, args.k, args.repeats)
                recall = recall_at_k(milvus.search(queries, args.k)[0], truth)
            rows.append(("MilvusIndex, Milvus Lite FLAT", build, qps, recall))
            print(f"Milvus Lite: insert {build:.1f} s, {qps:,.0f} QPS, recall@10 {recall:.4f}")
    elif not args.no_milvus:
        print("pymilvus is not installed: no Milvus row (pip install 'keras-dml[milvus]').")

    load_after = os.getloadavg()
    print()
    print(
        f"{args.items:,} x {args.dim} clustered vectors, {args.queries} queries (batched), "
        f"k = {args.k}, cosine; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
        f"UTC, {platform.machine()}, {os.cpu_count()} cores; load average "
        f"{load_before[0]:.1f} -> {load_after[0]:.1f}"
    )
    print()
    print("| index | build / insert, s | QPS (batched) | recall@10 vs exact |")
    print("|---|---|---|---|")
    for name, build, qps, recall in rows:
        print(f"| {name} | {build:.1f} | {qps:,.0f} | {recall:.4f} |")


if __name__ == "__main__":
    main()
