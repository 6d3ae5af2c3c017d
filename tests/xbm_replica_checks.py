"""Cross-batch memory under `tf.distribute`, run in a fresh interpreter by tests/test_xbm.py.

Splits the CPU into 2 logical devices (before TensorFlow initialises them,
hence the separate process), trains an `XBMModel` for a few steps under
`MirroredStrategy` and the same model on one device with the same global
batches, and prints `RESULTS <json>` with the differences: memory contents,
logged losses and trained weights. Not collected by pytest (no `test_` prefix).
"""

from __future__ import annotations

import json

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import keras_dml  # noqa: E402
from keras_dml.models import XBMModel  # noqa: E402

GLOBAL_BATCH, STEPS, MEMORY = 16, 6, 40  # 96 writes into 40 slots: wraps twice


def build():
    keras.utils.set_random_seed(0)
    backbone = keras.Sequential(
        [keras.Input((7,)), keras.layers.Dense(8, "tanh"), keras.layers.Dense(4)]
    )
    model = XBMModel(backbone, memory_size=MEMORY)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras_dml.ContrastiveLoss())
    return model


rng = np.random.default_rng(0)
x = rng.normal(size=(GLOBAL_BATCH * STEPS, 7)).astype("float32")
y = rng.integers(0, 5, GLOBAL_BATCH * STEPS).astype("int32")


def dataset():
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)


single = build()
single_history = single.fit(dataset(), epochs=1, verbose=0).history["loss"]

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    mirrored = build()
mirrored_history = mirrored.fit(dataset(), epochs=1, verbose=0).history["loss"]


def values(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable))


def relative(a, b):
    a, b = np.asarray(a, "float64"), np.asarray(b, "float64")
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


results = {
    "memory_labels_equal": bool(
        np.array_equal(values(mirrored.memory.labels), values(single.memory.labels))
    ),
    "memory_pointer_equal": int(values(mirrored.memory.pointer))
    == int(values(single.memory.pointer))
    == (GLOBAL_BATCH * STEPS) % MEMORY,
    "memory_embeddings": relative(values(mirrored.memory.embeddings),
                                  values(single.memory.embeddings)),
    "loss": relative(mirrored_history, single_history),
    "weights": max(
        relative(values(a), values(b))
        for a, b in zip(mirrored.backbone.weights, single.backbone.weights, strict=True)
    ),
}
print("RESULTS " + json.dumps(results))
