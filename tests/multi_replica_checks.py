"""Multi-replica checks run in a fresh interpreter by tests/test_distributed.py.

`python tests/multi_replica_checks.py N` splits the CPU into N logical devices
(which must happen before TensorFlow initialises them, hence the separate
process), runs every check under `tf.distribute.MirroredStrategy` and prints
one line `RESULTS <json>` with the measured differences; the test asserts on
them. Not collected by pytest (no `test_` prefix).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tensorflow as tf

NUM_REPLICAS = int(sys.argv[1])
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_REPLICAS
)

import keras  # noqa: E402

import keras_dml  # noqa: E402
from keras_dml import heads  # noqa: E402
from keras_dml.models import MarginModel  # noqa: E402

STRATEGY = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(NUM_REPLICAS)])
assert STRATEGY.num_replicas_in_sync == NUM_REPLICAS
# Unequal per-replica batches exercise the row offsets of the gathered batch.
SIZES = {2: [10, 6], 4: [6, 6, 8, 4]}[NUM_REPLICAS]
D_IN = 7
RESULTS: dict = {}


def flat(arrays) -> np.ndarray:
    if not isinstance(arrays, (list, tuple)):
        arrays = [arrays]
    return np.concatenate([np.asarray(a, "float64").reshape(-1) for a in arrays])


def relative_error(a, b) -> float:
    """Largest deviation relative to the largest entry of `b` (lists are flattened first).

    Per-variable ratios would blow up on variables whose gradient is 0 up to
    rounding (the last bias under a translation-invariant distance).
    """
    a, b = flat(a), flat(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def build(out=4, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((D_IN,)), keras.layers.Dense(8, "tanh"), keras.layers.Dense(out)]
    )


def per_replica(chunks):
    return STRATEGY.experimental_distribute_values_from_function(
        lambda context: tf.constant(chunks[context.replica_id_in_sync_group])
    )


def split(values):
    bounds = np.cumsum([0, *SIZES])
    return [values[bounds[i] : bounds[i + 1]] for i in range(NUM_REPLICAS)]


# -- 1. loss values and gradients against one device on the concatenated batch --------

rng = np.random.default_rng(0)
x = rng.normal(size=(sum(SIZES), D_IN)).astype("float32")
y = (rng.permutation(sum(SIZES)) % 4).astype("int32")
# NT-Xent: each replica stacks its two views; one device stacks all first views, then
# all second views (the order of the rows does not change the loss).
views = [(c, c + 0.3 * rng.normal(size=c.shape).astype("float32")) for c in split(x)]
x_views_replicas = [np.concatenate(v) for v in views]
x_views_global = np.concatenate([np.concatenate([v[0] for v in views]),
                                 np.concatenate([v[1] for v in views])])

LOSSES = {
    "triplet_semi_hard": keras_dml.TripletLoss(),
    "triplet_hard_cosine": keras_dml.TripletLoss(negative_mining="hard", distance="cosine"),
    "triplet_all_soft": keras_dml.TripletLoss(negative_mining="all", soft_margin=True),
    "triplet_all_hard_positive": keras_dml.TripletLoss(
        negative_mining="all", positive_mining="hard", distance="squared_euclidean"
    ),
    "tfa_semi_hard": keras_dml.TripletSemiHardLoss(),
    "tfa_hard_angular": keras_dml.TripletHardLoss(distance_metric="angular"),
    "contrastive": keras_dml.ContrastiveLoss(neg_margin=2.0),
    "multi_similarity": keras_dml.MultiSimilarityLoss(),
    "circle": keras_dml.CircleLoss(gamma=32.0),
    "lifted_struct": keras_dml.LiftedStructLoss(),
    "npairs": keras_dml.NPairsLoss(),
    "supcon": keras_dml.SupConLoss(temperature=0.5),
    "nt_xent": keras_dml.NTXentLoss(temperature=0.5),
    "quadruplet": keras_dml.QuadrupletLoss(pair_margin=0.5),
}

with STRATEGY.scope():
    distributed_model = build()
single_model = build()
single_model.set_weights(distributed_model.get_weights())

# On 4 replicas only (the 2-replica run checks the scaling and the heads instead): the
# same code with more, unequal shards. Tracing every loss once per replica was the slow
# part (~65 of the script's ~120 s), so most losses run the replicas eagerly (each in
# its own thread, the collectives as in a graph); these two, and the fits below, are
# traced as `fit` traces them.
TRACED = ("triplet_semi_hard", "nt_xent")
for name, loss in LOSSES.items() if NUM_REPLICAS == 4 else ():
    if name == "nt_xent":
        x_replicas, x_global = x_views_replicas, x_views_global
        y_replicas = [np.zeros(len(c), "int32") for c in x_replicas]
        y_global = np.zeros(len(x_global), "int32")
    else:
        x_replicas, x_global, y_replicas, y_global = split(x), x, split(y), y

    with tf.GradientTape() as tape:
        single_value = loss(y_global, single_model(x_global))
    single_grads = tape.gradient(single_value, single_model.trainable_variables)

    def replica_step(xr, yr, loss=loss):
        with tf.GradientTape() as tape:
            value = loss(yr, distributed_model(xr))
        return value, tape.gradient(value, distributed_model.trainable_variables)

    def run(xr, yr, replica_step=replica_step):
        values, grads = STRATEGY.run(replica_step, args=(xr, yr))
        # Keras sums the replicas' gradients; the loss is each replica's share.
        summed = [STRATEGY.reduce("SUM", g, axis=None) for g in grads]
        return STRATEGY.experimental_local_results(values), summed

    if name in TRACED:
        run = tf.function(run)

    values, grads = run(per_replica(x_replicas), per_replica(y_replicas))
    # Every replica returns the global-batch loss divided by the number of replicas.
    value_error = max(
        relative_error(NUM_REPLICAS * v.numpy(), single_value.numpy()) for v in values
    )
    grad_error = relative_error([g.numpy() for g in grads], [g.numpy() for g in single_grads])
    RESULTS.setdefault("losses", {})[name] = {
        "value": float(single_value.numpy()),
        "value_error": value_error,
        "grad_error": grad_error,
        "grad_norm": float(sum(np.sum(s.numpy() ** 2) for s in single_grads) ** 0.5),
    }

# -- 2. a short fit under the strategy equals a single-device fit on the global batch ---

fx = rng.normal(size=(64, D_IN)).astype("float32")
fy = (np.arange(64) % 4).astype("int32")
for name, make_loss in (
    ("triplet_semi_hard", lambda: keras_dml.TripletLoss(margin=0.5)),
    ("multi_similarity", lambda: keras_dml.MultiSimilarityLoss()),
):
    with STRATEGY.scope():
        model = build(seed=1)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=make_loss())
    reference = build(seed=1)
    reference.compile(optimizer=keras.optimizers.SGD(0.1), loss=make_loss())
    reference.set_weights(model.get_weights())
    start = [w.copy() for w in model.get_weights()]
    history = model.fit(fx, fy, batch_size=32, epochs=2, shuffle=False, verbose=0).history
    reference_history = reference.fit(
        fx, fy, batch_size=32, epochs=2, shuffle=False, verbose=0
    ).history
    RESULTS.setdefault("fit", {})[name] = {
        "weight_error": relative_error(model.get_weights(), reference.get_weights()),
        "moved": relative_error(reference.get_weights(), start),
        "loss": history["loss"],
        "reference_loss": reference_history["loss"],
    }

if NUM_REPLICAS == 2:
    # -- 3. Keras does not divide scalar losses by the replica count; MetricLoss does ----
    # Both replicas see the same 16 samples: without cross-replica gathering the update
    # must equal one single-device step on those 16 samples (not twice it).
    x16, y16 = fx[:16], fy[:16]

    class UnscaledContrastive(keras.losses.Loss):
        """A plain scalar Keras loss, to show what Keras itself does with one."""

        def call(self, y_true, y_pred):
            return keras_dml.losses.contrastive_loss(keras.ops.cast(y_true, "int32"), y_pred)

    for name, make_loss in (
        ("metric_loss", lambda: keras_dml.ContrastiveLoss(cross_replica=False)),
        ("plain_keras_scalar_loss", lambda: UnscaledContrastive()),
    ):
        with STRATEGY.scope():
            model = build(seed=2)
            model.compile(optimizer=keras.optimizers.SGD(0.5), loss=make_loss())
        reference = build(seed=2)
        reference.compile(optimizer=keras.optimizers.SGD(0.5), loss=make_loss())
        reference.set_weights(model.get_weights())
        start = [w.copy() for w in model.get_weights()]
        history = model.fit(np.concatenate([x16, x16]), np.concatenate([y16, y16]),
                            batch_size=32, epochs=1, shuffle=False, verbose=0).history
        reference_history = reference.fit(x16, y16, batch_size=16, epochs=1, shuffle=False,
                                          verbose=0).history
        step_ratio = [
            float(np.linalg.norm(a - s) / np.linalg.norm(b - s))
            for a, b, s in zip(model.get_weights(), reference.get_weights(), start, strict=True)
        ]
        RESULTS.setdefault("scaling", {})[name] = {
            "step_ratio": step_ratio,
            "logged_loss_ratio": history["loss"][0] / reference_history["loss"][0],
        }

    # -- 4. MarginModel with every head: trains, centres stay in sync ---------------------
    hx = rng.normal(size=(48, D_IN)).astype("float32")
    hy = (np.arange(48) % 6).astype("int32")
    hx += 2.0 * rng.normal(size=(6, D_IN)).astype("float32")[hy]
    HEADS = {
        "CosineHead": lambda: heads.CosineHead(6),
        "ArcFace": lambda: heads.ArcFace(6, scale=16.0),
        "SubCenterArcFace": lambda: heads.SubCenterArcFace(6, scale=16.0),
        "CosFace": lambda: heads.CosFace(6, scale=16.0),
        "AdaCos": lambda: heads.AdaCos(6),
        "SoftTriple": lambda: heads.SoftTriple(6, centers_per_class=2),
        "SphereFace": lambda: heads.SphereFace(6),
        "CurricularFace": lambda: heads.CurricularFace(6, scale=16.0),
        "CenterLoss": lambda: heads.CenterLoss(6),
        "ProxyNCA": lambda: heads.ProxyNCA(6),
        "ProxyAnchor": lambda: heads.ProxyAnchor(6),
    }
    for name, make_head in HEADS.items():
        with STRATEGY.scope():
            model = MarginModel(build(seed=3), make_head())
            model.compile(optimizer=keras.optimizers.SGD(0.05), metrics=["accuracy"])
        reference = MarginModel(build(seed=3), make_head())
        reference.compile(optimizer=keras.optimizers.SGD(0.05), metrics=["accuracy"])
        reference.build((None, D_IN))
        model.build((None, D_IN))
        reference.set_weights(model.get_weights())
        history = model.fit(hx, hy, batch_size=16, epochs=2, shuffle=False, verbose=0).history
        reference.fit(hx, hy, batch_size=16, epochs=2, shuffle=False, verbose=0)
        replica_spread = 0.0
        for variable in model.head.variables:
            copies = [np.asarray(c) for c in STRATEGY.experimental_local_results(variable.value)]
            replica_spread = max(replica_spread, *(relative_error(c, copies[0]) for c in copies))
        RESULTS.setdefault("heads", {})[name] = {
            "finite": bool(all(np.all(np.isfinite(v)) for v in history.values())
                           and all(np.all(np.isfinite(w)) for w in model.get_weights())),
            "replica_spread": replica_spread,
            "weight_error": relative_error(model.get_weights(), reference.get_weights()),
        }

print("RESULTS " + json.dumps(RESULTS))
