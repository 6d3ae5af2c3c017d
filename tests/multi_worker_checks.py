"""One TensorFlow worker of tests/test_multi_worker.py: MultiWorkerMirroredStrategy vs one device.

Usage: python multi_worker_checks.py TASK_INDEX PORT_0 PORT_1 ...

Sets `TF_CONFIG` for a localhost cluster (one worker per port), then, for
each model of `examples/multihost_jax.py` (TripletLoss, MultiSimilarityLoss,
MarginModel + ArcFace, S2SD), trains it with `fit` under the strategy after
`keras_dml.distributed.prepare_multi_worker_fit`, from a global `tf.data`
dataset sharded by data, and trains a copy with the same initial weights on
one device (no strategy) on the same global batches. Prints one line
`RESULTS {json}`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

index = int(sys.argv[1])
ports = sys.argv[2:]
os.environ["TF_CONFIG"] = json.dumps({
    "cluster": {"worker": [f"localhost:{p}" for p in ports]},
    "task": {"type": "worker", "index": index},
})
os.environ["KERAS_BACKEND"] = "tensorflow"

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy()  # before any other TF op

from keras_dml import distributed  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location(
    "multihost_example", os.path.join(ROOT, "examples", "multihost_jax.py"))
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)

GLOBAL_BATCH = 64
EPOCHS = 2
x, y = example.load_data(256, GLOBAL_BATCH)


def global_batches():
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH, drop_remainder=True)


options = tf.data.Options()
options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA

results = {"num_replicas": strategy.num_replicas_in_sync, "models": {}}
for name in example.MODELS:
    with strategy.scope():
        model = example.make_model(name)
    initial = [np.array(w) for w in model.get_weights()]
    distributed.prepare_multi_worker_fit(model, x[:8], y[:8])
    history = model.fit(global_batches().with_options(options), epochs=EPOCHS,
                        verbose=0).history

    reference = example.make_model(name)
    reference.set_weights(initial)
    reference_history = reference.fit(global_batches(), epochs=EPOCHS, verbose=0).history

    got, expected = model.get_weights(), reference.get_weights()
    results["models"][name] = {
        "loss": [float(v) for v in history["loss"]],
        "reference_loss": [float(v) for v in reference_history["loss"]],
        "weight_error": max(float(np.abs(g - e).max()) for g, e in zip(got, expected,
                                                                        strict=True)),
        "moved": max(float(np.abs(e - i).max()) for e, i in zip(expected, initial,
                                                                 strict=True)),
    }
print("RESULTS " + json.dumps(results), flush=True)

# The upstream bug (keras-team/keras#20585) this workaround exists for: a plain
# `fit` under the strategy. Both workers fail the same way before any collective.
with strategy.scope():
    plain = example.make_model("triplet")
try:
    plain.fit(global_batches().with_options(options), epochs=1, verbose=0)
    plain_fit = {"error": None}
except Exception as error:  # noqa: BLE001 - recorded, checked by the test
    plain_fit = {"error": type(error).__name__, "message": str(error)[:300]}
print("PLAIN_FIT " + json.dumps(plain_fit), flush=True)
