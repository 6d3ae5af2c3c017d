"""FastAP, SmoothAP, PNP, Histogram and VICReg: keras-dml (TensorFlow) against PML (torch CPU).

Forward+backward time, median of `--repeats`, on a fixed L2-normalised
`(B, 128)` batch of `sqrt(B)` contiguous classes of `sqrt(B)` samples (the
only batches on which PML's SmoothAPLoss groups classes right; the same
batch for every loss). VICReg takes rows `[:B/2]` and `[B/2:]` as the two
views (PML: `loss(emb, ref_emb=emb2)`). Each framework runs in its own
subprocess, one after the other; PML with one torch thread (as
`bench_vs_pml.py`, see there), TensorFlow with its default pool. Same
default hyperparameters on both sides.

SmoothAP and PNP build `B x B x B` tensors in both libraries: they are timed
at B <= `--cubic-max` (512 by default; 1024 would need ~4 GiB per tensor).

    python benchmarks/bench_rank_losses_vs_pml.py                   # B = 256, 1024
    python benchmarks/bench_rank_losses_vs_pml.py --batch-sizes 256 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

from bench_vs_pml import _median_ms  # the one timing loop of the PML comparisons

LOSSES = ["FastAPLoss", "SmoothAPLoss", "PNPLoss", "HistogramLoss", "VICRegLoss"]
CUBIC = ("SmoothAPLoss", "PNPLoss")


def data(batch: int, dim: int = 128):
    import numpy as np

    side = int(math.isqrt(batch))
    labels = np.repeat(np.arange(side), batch // side).astype("int32")
    x = np.random.default_rng(0).normal(size=(len(labels), dim)).astype("float32")
    return labels, x / np.linalg.norm(x, axis=1, keepdims=True)


def _wanted(name, batch, cubic_max):
    return name not in CUBIC or batch <= cubic_max


def run_tensorflow(batches, repeats, cubic_max):
    import tensorflow as tf

    import keras_dml

    rows = []
    for batch in batches:
        labels_np, x_np = data(batch)
        labels, x = tf.constant(labels_np), tf.Variable(x_np)
        for name in LOSSES:
            if not _wanted(name, batch, cubic_max):
                continue
            loss = getattr(keras_dml, name)()

            @tf.function
            def step(loss=loss, labels=labels, x=x):
                with tf.GradientTape() as tape:
                    value = loss(labels, x)
                return value, tape.gradient(value, x)

            def timed(step=step):
                step()[1].numpy()

            rows.append({"framework": "keras-dml TF", "loss": name, "batch": batch,
                         "ms": _median_ms(timed, repeats)})
    return rows


def run_pml(batches, repeats, cubic_max):
    import torch
    from pytorch_metric_learning import losses

    torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "1")))
    vicreg = losses.VICRegLoss()
    fns = {
        "FastAPLoss": losses.FastAPLoss(),
        "SmoothAPLoss": losses.SmoothAPLoss(),
        "PNPLoss": losses.PNPLoss(),
        "HistogramLoss": losses.HistogramLoss(),
        "VICRegLoss": lambda x, y: vicreg(x[: len(x) // 2], ref_emb=x[len(x) // 2 :]),
    }
    rows = []
    for batch in batches:
        labels_np, x_np = data(batch)
        labels = torch.tensor(labels_np.astype("int64"))
        x = torch.tensor(x_np, requires_grad=True)
        for name in LOSSES:
            if not _wanted(name, batch, cubic_max):
                continue

            def timed(fn=fns[name], x=x, labels=labels):
                x.grad = None
                fn(x, labels).backward()

            rows.append({"framework": "PML torch", "loss": name, "batch": batch,
                         "ms": _median_ms(timed, repeats)})
    return rows


RUNNERS = {"tensorflow": run_tensorflow, "pml": run_pml}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cubic-max", type=int, default=512)
    parser.add_argument("--worker", choices=sorted(RUNNERS))
    args = parser.parse_args(argv)
    if args.worker:
        rows = RUNNERS[args.worker](args.batch_sizes, args.repeats, args.cubic_max)
        print(json.dumps(rows))
        return
    table = {}
    for framework in ("tensorflow", "pml"):
        command = [sys.executable, __file__, "--worker", framework, "--repeats",
                   str(args.repeats), "--cubic-max", str(args.cubic_max), "--batch-sizes",
                   *map(str, args.batch_sizes)]
        env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
        out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        for row in json.loads(out.stdout.strip().splitlines()[-1]):
            table[(row["loss"], row["batch"], row["framework"])] = row["ms"]
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, D=128, median of "
          f"{args.repeats}")
    columns = ["keras-dml TF", "PML torch"]
    print("| loss | B | " + " | ".join(f"{c} (ms)" for c in columns) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in columns) + " |")
    for batch in args.batch_sizes:
        for name in LOSSES:
            cells = [table.get((name, batch, c)) for c in columns]
            if all(v is None for v in cells):
                continue
            text = ["—" if v is None else f"{v:.1f}" for v in cells]
            print(f"| {name} | {batch} | " + " | ".join(text) + " |")


if __name__ == "__main__":
    main()
