"""Step time and negatives per anchor on 1, 2 and 4 replicas, with and without cross-replica mining.

Each replica count runs in a fresh Python process that splits the CPU into
that many logical devices (`tf.config.set_logical_device_configuration`, which
must run before TensorFlow initialises its devices) and trains a small MLP
under `tf.distribute.MirroredStrategy`. The per-replica batch is fixed (weak
scaling), so the global batch grows with the replica count. For `TripletLoss`
(semi-hard mining) and `NTXentLoss`, with `cross_replica=False` (each replica
mines within its own batch) and `True` (within the gathered global batch):

- `ms/step`: median wall time of one compiled training step (forward,
  backward, gradient all-reduce and SGD update), over `--repeats` steps;
- `negatives/anchor`: the mean number of negatives each anchor is compared
  with (other-label samples for the triplet loss, the `2N - 2` other views
  for NT-Xent), counted from the labels of the actual batches.

Logical CPU devices share the machine's cores, so the times show the cost of
the gather and of the larger `(B, N*B)` matrices, not the speed-up of real
accelerators.

    python benchmarks/bench_distributed.py                       # 1, 2, 4 replicas
    python benchmarks/bench_distributed.py --replicas 1 2 --batch 64 --repeats 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

LOSSES = ("TripletLoss", "NTXentLoss")


def worker(replicas: int, batch: int, dim: int, classes: int, repeats: int) -> list[dict]:
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * replicas
    )
    import keras

    import keras_dml

    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
    rows = []
    for loss_name in LOSSES:
        for cross_replica in (False, True):
            rng = np.random.default_rng(0)  # the same batches with and without gathering
            keras.utils.set_random_seed(0)
            with strategy.scope():
                model = keras.Sequential(
                    [keras.Input((dim,)), keras.layers.Dense(256, activation="relu"),
                     keras.layers.Dense(128), keras.layers.UnitNormalization()]
                )
                optimizer = keras.optimizers.SGD(0.01)
                optimizer.build(model.trainable_variables)
                loss = getattr(keras_dml, loss_name)(cross_replica=cross_replica)
            # Per replica: `batch` rows; NT-Xent's rows are batch / 2 inputs x 2 views.
            global_rows = replicas * batch
            x = rng.normal(size=(global_rows, dim)).astype("float32")
            if loss_name == "NTXentLoss":
                inputs = x.reshape(replicas, 2, batch // 2, dim)
                inputs[:, 1] = inputs[:, 0] + 0.1 * rng.normal(size=inputs[:, 1].shape)
                x = inputs.reshape(global_rows, dim)
                labels = np.zeros(global_rows, "int32")
                local = batch - 2
                gathered = global_rows - 2
            else:
                labels = rng.integers(0, classes, size=global_rows).astype("int32")
                per_replica = labels.reshape(replicas, batch)
                local = float(np.mean([
                    np.mean(np.sum(r[:, None] != r[None, :], axis=1)) for r in per_replica
                ]))
                gathered = float(np.mean(np.sum(labels[:, None] != labels[None, :], axis=1)))
            chunks_x = np.split(x, replicas)
            chunks_y = np.split(labels, replicas)
            data_x = strategy.experimental_distribute_values_from_function(
                lambda c, chunks=chunks_x: tf.constant(chunks[c.replica_id_in_sync_group])
            )
            data_y = strategy.experimental_distribute_values_from_function(
                lambda c, chunks=chunks_y: tf.constant(chunks[c.replica_id_in_sync_group])
            )

            def replica_step(xr, yr, model=model, loss=loss, optimizer=optimizer):
                with tf.GradientTape() as tape:
                    value = loss(yr, model(xr, training=True))
                grads = tape.gradient(value, model.trainable_variables)
                optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
                return value

            @tf.function
            def train_step(xr, yr, replica_step=replica_step):
                values = strategy.run(replica_step, args=(xr, yr))
                return strategy.reduce("SUM", values, axis=None)

            value = train_step(data_x, data_y)  # trace and warm up
            if not np.isfinite(value.numpy()):
                raise RuntimeError(f"{loss_name} gave a non-finite loss")
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                train_step(data_x, data_y).numpy()
                times.append(time.perf_counter() - start)
            rows.append({
                "loss": loss_name,
                "replicas": replicas,
                "cross_replica": cross_replica,
                "global_batch": global_rows,
                "ms": 1000 * float(np.median(times)),
                "negatives": gathered if cross_replica and replicas > 1 else local,
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=128, help="rows per replica (even)")
    parser.add_argument("--dim", type=int, default=64, help="input features")
    parser.add_argument("--classes", type=int, default=16, help="label classes (TripletLoss)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch % 2:
        parser.error("--batch must be even (NT-Xent stacks two views).")

    if args.worker is not None:
        rows = worker(args.worker, args.batch, args.dim, args.classes, args.repeats)
        print("ROWS " + json.dumps(rows))
        return

    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    rows = []
    for replicas in args.replicas:
        command = [sys.executable, __file__, "--worker", str(replicas), "--batch",
                   str(args.batch), "--dim", str(args.dim), "--classes", str(args.classes),
                   "--repeats", str(args.repeats)]
        result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        line = [x for x in result.stdout.splitlines() if x.startswith("ROWS ")]
        if result.returncode != 0 or not line:
            sys.exit(f"worker with {replicas} replicas failed:\n{result.stderr[-3000:]}")
        rows.extend(json.loads(line[0][5:]))

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; "
          f"{args.batch} rows per replica, D_in={args.dim}, 128-d embeddings, "
          f"median of {args.repeats} steps")
    print("| loss | replicas | global batch | cross_replica | ms/step | negatives/anchor |")
    print("| --- | ---: | ---: | --- | ---: | ---: |")
    for row in rows:
        print(f"| {row['loss']} | {row['replicas']} | {row['global_batch']} | "
              f"{row['cross_replica']} | {row['ms']:.1f} | {row['negatives']:.1f} |")


if __name__ == "__main__":
    main()
