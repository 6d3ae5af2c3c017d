"""Train keras-dml models data-parallel over N processes with Keras 3's JAX engine.

    python examples/multihost_jax.py --num-processes 2 --out runs/multihost

starts 2 worker processes on this machine (`keras_dml.multihost.launch_local`,
coordinator on a free localhost port, gloo collectives on CPU). Each worker
calls `keras_dml.multihost.initialize()`, sets
`keras.distribution.DataParallel()` and trains, on digits, one model of each
kind: `TripletLoss` and `MultiSimilarityLoss` on a small MLP, a
`MarginModel` with `ArcFace`, and `S2SD`. XLA partitions each step over the
processes, so the losses see the whole global batch without any gather:
training gives the weights of one process on the same global batches
(`tests/test_multihost.py` checks exactly this, to 1e-5).

Two ways to feed the workers (`--input`):

- `presharded`: each process passes its own rows (for every global batch of
  G rows, its G / N slice) as NumPy arrays with `batch_size=G / N`, with
  `distribution.auto_shard_dataset = False`;
- `dataset`: every process builds the same `tf.data.Dataset` batched with the
  global batch G; Keras rebatches it to G / N and keeps each process's shard.

`--num-processes 1` trains in this process without any distribution: the
single-process reference. Weights are written to
`OUT/p<process id>/<input>_<model>.npz`, losses to `OUT/p<id>/history.json`.
On several machines, run the script on each with the
`KERAS_DISTRIBUTION_*` variables set (see `keras_dml.multihost`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

MODELS = ("triplet", "multi_similarity", "arcface", "s2sd")
INPUTS = ("presharded", "dataset")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--input", default="both", choices=(*INPUTS, "both"))
    parser.add_argument("--dataset-models", default=None,
                        help="models trained from the tf.data input (default: --models)")
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--samples", type=int, default=256,
                        help="digits used for training (whole global batches)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", default="runs/multihost")
    return parser.parse_args(argv)


def make_model(name: str, seed: int = 7):
    """A freshly initialised, compiled model; the same weights in every process (seeded)."""
    import keras

    import keras_dml
    from keras_dml.heads import ArcFace
    from keras_dml.models import MarginModel
    from keras_dml.models.s2sd import S2SD

    keras.utils.set_random_seed(seed)

    def mlp(width):
        return keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"),
                                 keras.layers.Dense(width)])

    optimizer = keras.optimizers.SGD(0.05)
    if name == "triplet":
        model = mlp(16)
        model.compile(optimizer=optimizer, loss=keras_dml.TripletLoss())
    elif name == "multi_similarity":
        model = mlp(16)
        model.compile(optimizer=optimizer, loss=keras_dml.MultiSimilarityLoss())
    elif name == "arcface":
        model = MarginModel(mlp(16), ArcFace(10, scale=16.0, margin=0.3))
        model.compile(optimizer=optimizer)
    elif name == "s2sd":
        backbone = keras.Sequential([keras.Input((64,)),
                                     keras.layers.Dense(64, activation="relu")])
        model = S2SD(backbone, embedding_dim=16, target_dims=(32,), temperature=1.0,
                     distillation_weight=1.0, feature_distillation=False)
        model.compile(optimizer=optimizer, loss=keras_dml.MultiSimilarityLoss())
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    return model


def load_data(samples: int, global_batch: int):
    """The first `samples` digits (features in [0, 1]), cut to whole global batches."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    n = min(samples, len(x)) // global_batch * global_batch
    return (x[:n] / 16.0).astype("float32"), y[:n].astype("int32")


def process_rows(num_rows: int, global_batch: int, process_id: int, num_processes: int):
    """Indices of this process's rows: its slice of every global batch, in order."""
    import numpy as np

    local = global_batch // num_processes
    starts = np.arange(0, num_rows, global_batch)
    return (starts[:, None] + process_id * local + np.arange(local)[None, :]).reshape(-1)


def train(model, x, y, input_kind, args, distribution, process_id, num_processes):
    if input_kind == "dataset":
        import tensorflow as tf

        if distribution is not None:
            distribution.auto_shard_dataset = True
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.global_batch,
                                                              drop_remainder=True)
        return model.fit(ds, epochs=args.epochs, verbose=0).history
    if distribution is not None:
        distribution.auto_shard_dataset = False
    rows = process_rows(len(x), args.global_batch, process_id, num_processes)
    return model.fit(x[rows], y[rows], batch_size=args.global_batch // num_processes,
                     epochs=args.epochs, shuffle=False, verbose=0).history


def run_worker(args):
    import numpy as np

    from keras_dml import multihost

    process_id, num_processes = multihost.initialize()
    import keras

    if args.global_batch % num_processes:
        raise ValueError("--global-batch must be a multiple of the number of processes")
    distribution = None
    if num_processes > 1:
        distribution = keras.distribution.DataParallel()
        keras.distribution.set_distribution(distribution)
    x, y = load_data(args.samples, args.global_batch)
    out = os.path.join(args.out, f"p{process_id}")
    os.makedirs(out, exist_ok=True)
    inputs = INPUTS if args.input == "both" else (args.input,)
    history = {}
    for input_kind in inputs:
        names = args.models if input_kind == "presharded" else (args.dataset_models
                                                                 or args.models)
        for name in names.split(","):
            model = make_model(name)
            logs = train(model, x, y, input_kind, args, distribution, process_id,
                         num_processes)
            history[f"{input_kind}_{name}"] = [float(v) for v in logs["loss"]]
            weights = [np.asarray(keras.ops.convert_to_numpy(w)) for w in model.weights]
            np.savez(os.path.join(out, f"{input_kind}_{name}.npz"), *weights)
            if process_id == 0:
                print(f"{input_kind:>10} {name:>16}: loss per epoch "
                      + " ".join(f"{v:.4f}" for v in history[f"{input_kind}_{name}"]),
                      flush=True)
    with open(os.path.join(out, "history.json"), "w") as f:
        json.dump({"num_processes": num_processes, "history": history}, f)
    return history


def main(argv=None):
    args = parse_args(argv)
    from keras_dml import multihost

    if args.num_processes > 1 and not multihost.is_worker():
        # The launcher: start N copies of this script as one cluster.
        argv = list(sys.argv[1:] if argv is None else argv)
        results = multihost.launch_local([sys.executable, os.path.abspath(__file__), *argv],
                                         args.num_processes, timeout=args.timeout)
        for r in results:
            sys.stdout.write(r.stdout)
            if r.returncode != 0:
                sys.stderr.write(f"process {r.process_id} exited with {r.returncode}:\n"
                                 f"{r.stderr[-3000:]}\n")
        return 0 if all(r.returncode == 0 for r in results) else 1
    run_worker(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
