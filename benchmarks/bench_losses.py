"""Forward+backward time and peak memory of every loss, by batch size.

Each (loss, batch size) runs in a fresh Python process so that its peak
resident memory (`ru_maxrss`) is its own: the table shows the peak minus the
process's memory after imports and input creation. Time is the median of
`--repeats` compiled (`tf.function`, TensorFlow backend) forward+backward
passes at D=128.

    python benchmarks/bench_losses.py                 # full table (B = 256, 1024, 4096)
    python benchmarks/bench_losses.py --batch-sizes 256 --losses TripletLoss
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

DEFAULT_LOSSES = [
    "TripletSemiHardLoss",
    "TripletHardLoss",
    "TripletLoss",
    "TripletLoss:all",
    "ContrastiveLoss",
    "NPairsLoss",
    "MultiSimilarityLoss",
    "CircleLoss",
    "LiftedStructLoss",
    "NTXentLoss",
    "SupConLoss",
]


def make_loss(spec: str):
    import keras_dml

    name, _, variant = spec.partition(":")
    cls = getattr(keras_dml, name)
    if variant == "all":
        return cls(negative_mining="all")
    return cls()


def worker(spec: str, batch: int, dim: int, repeats: int, classes: int) -> dict:
    import resource

    import numpy as np
    import tensorflow as tf

    loss = make_loss(spec)
    rng = np.random.default_rng(0)
    labels = tf.constant(rng.integers(0, classes, size=batch).astype("int32"))
    x = tf.Variable(rng.normal(size=(batch, dim)).astype("float32"))

    @tf.function(jit_compile=False)
    def step():
        with tf.GradientTape() as tape:
            value = loss(labels, x)
        return value, tape.gradient(value, x)

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    value, grad = step()  # trace + first run
    if not (np.isfinite(value.numpy()) and np.all(np.isfinite(grad.numpy()))):
        raise RuntimeError(f"{spec} at B={batch} produced non-finite values")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value, grad = step()
        _ = grad.numpy()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "loss": spec,
        "batch": batch,
        "ms": 1000 * float(np.median(times)),
        "peak_mb": (peak - baseline) / 1024.0,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--losses", nargs="*", default=DEFAULT_LOSSES)
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[256, 1024, 4096])
    parser.add_argument("--semihard-large", type=int, default=8192,
                        help="extra batch size run for TripletSemiHardLoss only (0: skip)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=64,
                        help="number of classes in the random labels")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", nargs=2, metavar=("LOSS", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        spec, batch = args.worker[0], int(args.worker[1])
        repeats = args.repeats if batch <= 4096 else max(2, args.repeats // 2)
        print(json.dumps(worker(spec, batch, args.dim, repeats, args.classes)))
        return

    runs = [(spec, b) for spec in args.losses for b in args.batch_sizes]
    if args.semihard_large and "TripletSemiHardLoss" in args.losses:
        runs.append(("TripletSemiHardLoss", args.semihard_large))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    machine = f"{platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}"
    print(f"# machine: {machine}")
    print(f"# D={args.dim}, {args.classes} classes, median of {args.repeats} steps")
    print(f"| {'loss':<22} | {'B':>5} | {'fwd+bwd ms':>10} | {'peak MB':>8} |")
    print(f"|{'-' * 24}|{'-' * 7}|{'-' * 12}|{'-' * 10}|")
    for spec, batch in runs:
        cmd = [sys.executable, __file__, "--worker", spec, str(batch), "--dim", str(args.dim),
               "--repeats", str(args.repeats), "--classes", str(args.classes)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
            print(f"| {spec:<22} | {batch:>5} | failed: {tail[0][:60]}")
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| {spec:<22} | {batch:>5} | {row['ms']:>10.1f} | {row['peak_mb']:>8.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
