"""Time and peak memory of `retrieval_metrics` on large synthetic sets, against PML (not a test).

Every measurement runs in a fresh process, so that its peak resident memory is
its own; the table's "peak RSS growth" is the process's peak RSS during the call
(VmHWM, reset through /proc/self/clear_refs just before it) less its RSS just
before it (data generated, libraries imported). The
default is issue 21's target: 100,000 L2-normalised embeddings of dimension
128 in 1,000 classes, leave-one-out (as a float32 N x N matrix: 40 GB),

- keras-dml `retrieval_metrics(x, y, nmi=False)` and with the default `nmi=True`,
- pytorch-metric-learning's `AccuracyCalculator(include=("precision_at_1",
  "mean_average_precision_at_r"), k="max_bin_count")`, the same two metrics.

Without faiss (not a dependency of this project, nor of its dev extra), PML's
default `FaissKNN` cannot run; it is given PML's own fallback,
`CustomKNN(CosineSimilarity(), batch_size=--pml-batch)`, chunked torch matmul
and `torch.topk`, with torch's default threads. With `--rounds` > 1 the
configurations alternate round by round. `--references` adds a query set
scored against that many references (`reference_embeddings`, queries not
among them), keras-dml only unless `--pml-references`.

    python benchmarks/bench_retrieval_metrics.py                          # 100k, 1 round
    python benchmarks/bench_retrieval_metrics.py --rounds 2 --references 1000000 --queries 10000
    python benchmarks/bench_retrieval_metrics.py --n 20000 --classes 200 --only PML
    python benchmarks/bench_retrieval_metrics.py --rounds 2 --only "keras-dml nmi=True" \
        "PML+NMI faiss" "keras-dml nmi=False" "keras-dml nmi=False faiss" \
        --references 1000000 --queries 10000                          # issue 21, third pass
    python benchmarks/bench_retrieval_metrics.py --rounds 2 --only "keras-dml nmi=True" \
        "PML+NMI faiss" "keras-dml nmi=True faiss" "keras-dml nmi=False"  # fourth pass

"keras-dml nmi=True faiss" is `backend="faiss"`: faiss's search and faiss's k-means.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time

CONFIGS = ("keras-dml nmi=False", "keras-dml nmi=True", "PML")
# Not run by default: the full k-means of before issue 21 (`--only "keras-dml nmi=exact"`);
# keras-dml's faiss backend (`backend="faiss"`); PML with faiss (its default `FaissKNN`),
# for P@1 + MAP@R and with NMI (its default `FaissKMeans`).
EXTRA = ("keras-dml nmi=exact", "keras-dml nmi=False faiss", "PML faiss", "PML+NMI faiss",
         "keras-dml nmi=True faiss")
NMI = {"keras-dml nmi=False": False, "keras-dml nmi=True": True, "keras-dml nmi=exact": "exact",
       "keras-dml nmi=False faiss": False, "keras-dml nmi=True faiss": True}
# Rows that also run on the `--references` set.
REFERENCE_ROWS = ("keras-dml nmi=False", "keras-dml nmi=False faiss")


def make_data(n: int, dim: int, classes: int):
    import numpy as np

    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, size=n)
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    x = centres[labels]
    x *= 0.5
    x += rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM), so data generation does not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_one(config: str, n: int, dim: int, classes: int, references: int,
            pml_batch: int) -> dict:
    # Queries and references: one sample of the same classes, split.
    x, y = make_data(n + references, dim, classes)
    ref_x = ref_y = None
    if references:
        x, y, ref_x, ref_y = x[:n], y[:n], x[n:], y[n:]
    if config.startswith("PML"):
        import torch
        from pytorch_metric_learning.distances import CosineSimilarity
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
        from pytorch_metric_learning.utils.inference import CustomKNN

        include = ("precision_at_1", "mean_average_precision_at_r")
        if config == "PML+NMI faiss":
            include += ("NMI",)
        knn = {} if "faiss" in config else {
            "knn_func": CustomKNN(CosineSimilarity(), batch_size=pml_batch)}
        calculator = AccuracyCalculator(include=include, k="max_bin_count", **knn)
        tensors = [torch.from_numpy(x), torch.from_numpy(y)]
        if references:
            tensors += [torch.from_numpy(ref_x), torch.from_numpy(ref_y)]

        def call():
            out = calculator.get_accuracy(*tensors)
            return {"precision_at_1": out["precision_at_1"],
                    "map_at_r": out["mean_average_precision_at_r"], "nmi": out.get("NMI")}
    else:
        from keras_dml.evaluation import retrieval_metrics

        backend = "faiss" if config.endswith("faiss") else "numpy"

        def call():
            return retrieval_metrics(x, y, ref_x, ref_y, nmi=NMI[config], backend=backend)

    gc.collect()
    reset = _reset_peak()
    before = _status_mib("VmRSS")
    start = time.perf_counter()
    metrics = call()
    seconds = time.perf_counter() - start
    peak = (_status_mib("VmHWM") if reset
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"config": config, "n": n, "references": references, "seconds": seconds,
            "peak_growth_mib": peak - before, "peak_rss_mib": peak,
            "precision_at_1": float(metrics["precision_at_1"]),
            "map_at_r": float(metrics["map_at_r"]), "nmi": metrics.get("nmi")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--references", type=int, default=0,
                        help="also score --queries queries against this many references")
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--pml-references", action="store_true",
                        help="run PML on the reference row too")
    parser.add_argument("--pml-batch", type=int, default=1024)
    parser.add_argument("--only", nargs="+", choices=CONFIGS + EXTRA, default=CONFIGS,
                        help="run only these implementations")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        config, n, references = json.loads(args.child)
        print(json.dumps(run_one(config, n, args.dim, args.classes, references, args.pml_batch)))
        return
    load = os.getloadavg()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Keras backend {os.environ.get('KERAS_BACKEND', 'tensorflow')}, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start")
    jobs = [(c, args.n, 0) for c in args.only]
    if args.references:
        jobs += [(c, args.queries, args.references) for c in args.only
                 if c in REFERENCE_ROWS or (c.startswith("PML") and args.pml_references)]
    rows = []
    for round_ in range(args.rounds):
        for job in jobs:
            command = [sys.executable, __file__, "--child", json.dumps(job), "--dim",
                       str(args.dim), "--classes", str(args.classes), "--pml-batch",
                       str(args.pml_batch)]
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
            out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["round"] = round_ + 1
            row["load"] = os.getloadavg()[0]
            rows.append(row)
            print(f"#   {json.dumps(row)}", flush=True)
    print("\n| round | implementation | queries × references | seconds | peak RSS growth MB "
          "| P@1 | MAP@R | NMI | load (1 min) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        shape = (f"{row['n']:,} leave-one-out" if not row["references"]
                 else f"{row['n']:,} × {row['references']:,}")
        nmi = "—" if row["nmi"] is None else f"{row['nmi']:.4f}"
        print(f"| {row['round']} | {row['config']} | {shape} | {row['seconds']:.1f} "
              f"| {row['peak_growth_mib'] * 2**20 / 1e6:,.0f} | {row['precision_at_1']:.6f} "
              f"| {row['map_at_r']:.6f} | {nmi} | {row['load']:.2f} |", flush=True)
    by_shape: dict = {}
    for row in rows:
        by_shape.setdefault((row["n"], row["references"]), []).append(row)
    for shape, group in by_shape.items():
        values = {(r["precision_at_1"], r["map_at_r"]) for r in group}
        spread = max(max(abs(a[i] - b[i]) for a in values for b in values) for i in (0, 1))
        print(f"\n{shape}: largest P@1 / MAP@R difference between implementations {spread:.2e}")


if __name__ == "__main__":
    main()
