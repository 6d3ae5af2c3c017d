"""Cross-batch memory (XBM): step time and memory by memory size M, keras-dml vs PML.

One training step of the loss part: write the batch into the memory, the
loss of the batch against the whole memory, and its gradient w.r.t. the
batch's embeddings (keras-dml: `CrossBatchMemory.enqueue` + `loss.compute(...,
references=...)` in one `tf.function`; PML: `CrossBatchMemory(loss,
embedding_size, memory_size)` forward+backward on torch CPU). The memory is
filled with random entries before timing (as after M / B steps), so every
step compares B queries with all M slots.

Each row runs in a fresh Python process so that its peak resident memory
(`ru_maxrss`) is its own: "peak MB" is the peak minus the process's memory
after imports and inputs (the memory variables, the B x M matrices and the
gradients). "memory MB" is the size of the stored memory itself
(M x D float32 embeddings + M int32 labels).

    python benchmarks/bench_xbm.py                          # M = 4096, 16384, 65536
    python benchmarks/bench_xbm.py --sizes 4096 --losses ContrastiveLoss --no-pml
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

DEFAULT_LOSSES = ["TripletLoss", "ContrastiveLoss", "MultiSimilarityLoss"]
# PML counterparts (same pairs; see tests/test_xbm.py): TripletLoss's default
# semi-hard mining has none (PML's TripletMarginLoss uses all triplets: at
# B=256, M=65,536 that is ~10^10 triplets).
PML = {"ContrastiveLoss", "MultiSimilarityLoss"}


def keras_worker(name, batch, size, dim, repeats, classes):
    import resource

    import numpy as np
    import tensorflow as tf

    import keras_dml
    from keras_dml.layers import CrossBatchMemory

    loss = getattr(keras_dml, name)()
    memory = CrossBatchMemory(size, dim)
    rng = np.random.default_rng(0)
    batches = [
        (tf.constant(rng.integers(0, classes, batch).astype("int32")),
         tf.Variable(rng.normal(size=(batch, dim)).astype("float32")))
        for _ in range(2)
    ]

    @tf.function(jit_compile=False)
    def step(labels, x):
        with tf.GradientTape() as tape:
            refs = memory.enqueue(labels, x)
            value = loss.compute(labels, x, references=refs)
        return value, tape.gradient(value, x)

    # A full memory of random entries (as after M / B steps), then one step to trace.
    memory.embeddings.assign(rng.normal(size=(size, dim)).astype("float32"))
    memory.labels.assign(rng.integers(0, classes, size).astype("int32"))
    memory.size.assign(size)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    value, grad = step(*batches[0])
    if not (np.isfinite(value.numpy()) and np.all(np.isfinite(grad.numpy()))):
        raise RuntimeError(f"{name} at M={size} produced non-finite values")
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        value, grad = step(*batches[i % 2])
        _ = grad.numpy()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"ms": 1000 * float(np.median(times)), "peak_mb": (peak - baseline) / 1024.0}


def pml_worker(name, batch, size, dim, repeats, classes):
    import resource

    import numpy as np
    import torch
    from pytorch_metric_learning import distances, losses, reducers

    torch.manual_seed(0)
    if name == "ContrastiveLoss":
        inner = losses.ContrastiveLoss(
            pos_margin=0.0, neg_margin=1.0, reducer=reducers.MeanReducer(),
            distance=distances.LpDistance(normalize_embeddings=False))
    else:
        inner = losses.MultiSimilarityLoss()
    xbm = losses.CrossBatchMemory(inner, embedding_size=dim, memory_size=size)
    rng = np.random.default_rng(0)
    batches = [
        (torch.tensor(rng.integers(0, classes, batch)),
         torch.tensor(rng.normal(size=(batch, dim)).astype("float32"), requires_grad=True))
        for _ in range(2)
    ]
    xbm.embedding_memory = torch.tensor(rng.normal(size=(size, dim)).astype("float32"))
    xbm.label_memory = torch.tensor(rng.integers(0, classes, size))
    xbm.has_been_filled = True
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    labels, x = batches[0]
    xbm(x, labels).backward()
    times = []
    for i in range(repeats):
        labels, x = batches[i % 2]
        start = time.perf_counter()
        xbm(x, labels).backward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"ms": 1000 * float(np.median(times)), "peak_mb": (peak - baseline) / 1024.0}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--losses", nargs="*", default=DEFAULT_LOSSES)
    parser.add_argument("--sizes", nargs="*", type=int, default=[4096, 16384, 65536])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=64,
                        help="number of classes in the random labels")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-pml", action="store_true", help="skip the PML rows")
    parser.add_argument("--worker", nargs=3, metavar=("LIB", "LOSS", "M"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        lib, name, size = args.worker[0], args.worker[1], int(args.worker[2])
        fn = keras_worker if lib == "keras-dml" else pml_worker
        print(json.dumps(fn(name, args.batch, size, args.dim, args.repeats, args.classes)))
        return

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    machine = f"{platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}"
    print(f"# machine: {machine}, load average {os.getloadavg()[0]:.1f} at start")
    print(f"# B={args.batch}, D={args.dim}, {args.classes} classes, median of {args.repeats} "
          "steps on a full memory")
    print(f"| {'loss':<20} | {'library':<9} | {'M':>6} | {'memory MB':>9} | {'step ms':>8} "
          f"| {'peak MB':>8} |")
    print(f"|{'-' * 22}|{'-' * 11}|{'-' * 8}|{'-' * 11}|{'-' * 10}|{'-' * 10}|")
    for name in args.losses:
        for size in args.sizes:
            libs = ["keras-dml"] + (["PML"] if name in PML and not args.no_pml else [])
            for lib in libs:
                cmd = [sys.executable, __file__, "--worker", lib, name, str(size),
                       "--batch", str(args.batch), "--dim", str(args.dim),
                       "--repeats", str(args.repeats), "--classes", str(args.classes)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                stored = size * (args.dim * 4 + 4) / 2**20
                if proc.returncode != 0:
                    tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
                    print(f"| {name:<20} | {lib:<9} | {size:>6} | failed: {tail[0][:60]}")
                    continue
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"| {name:<20} | {lib:<9} | {size:>6} | {stored:>9.1f} | "
                      f"{row['ms']:>8.1f} | {row['peak_mb']:>8.0f} |", flush=True)


if __name__ == "__main__":
    main()
