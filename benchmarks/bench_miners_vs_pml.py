"""Losses with miner objects: keras-dml (TensorFlow, optionally JAX) against PML (torch CPU).

Forward+backward time (mining included), median of `--repeats`, on a fixed
`(B, 128)` L2-normalised batch with `B // 16` classes. Both sides run the same
loss and miner with the same hyperparameters (the pairs of
`tests/test_loss_miners.py`, which checks they give the same values and
gradients). Each framework runs in its own subprocess, one after the other.

    python benchmarks/bench_miners_vs_pml.py                  # B = 256, 512
    python benchmarks/bench_miners_vs_pml.py --jax --batch-sizes 256

keras-dml's triplet path builds `(B, B, B)` masks and terms (a triplet
miner's output, or a pair miner's pairs combined per anchor), so memory
grows as B³: about 0.7 GB of temporaries at B = 512.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

from bench_vs_pml import _median_ms  # the one timing loop of the PML comparisons

ROWS = [
    "TripletLoss+TripletMarginMiner(semihard)",
    "TripletLoss+BatchHardMiner",
    "ContrastiveLoss+PairMarginMiner",
    "MultiSimilarityLoss+MultiSimilarityMiner",
]


def data(batch: int, dim: int = 128):
    import numpy as np

    rng = np.random.default_rng(0)
    labels = rng.integers(0, max(batch // 16, 2), size=batch).astype("int32")
    x = rng.normal(size=(batch, dim)).astype("float32")
    return labels, x / np.linalg.norm(x, axis=1, keepdims=True)


def keras_loss(row: str):
    from keras_dml import losses, miners, reducers

    return {
        "TripletLoss+TripletMarginMiner(semihard)": lambda: losses.TripletLoss(
            margin=0.2, miner=miners.TripletMarginMiner(0.2, "semihard")),
        "TripletLoss+BatchHardMiner": lambda: losses.TripletLoss(
            margin=0.2, miner=miners.BatchHardMiner()),
        "ContrastiveLoss+PairMarginMiner": lambda: losses.ContrastiveLoss(
            miner=miners.PairMarginMiner(0.2, 0.8), reducer=reducers.AvgNonZeroReducer()),
        "MultiSimilarityLoss+MultiSimilarityMiner": lambda: losses.MultiSimilarityLoss(
            miner=miners.MultiSimilarityMiner(0.1)),
    }[row]()


def pml_loss(row: str):
    from pytorch_metric_learning import distances, losses, miners

    euclid = distances.LpDistance(normalize_embeddings=False)
    pairs = {
        "TripletLoss+TripletMarginMiner(semihard)": (
            losses.TripletMarginLoss(margin=0.2, distance=euclid),
            miners.TripletMarginMiner(0.2, "semihard", distance=euclid)),
        "TripletLoss+BatchHardMiner": (
            losses.TripletMarginLoss(margin=0.2, distance=euclid),
            miners.BatchHardMiner(distance=euclid)),
        "ContrastiveLoss+PairMarginMiner": (
            losses.ContrastiveLoss(distance=euclid),
            miners.PairMarginMiner(0.2, 0.8, distance=euclid)),
        "MultiSimilarityLoss+MultiSimilarityMiner": (
            losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5),
            miners.MultiSimilarityMiner(0.1)),
    }
    loss, miner = pairs[row]
    return lambda x, y: loss(x, y, miner(x, y))


def run_tensorflow(batches, repeats):
    import tensorflow as tf

    out = []
    for batch in batches:
        labels_np, x_np = data(batch)
        labels, x = tf.constant(labels_np), tf.Variable(x_np)
        for row in ROWS:
            loss = keras_loss(row)

            @tf.function
            def step(loss=loss, labels=labels, x=x):
                with tf.GradientTape() as tape:
                    value = loss(labels, x)
                return value, tape.gradient(value, x)

            def timed(step=step):
                _, grad = step()
                tf.convert_to_tensor(grad).numpy()

            out.append({"framework": "keras-dml TF", "row": row, "batch": batch,
                        "ms": _median_ms(timed, repeats)})
    return out


def run_jax(batches, repeats):
    import jax

    out = []
    for batch in batches:
        labels, x = data(batch)
        for row in ROWS:
            loss = keras_loss(row)
            step = jax.jit(jax.value_and_grad(lambda v, loss=loss, y=labels: loss(y, v)))

            def timed(step=step, x=x):
                jax.block_until_ready(step(x))

            out.append({"framework": "keras-dml JAX", "row": row, "batch": batch,
                        "ms": _median_ms(timed, repeats)})
    return out


def run_pml(batches, repeats):
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "1")))
    out = []
    for batch in batches:
        labels_np, x_np = data(batch)
        labels = torch.tensor(labels_np.astype("int64"))
        x = torch.tensor(x_np, requires_grad=True)
        for row in ROWS:
            fn = pml_loss(row)

            def timed(fn=fn, x=x, labels=labels):
                x.grad = None
                fn(x, labels).backward()

            out.append({"framework": "PML torch", "row": row, "batch": batch,
                        "ms": _median_ms(timed, repeats)})
    return out


RUNNERS = {"tensorflow": run_tensorflow, "jax": run_jax, "pml": run_pml}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--jax", action="store_true", help="also time keras-dml on JAX")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch.set_num_threads for PML (bench_vs_pml.py says why 1)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--worker", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    ROWS[:] = args.rows
    if args.worker:
        print(json.dumps(RUNNERS[args.worker](args.batch_sizes, args.repeats)))
        return
    frameworks = ["tensorflow"] + (["jax"] if args.jax else []) + ["pml"]
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    table = {}
    for framework in frameworks:
        env = dict(os.environ, KERAS_BACKEND="jax" if framework == "jax" else "tensorflow",
                   TF_CPP_MIN_LOG_LEVEL="3", BENCH_TORCH_THREADS=str(args.torch_threads))
        command = [sys.executable, __file__, "--worker", framework, "--repeats",
                   str(args.repeats), "--batch-sizes", *map(str, args.batch_sizes),
                   "--rows", *args.rows]
        out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        for row in json.loads(out.stdout.strip().splitlines()[-1]):
            table[(row["row"], row["batch"], row["framework"])] = row["ms"]
    columns = ["keras-dml TF"] + (["keras-dml JAX"] if args.jax else []) + ["PML torch"]
    print(f"# load average {os.getloadavg()[0]:.2f} at end\n")
    print("| loss + miner | B | " + " | ".join(f"{c} ms" for c in columns) + " |")
    print("| --- | --- |" + " --- |" * len(columns))
    for batch in args.batch_sizes:
        for row in ROWS:
            cells = [table.get((row, batch, c)) for c in columns]
            text = ["—" if v is None else f"{v:.1f}" for v in cells]
            print(f"| {row} | {batch} | " + " | ".join(text) + " |")


if __name__ == "__main__":
    main()
