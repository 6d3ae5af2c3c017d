"""Regenerates tfa_triplet_golden.npz from the real tensorflow-addons 0.23.

Not run by the test suite (addons needs TF <= 2.15 and Keras 2). To refresh:

    python3 -m venv /tmp/tfa
    /tmp/tfa/bin/pip install tensorflow-cpu==2.15.1 tensorflow-addons==0.23.0
    /tmp/tfa/bin/python tests/data/make_tfa_golden.py
"""

import pathlib

import numpy as np
import tensorflow as tf
import tensorflow_addons as tfa

rng = np.random.default_rng(2447)
records = {}
case = 0
for n, dim, classes in [(8, 4, 2), (16, 8, 4), (32, 16, 5), (64, 32, 10), (48, 8, 3)]:
    for metric in ("L2", "squared-L2", "angular"):
        labels = rng.integers(0, classes, size=n).astype("int32")
        x = rng.normal(size=(n, dim)).astype("float32")
        if case % 2:
            x /= np.linalg.norm(x, axis=1, keepdims=True)
        margin = float(rng.choice([1.0, 0.5, 0.2]))
        semi = tfa.losses.TripletSemiHardLoss(margin=margin, distance_metric=metric)
        hard = tfa.losses.TripletHardLoss(margin=margin, distance_metric=metric)
        soft = tfa.losses.TripletHardLoss(soft=True, distance_metric=metric)
        with tf.GradientTape(persistent=True) as tape:
            v = tf.constant(x)
            tape.watch(v)
            values = [semi(labels, v), hard(labels, v), soft(labels, v)]
        grads = [tape.gradient(val, v).numpy() for val in values]
        records[f"case{case}_labels"] = labels
        records[f"case{case}_x"] = x
        records[f"case{case}_meta"] = np.array([metric, str(margin)])
        records[f"case{case}_values"] = np.array([float(val) for val in values], "float64")
        records[f"case{case}_grads"] = np.stack(grads)
        case += 1
out = pathlib.Path(__file__).with_name("tfa_triplet_golden.npz")
np.savez_compressed(out, **records)
print(f"wrote {case} cases to {out}")
