"""keras-dml (TensorFlow, optionally JAX) against pytorch-metric-learning (torch CPU), same run.

Forward+backward time, median of `--repeats`, of each loss on a fixed `(B, 128)`
L2-normalised batch with `B // 16` classes (random labels, about 16 samples per
class). Each framework runs in its own subprocess, one after the other, so
that TensorFlow's, JAX's and torch's thread pools do not compete; the rounds
are repeated `--rounds` times and every round is printed.

    python benchmarks/bench_vs_pml.py                      # B = 256, 1024; TF and PML
    python benchmarks/bench_vs_pml.py --jax --rounds 2
    python benchmarks/bench_vs_pml.py --jax --losses NPairsLoss "NPairsLoss[one_per_class]"

The PML columns are the closest PML equivalents, not the same losses:
`TripletMarginLoss(margin=1)` over `TripletMarginMiner(type_of_triplets="semihard")`
(every semi-hard triplet, not one negative per positive as addons),
`TripletMarginLoss(margin=1)` over `BatchHardMiner()`, and `NPairsLoss()`, which
uses one (anchor, positive) pair per class (a `C x C` softmax), where keras-dml's
`NPairsLoss` uses every sample as anchor and candidate (`B x B`) by default;
`NPairsLoss[one_per_class]` is keras-dml's `NPairsLoss(pairs="one_per_class",
l2_reg=0, distance="cosine")`, the same loss as PML's default `NPairsLoss()` (whose
`DotProductSimilarity` normalises the embeddings); its PML column times that loss again.

PML runs with `torch.set_num_threads(1)` by default: on the 2-core benchmark
machine with other processes running, torch's two OpenMP threads made PML's
NPairsLoss at B=1024 take 184-192 ms instead of 6 ms with one thread
(2026-12-01, load average ~5). `--torch-threads 2` times it with two.
TensorFlow and JAX use their default thread pools.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

LOSSES = ["TripletSemiHardLoss", "TripletSemiHardLoss[sort]", "TripletHardLoss", "NPairsLoss",
          "NPairsLoss[one_per_class]"]


def data(batch: int, dim: int = 128):
    import numpy as np

    rng = np.random.default_rng(0)
    labels = rng.integers(0, max(batch // 16, 2), size=batch).astype("int32")
    x = rng.normal(size=(batch, dim)).astype("float32")
    return labels, x / np.linalg.norm(x, axis=1, keepdims=True)


def _median_ms(step, repeats: int) -> float:
    import numpy as np

    step()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def keras_loss(name: str):
    import keras_dml
    from keras_dml import mining

    if name == "NPairsLoss[one_per_class]":
        # PML's default NPairsLoss: one (anchor, positive) pair per class, no regulariser,
        # embeddings normalised (its DotProductSimilarity normalises by default).
        return keras_dml.NPairsLoss(l2_reg=0.0, distance="cosine", pairs="one_per_class")
    if name == "TripletSemiHardLoss[sort]":
        # The sorting path every batch took before issue 21.
        mining.SEMI_HARD_MAX_QUERIES = 0
        name = "TripletSemiHardLoss"
    return getattr(keras_dml, name)()


def run_tensorflow(batches, repeats):
    import tensorflow as tf

    from keras_dml import mining

    rows = []
    for batch in batches:
        labels_np, x_np = data(batch)
        labels, x = tf.constant(labels_np), tf.Variable(x_np)
        for name in LOSSES:
            loss = keras_loss(name)

            @tf.function
            def step(loss=loss, labels=labels, x=x):
                with tf.GradientTape() as tape:
                    value = loss(labels, x)
                return value, tape.gradient(value, x)

            def timed(step=step):
                _, grad = step()
                tf.convert_to_tensor(grad).numpy()  # gathers give IndexedSlices

            rows.append({"framework": "keras-dml TF", "loss": name, "batch": batch,
                         "ms": _median_ms(timed, repeats)})
            mining.SEMI_HARD_MAX_QUERIES = 64
    return rows


def run_jax(batches, repeats):
    import jax

    from keras_dml import mining

    rows = []
    for batch in batches:
        labels, x = data(batch)
        for name in LOSSES:
            loss = keras_loss(name)
            step = jax.jit(jax.value_and_grad(lambda v, loss=loss, y=labels: loss(y, v)))

            def timed(step=step, x=x):
                jax.block_until_ready(step(x))

            rows.append({"framework": "keras-dml JAX", "loss": name, "batch": batch,
                         "ms": _median_ms(timed, repeats)})
            mining.SEMI_HARD_MAX_QUERIES = 64
    return rows


def run_pml(batches, repeats):
    import torch
    from pytorch_metric_learning import losses, miners

    torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "1")))

    def semihard(x, y):
        miner = miners.TripletMarginMiner(margin=1.0, type_of_triplets="semihard")
        return losses.TripletMarginLoss(margin=1.0)(x, y, miner(x, y))

    def hard(x, y):
        return losses.TripletMarginLoss(margin=1.0)(x, y, miners.BatchHardMiner()(x, y))

    npairs = losses.NPairsLoss()
    fns = {"TripletSemiHardLoss": semihard, "TripletHardLoss": hard, "NPairsLoss": npairs,
           "NPairsLoss[one_per_class]": npairs}
    rows = []
    for batch in batches:
        labels_np, x_np = data(batch)
        labels = torch.tensor(labels_np.astype("int64"))
        x = torch.tensor(x_np, requires_grad=True)
        for name, fn in fns.items():
            if name not in LOSSES:
                continue

            def timed(fn=fn, x=x, labels=labels):
                x.grad = None
                fn(x, labels).backward()

            rows.append({"framework": "PML torch", "loss": name, "batch": batch,
                         "ms": _median_ms(timed, repeats)})
    return rows


RUNNERS = {"tensorflow": run_tensorflow, "jax": run_jax, "pml": run_pml}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--jax", action="store_true", help="also time keras-dml on JAX")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch.set_num_threads for PML (default 1: see the module doc)")
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES),
                        help="time only these rows")
    parser.add_argument("--worker", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    LOSSES[:] = args.losses
    if args.worker:
        print(json.dumps(RUNNERS[args.worker](args.batch_sizes, args.repeats)))
        return
    frameworks = ["tensorflow"] + (["jax"] if args.jax else []) + ["pml"]
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} at start")
    for round_ in range(args.rounds):
        table = {}
        for framework in frameworks:
            env = dict(os.environ, KERAS_BACKEND="jax" if framework == "jax" else "tensorflow",
                       TF_CPP_MIN_LOG_LEVEL="3", BENCH_TORCH_THREADS=str(args.torch_threads))
            command = [sys.executable, __file__, "--worker", framework, "--repeats",
                       str(args.repeats), "--batch-sizes", *map(str, args.batch_sizes),
                       "--losses", *args.losses]
            out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
            for row in json.loads(out.stdout.strip().splitlines()[-1]):
                table[(row["loss"], row["batch"], row["framework"])] = row["ms"]
        columns = ["keras-dml TF"] + (["keras-dml JAX"] if args.jax else []) + ["PML torch"]
        print(f"\n## round {round_ + 1}, load average {os.getloadavg()[0]:.2f} at end\n")
        print("| loss | B | " + " | ".join(f"{c} ms" for c in columns) + " |")
        print("| --- | --- |" + " --- |" * len(columns))
        for batch in args.batch_sizes:
            for loss in LOSSES:
                cells = [table.get((loss, batch, c)) for c in columns]
                text = ["—" if v is None else f"{v:.1f}" for v in cells]
                print(f"| {loss} | {batch} | " + " | ".join(text) + " |")


if __name__ == "__main__":
    main()
