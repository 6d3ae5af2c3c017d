"""Per-device memory and step time of an ArcFace head sharded over devices (Partial FC).

One training step of the head alone: L2-normalised embeddings `(B, D)` from
the batch, centres `(D, C)`, `keras_dml.models.margin_softmax_cross_entropy`
(ArcFace, s = 64, m = 0.5), the gradients of the centres and of the
embeddings, and an SGD update of the centres (the input buffer donated), all
in one `jax.jit`. For each C, D and sample rate it runs

- sharded: the centres laid out `(None, "model")` over S devices of a
  `keras.distribution.ModelParallel` mesh `(1, S)`, the loss shard-wise;
- one device: the same step with the centres on one device.

Reported per device, from XLA's compiled program
(`compiled.memory_analysis()`, the SPMD program is the per-device program):
argument bytes (the centres' shard and the batch), temporary bytes
(logits, exponentials, gradients before the update) and output bytes; and
the median wall time of `--repeats` steps after one warm-up step.

The devices are virtual CPU devices (`--xla_force_host_platform_device_count`)
that share this machine's cores and memory: the memory columns are what the
program asks of each device, the times are not a speed-up measurement (S
virtual devices run on the same cores as one).

    python benchmarks/bench_sharded_head.py                  # C = 100k, 1M; D = 128, 512
    python benchmarks/bench_sharded_head.py --classes 100000 --dims 128 --repeats 3

Every configuration is compiled first for the centres' shape alone; one whose
devices would need more than `--max-host-gb` of this host's memory in all
(argument + temporary + output bytes of the per-device program, times the
devices) is reported as not run, with that estimate.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time


def worker(args) -> list[dict]:
    import jax
    import keras
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from keras_dml.heads import ArcFace
    from keras_dml.models import margin_softmax_cross_entropy

    rows = []
    for num_classes in args.classes:
        for dim in args.dims:
            for sample_rate in args.sample_rates:
                for shards in args.device_counts or (args.shards, 1):
                    if shards == 1 and sample_rate < 1.0 and not args.single_device_sampling:
                        continue
                    row = {"classes": num_classes, "dim": dim, "sample_rate": sample_rate,
                           "devices": shards, "batch": args.batch}
                    try:
                        row.update(run_one(jax, keras, np, NamedSharding, PartitionSpec,
                                           ArcFace, margin_softmax_cross_entropy, num_classes,
                                           dim, sample_rate, shards, args))
                    except Exception as error:  # noqa: BLE001 - recorded in the table
                        row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
                    print("ROW " + json.dumps(row), flush=True)
                    rows.append(row)
                    gc.collect()
    return rows


def run_one(jax, keras, np, NamedSharding, PartitionSpec, ArcFace, loss_fn, num_classes, dim,
            sample_rate, shards, args) -> dict:
    devices = jax.devices()[:shards]
    mesh = keras.distribution.DeviceMesh((1, shards), ["batch", "model"], devices)
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=keras.distribution.LayoutMap(mesh),
                                         batch_dim_name="batch"))
    kernel_sharding = NamedSharding(mesh.backend_mesh, PartitionSpec(None, "model"))
    replicated = NamedSharding(mesh.backend_mesh, PartitionSpec())
    head = ArcFace(num_classes, scale=64.0, margin=0.5)
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.normal(size=(args.batch, dim)).astype("float32"), replicated)
    y = jax.device_put(rng.integers(0, num_classes, args.batch).astype("int32"), replicated)
    seed = keras.random.SeedGenerator(0)

    def step(w, v, labels, seed_state):
        def loss(w_, v_):
            return keras.ops.mean(loss_fn(head, v_, labels, kernel=w_, num_shards=shards,
                                          sample_rate=sample_rate, seed=seed_state))
        value, (grad_w, grad_v) = jax.value_and_grad(loss, argnums=(0, 1))(w, v)
        return w - 0.1 * grad_w, value, grad_v

    jitted = jax.jit(step, donate_argnums=(0,), out_shardings=(kernel_sharding, None, None))
    # Compiled for the kernel's shape alone: the memory it needs is known before any is used.
    abstract_kernel = jax.ShapeDtypeStruct((dim, num_classes), "float32",
                                           sharding=kernel_sharding)
    start = time.perf_counter()
    compiled = jitted.lower(abstract_kernel, x, y, seed.state.value).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    per_device = (memory.argument_size_in_bytes + memory.temp_size_in_bytes
                  + memory.output_size_in_bytes)
    # Virtual devices all live in this host's memory.
    if shards * per_device > args.max_host_gb * 1024.0 ** 3:
        keras.distribution.set_distribution(None)
        return {"error": f"not run: needs {shards * per_device / 1024.0 ** 3:.1f} GB of host "
                         f"memory for {shards} device(s) ({per_device / 1024.0 ** 2:.0f} MB "
                         f"each), over --max-host-gb {args.max_host_gb}"}
    kernel = jax.jit(lambda key: jax.random.normal(key, (dim, num_classes)) * 0.01,
                     out_shardings=kernel_sharding)(jax.random.PRNGKey(0))
    times = []
    for i in range(args.repeats + 1):
        start = time.perf_counter()
        kernel, value, grad_v = compiled(kernel, x, y, seed.state.value)
        jax.block_until_ready((kernel, value, grad_v))
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - start)
    mb = 1024.0 ** 2
    result = {
        "argument_mb": memory.argument_size_in_bytes / mb,
        "temp_mb": memory.temp_size_in_bytes / mb,
        "output_mb": memory.output_size_in_bytes / mb,
        "full_logits_mb": args.batch * num_classes * 4 / mb,
        "compile_s": compile_s,
        "ms_per_step": 1000.0 * float(np.median(times)),
        "loss": float(value),
        "kernel_shard_shape": list(kernel.addressable_shards[0].data.shape),
    }
    del kernel, value, grad_v, compiled
    keras.distribution.set_distribution(None)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--sample-rates", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device-counts", type=int, nargs="+", default=None,
                        help="device counts to measure (default: --shards and 1)")
    parser.add_argument("--max-host-gb", type=float, default=8.0,
                        help="skip a configuration whose devices need more host memory")
    parser.add_argument("--single-device-sampling", action="store_true",
                        help="also time sampling on one device")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    # The device count is fixed when JAX starts: run the measurements in a fresh process.
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={args.shards}")
    argv = list(sys.argv[1:] if argv is None else argv)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"{args.shards} virtual CPU devices; batch {args.batch}; python "
          f"{platform.python_version()}", flush=True)
    print("| C | D | sample rate | devices | argument MB/device | temp MB/device | "
          "output MB/device | full B×C logits MB | ms/step | compile s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    # Rows are printed as they come: a configuration that does not fit still leaves the others.
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", *argv],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rows = 0
    for line in proc.stdout:
        if not line.startswith("ROW "):
            continue
        r = json.loads(line[4:])
        rows += 1
        if "error" in r:
            print(f"| {r['classes']:,} | {r['dim']} | {r['sample_rate']} | {r['devices']} | "
                  f"{r['error']} | | | | | |", flush=True)
            continue
        print(f"| {r['classes']:,} | {r['dim']} | {r['sample_rate']} | {r['devices']} | "
              f"{r['argument_mb']:.1f} | {r['temp_mb']:.1f} | {r['output_mb']:.1f} | "
              f"{r['full_logits_mb']:.1f} | {r['ms_per_step']:.0f} | {r['compile_s']:.1f} |",
              flush=True)
    stderr = proc.stderr.read()
    proc.wait()
    if proc.returncode != 0:
        print(f"(the worker exited with {proc.returncode} after {rows} rows)")
        print(stderr[-3000:], file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
