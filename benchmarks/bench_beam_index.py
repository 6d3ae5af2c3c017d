"""Benchmark the indexing half of the Beam pipeline (`keras_dml.beam.IndexEmbeddings`).

Synthetic clustered embeddings (50 centres, intrinsic dimension 16, like
`bench_serving.embedding_like`, generated chunk by chunk inside the pipeline)
go through `IndexEmbeddings` (hash sharding, one `ScaNNIndex` per shard, saved,
plus the manifest) on Beam's local in-process `FnApiRunner`. `--runs` lists
`SHARDS:WORKERS:MODE` runs (`direct_num_workers`, `direct_running_mode`: in_memory or
multi_processing; `IndexEmbeddings` refuses multi_threading, which dropped items).
For each: wall time, items/s, the peak resident memory of this process and its
children during the run (psutil, sampled every 0.5 s), and the loaded
`ShardedIndex`'s batched QPS (best of 3 after a warm-up) and recall@10 against
`ExactIndex`. Beside them, one `ScaNNIndex` built (add + build + save) over the
same vectors in one process. Prints a Markdown table.

    python benchmarks/bench_beam_index.py                       # 200k x 128
    python benchmarks/bench_beam_index.py --items 20000 --runs 2:1:in_memory   # quick
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import apache_beam as beam  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402
from apache_beam.runners.portability.fn_api_runner import FnApiRunner  # noqa: E402

from keras_dml.beam import IndexEmbeddings  # noqa: E402
from keras_dml.index import ExactIndex, Index, ScaNNIndex  # noqa: E402

CHUNK = 5_000


def clustered_chunk(chunk: int, size: int, dim: int, seed: int = 0) -> np.ndarray:
    """Rows `chunk * size ...` of a clustered data set; the same rows in every process."""
    shared = np.random.default_rng(seed)
    centres = shared.normal(size=(50, dim)).astype("float32")
    basis = (shared.normal(size=(16, dim)) / 4.0).astype("float32")
    rng = np.random.default_rng([seed, chunk])
    labels = rng.integers(0, 50, size=size)
    x = centres[labels] + rng.normal(size=(size, 16)).astype("float32") @ basis
    return x + 0.1 * rng.normal(size=(size, dim)).astype("float32")


def chunk_items(chunk: int, items: int, dim: int):
    size = min(CHUNK, items - chunk * CHUNK)
    vectors = clustered_chunk(chunk, size, dim)
    for row in range(size):
        yield chunk * CHUNK + row, vectors[row], {}


def run_pipeline(out: str, items: int, dim: int, shards: int, workers: int, mode: str) -> float:
    args = [f"--direct_num_workers={workers}", f"--direct_running_mode={mode}"]
    start = time.perf_counter()
    with beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions(args)) as pipeline:
        chunks = pipeline | beam.Create(range(-(-items // CHUNK)))
        embedded = (
            chunks
            | beam.Reshuffle()
            | beam.FlatMap(chunk_items, items=items, dim=dim)
        )
        _ = embedded | IndexEmbeddings(out, num_shards=shards, index="scann")
    return time.perf_counter() - start


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    pairs = zip(found.tolist(), truth.tolist(), strict=True)
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in pairs]))


def best_qps(index, queries: np.ndarray, k: int = 10, repeats: int = 3) -> float:
    index.search(queries, k)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        index.search(queries, k)
        times.append(time.perf_counter() - start)
    return len(queries) / min(times)


class PeakRSS:
    """Samples the resident memory of this process and its children every 0.5 s."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--runs", nargs="+", default=["4:1:in_memory", "4:2:multi_processing"],
                        help="SHARDS:WORKERS:MODE runs of the pipeline (modes: in_memory, "
                        "multi_processing)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the one-ScaNNIndex row")
    args = parser.parse_args()
    load_before = os.getloadavg()
    chunks = -(-args.items // CHUNK)
    base = np.concatenate([
        clustered_chunk(c, min(CHUNK, args.items - c * CHUNK), args.dim) for c in range(chunks)
    ])
    ids = np.arange(args.items, dtype=np.int64)
    queries = clustered_chunk(10**6, args.queries, args.dim)
    start = time.perf_counter()
    exact = ExactIndex()
    exact.add(base, ids=ids)
    truth = exact.search(queries, 10)[0]
    del exact
    print(f"ground truth (ExactIndex add + 1 search): {time.perf_counter() - start:.1f} s",
          flush=True)

    rows = []
    scratch = tempfile.mkdtemp(prefix="bench-beam-")
    try:
        if not args.no_baseline:
            before = psutil.Process().memory_info().rss
            with PeakRSS() as rss:
                start = time.perf_counter()
                one = ScaNNIndex()
                one.add(base, ids=ids)
                one.build()
                one.save(os.path.join(scratch, "one"))
                seconds = time.perf_counter() - start
            recall = recall_at_k(one.search(queries, 10)[0], truth)
            qps = best_qps(one, queries)
            rows.append(("one ScaNNIndex, in one process (add + build + save)", seconds,
                         before, rss.peak, qps, recall))
            print(rows[-1], flush=True)
            del one
        del base
        for run in args.runs:
            shards, workers, mode = run.split(":")
            shards, workers = int(shards), int(workers)
            out = os.path.join(scratch, f"beam-{run.replace(':', '-')}")
            before = psutil.Process().memory_info().rss
            with PeakRSS() as rss:
                seconds = run_pipeline(out, args.items, args.dim, shards, workers, mode)
            index = Index.load(os.path.join(out, "index"))
            assert len(index) == args.items, len(index)
            recall = recall_at_k(index.search(queries, 10)[0], truth)
            qps = best_qps(index, queries)
            index.close()
            name = (f"Beam IndexEmbeddings -> ShardedIndex, {shards} ScaNN shards, "
                    f"direct_num_workers={workers} ({mode})")
            rows.append((name, seconds, before, rss.peak, qps, recall))
            print(rows[-1], flush=True)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    load_after = os.getloadavg()
    print()
    print(
        f"{args.items:,} x {args.dim} clustered vectors, hash shards, "
        f"{args.queries} queries in one batch, k = 10, cosine; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()}, {os.cpu_count()} cores; load average "
        f"{load_before[0]:.1f} -> {load_after[0]:.1f}"
    )
    print()
    print("| build | wall time, s | items/s | RSS before / peak, GB | QPS | recall@10 vs exact |")
    print("|---|---|---|---|---|---|")
    for name, seconds, before, peak, qps, recall in rows:
        print(f"| {name} | {seconds:.1f} | {args.items / seconds:,.0f} | "
              f"{before / 2**30:.1f} / {peak / 2**30:.1f} | {qps:,.0f} | {recall:.4f} |")


if __name__ == "__main__":
    main()
