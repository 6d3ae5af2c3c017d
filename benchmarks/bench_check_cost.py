"""Cost of the eager NaN/Inf check of a metric loss's embeddings, per training step.

Eagerly (the torch backend always; TensorFlow and JAX outside `tf.function` /
`jit`) `validate_inputs` checks the embeddings' values on every call. Three
versions of that check are timed inside the same process, in turn:

- `host copy`: the check before issue 17's change, the embeddings converted to
  a NumPy array (`concrete_value`) and `np.isfinite` run on the host;
- `all`: one `ops.all(ops.isfinite(x))` where `x` lives, only its scalar read
  back;
- `sum`: today's `keras_dml._checks.all_finite`: `ops.isfinite(ops.sum(x))`
  where `x` lives, only its scalar read back (the elementwise check only
  when that sum is not finite);
- `none`: no check at all (the floor).

For each, the table gives the median time of one training step of the loss
(forward + backward w.r.t. the embeddings, eager) and of the check alone on
the same `(B, D)` tensor. Each backend runs in its own process.

    python benchmarks/bench_check_cost.py                       # torch and TF eager, B = 256, 1024
    python benchmarks/bench_check_cost.py --backends torch --losses TripletLoss
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

VARIANTS = ("host copy", "all", "sum", "none")


def _checks_by_variant():
    import numpy as np
    from keras import ops

    from keras_dml import _checks

    def host_copy(x):
        value = _checks.concrete_value(x)
        return None if value is None else bool(np.all(np.isfinite(value)))

    def fused_all(x):
        return _checks._holds_everywhere(x, ops.isfinite)

    return {"host copy": host_copy, "all": fused_all, "sum": _checks.all_finite,
            "none": lambda x: True}


def worker(backend: str, spec: str, batch: int, dim: int, repeats: int, classes: int) -> list:
    import numpy as np

    import keras_dml
    from keras_dml.losses import base

    checks = _checks_by_variant()
    loss = getattr(keras_dml, spec)()
    rng = np.random.default_rng(0)
    labels_np = rng.integers(0, classes, size=batch).astype("int32")
    x_np = rng.normal(size=(batch, dim)).astype("float32")

    if backend == "torch":
        import torch

        labels = torch.tensor(labels_np)
        x = torch.tensor(x_np, requires_grad=True)
        plain = torch.tensor(x_np)

        def step():
            x.grad = None
            loss(labels, x).backward()
            return x.grad
    else:
        import tensorflow as tf

        labels = tf.constant(labels_np)
        x = tf.Variable(x_np)
        plain = tf.constant(x_np)

        def step():
            with tf.GradientTape() as tape:
                value = loss(labels, x)
            return tape.gradient(value, x).numpy()

    step_times = {name: [] for name in VARIANTS}
    check_times = {name: [] for name in VARIANTS}
    for name in VARIANTS:  # warm-up, and each version must accept finite values
        base.all_finite = checks[name]
        step()
        if checks[name](plain) is not True:
            raise RuntimeError(f"{name} did not find the finite embeddings finite")
    for _ in range(repeats):  # in turn, so that load changes hit every version alike
        for name in VARIANTS:
            base.all_finite = checks[name]
            start = time.perf_counter()
            step()
            step_times[name].append(time.perf_counter() - start)
            for _ in range(10):
                start = time.perf_counter()
                checks[name](plain)
                check_times[name].append(time.perf_counter() - start)
    return [
        {
            "backend": backend,
            "loss": spec,
            "batch": batch,
            "variant": name,
            "step_ms": 1000 * float(np.median(step_times[name])),
            "check_us": 1e6 * float(np.median(check_times[name])),
        }
        for name in VARIANTS
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="*", default=["torch", "tensorflow"])
    parser.add_argument("--losses", nargs="*", default=["ContrastiveLoss", "TripletLoss"])
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[256, 1024])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--worker", nargs=3, metavar=("BACKEND", "LOSS", "BATCH"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        backend, spec, batch = args.worker[0], args.worker[1], int(args.worker[2])
        rows = worker(backend, spec, batch, args.dim, args.repeats, args.classes)
        print(json.dumps(rows))
        return

    machine = f"{platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}"
    print(f"# machine: {machine}")
    print(f"# D={args.dim}, {args.classes} classes, eager, median of {args.repeats} steps "
          "(versions in turn) and of 10x as many checks alone")
    print(f"| {'backend':<10} | {'loss':<16} | {'B':>5} | {'check':<9} | {'step ms':>8} | "
          f"{'check alone us':>14} |")
    print(f"|{'-' * 12}|{'-' * 18}|{'-' * 7}|{'-' * 11}|{'-' * 10}|{'-' * 16}|")
    for backend in args.backends:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND=backend)
        for spec in args.losses:
            for batch in args.batch_sizes:
                cmd = [sys.executable, __file__, "--worker", backend, spec, str(batch),
                       "--dim", str(args.dim), "--repeats", str(args.repeats),
                       "--classes", str(args.classes)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
                    print(f"| {backend:<10} | {spec:<16} | {batch:>5} | failed: {tail[0][:60]}")
                    continue
                for row in json.loads(proc.stdout.strip().splitlines()[-1]):
                    print(f"| {backend:<10} | {spec:<16} | {batch:>5} | {row['variant']:<9} | "
                          f"{row['step_ms']:>8.2f} | {row['check_us']:>14.1f} |", flush=True)


if __name__ == "__main__":
    main()
