"""Losses with `miner=` under `tf.distribute`, run in a fresh interpreter by a test.

Splits the CPU into 2 logical devices (before TensorFlow initialises them,
hence the separate process), trains the same small model a few steps with each
loss + miner under `MirroredStrategy` and on one device with the same global
batches, and prints `RESULTS <json>`: per case, the largest relative
difference of the logged losses and of the trained weights. The miners mine
the gathered global batch (`cross_replica=True`), so both must agree. Not
collected by pytest (no `test_` prefix); tests/test_miner_replicas.py runs it.
"""

from __future__ import annotations

import json

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import keras_dml  # noqa: E402
from keras_dml import miners, reducers  # noqa: E402

GLOBAL_BATCH, STEPS = 16, 4

CASES = {
    "contrastive+pair_margin": lambda: keras_dml.ContrastiveLoss(
        neg_margin=2.0, miner=miners.PairMarginMiner(0.5, 1.5),
        reducer=reducers.AvgNonZeroReducer()),
    "triplet+triplet_margin": lambda: keras_dml.TripletLoss(
        margin=0.5, miner=miners.TripletMarginMiner(0.5, "semihard")),
    "multi_similarity+miner": lambda: keras_dml.MultiSimilarityLoss(
        miner=miners.MultiSimilarityMiner(0.1)),
    "margin+batch_hard": lambda: keras_dml.MarginLoss(miner=miners.BatchHardMiner()),
    "generalized_lifted+pair_margin": lambda: keras_dml.GeneralizedLiftedStructureLoss(
        miner=miners.PairMarginMiner(0.5, 1.5)),
    # Needs each reference row's own (mined) negatives: gathered from the other replica.
    "lifted_struct+pair_margin": lambda: keras_dml.LiftedStructLoss(
        miner=miners.PairMarginMiner(0.5, 1.2)),
}

rng = np.random.default_rng(0)
x = rng.normal(size=(GLOBAL_BATCH * STEPS, 7)).astype("float32")
y = rng.integers(0, 4, GLOBAL_BATCH * STEPS).astype("int32")


def train(loss_factory, strategy=None):
    def build():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((7,)), keras.layers.Dense(8, "tanh"),
                                  keras.layers.Dense(4), keras.layers.UnitNormalization()])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss_factory())
        return model

    if strategy is None:
        model = build()
    else:
        with strategy.scope():
            model = build()
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    history = model.fit(data, epochs=1, verbose=0).history["loss"]
    return history, [np.asarray(w) for w in model.get_weights()]


def relative(a, b):
    a, b = np.asarray(a, "float64"), np.asarray(b, "float64")
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
results = {}
for name, factory in CASES.items():
    single_history, single_weights = train(factory)
    mirrored_history, mirrored_weights = train(factory, strategy)
    results[name] = {
        "loss": relative(mirrored_history, single_history),
        "weights": max(relative(a, b) for a, b in zip(mirrored_weights, single_weights,
                                                       strict=True)),
        "nonzero_loss": bool(np.all(np.asarray(single_history) != 0)),
    }
print("RESULTS " + json.dumps(results))
