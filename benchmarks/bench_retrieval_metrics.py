"""Time and peak memory of `retrieval_metrics` on large synthetic sets (not a test).

Each configuration runs in a fresh process so that its peak resident memory is
its own. The default is the foundation issue's target, 100,000 embeddings of
dimension 128 (leave-one-out), which as a float32 N x N matrix would be 40 GB.

    python benchmarks/bench_retrieval_metrics.py                 # 100k x 128, 1,000 classes
    python benchmarks/bench_retrieval_metrics.py --n 20000 --classes 10 --nmi
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def run_one(n: int, dim: int, classes: int, nmi: bool) -> dict:
    import numpy as np

    from keras_dml.evaluation import retrieval_metrics

    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, size=n)
    centres = rng.normal(size=(classes, dim)).astype("float32")
    embeddings = centres[labels] * 0.5 + rng.normal(size=(n, dim)).astype("float32")
    start = time.perf_counter()
    metrics = retrieval_metrics(embeddings, labels, nmi=nmi)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"n": n, "dim": dim, "classes": classes, "nmi": nmi, "seconds": round(seconds, 1),
            "peak_rss_mib": round(peak_mib), "map_at_r": round(metrics["map_at_r"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="*", default=[100_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, nargs="*", default=[1000])
    parser.add_argument("--nmi", action="store_true", help="also run k-means for NMI")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.n[0], args.dim, args.classes[0], args.nmi)))
        return
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Keras backend {os.environ.get('KERAS_BACKEND', 'tensorflow')}")
    print("| N | D | classes | NMI | seconds | peak RSS (MiB) | MAP@R |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n in args.n:
        for classes in args.classes:
            command = [sys.executable, __file__, "--child", "--n", str(n), "--dim", str(args.dim),
                       "--classes", str(classes)] + (["--nmi"] if args.nmi else [])
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            nmi = "yes" if row["nmi"] else "no"
            print(f"| {row['n']:,} | {row['dim']} | {row['classes']:,} | {nmi} | {row['seconds']} "
                  f"| {row['peak_rss_mib']:,} | {row['map_at_r']} |", flush=True)


if __name__ == "__main__":
    main()
