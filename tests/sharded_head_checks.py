"""Partial FC on N virtual CPU devices, run in a fresh interpreter by tests/test_partial_fc.py.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=4 KERAS_BACKEND=jax \
       python sharded_head_checks.py 2 4

For each mesh size n: an ArcFace head's kernel laid out `(None, "model")` by
`keras.distribution.ModelParallel` over a `(1, n)` mesh; the shard-wise loss
and its gradients (jitted, partitioned by XLA) against the unsharded head's
cross-entropy; the partitioned program's shapes (no `(B, C)` logits on a
device); sampling (positives kept, unsampled centres get no gradient); and
`PartialFCModel.fit` against `MarginModel.fit` without distribution. Prints
`RESULTS {json}`.
"""

from __future__ import annotations

import json
import re
import sys

import jax
import keras
import numpy as np
from keras import ops

from keras_dml.heads import ArcFace
from keras_dml.models import MarginModel
from keras_dml.models.partial_fc import PartialFCModel, margin_softmax_cross_entropy

B, D, C = 8, 16, 1024
rng = np.random.default_rng(0)
x = rng.normal(size=(B, D)).astype("float32")
y = rng.choice(C, B, replace=False).astype("int32")
y[1] = y[0]  # a repeated class


def max_error(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(np.max(np.abs(b)), 1e-12))


def reference_loss(head, kernel, xs, columns=None):
    """Mean sparse CE of the head's full logits (optionally restricted to `columns`)."""
    logits = head.stateless_call([kernel], [], xs, y)[0]
    labels = y
    if columns is not None:
        logits = ops.take(logits, columns, axis=1)
        labels = ops.argmax(ops.cast(columns[None, :] == y[:, None], "int32"), axis=1)
    return ops.mean(keras.losses.sparse_categorical_crossentropy(labels, logits, True))


def distribution(n):
    mesh = keras.distribution.DeviceMesh((1, n), ["batch", "model"], jax.devices()[:n])
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["arcface/kernel"] = (None, "model")
    layout_map["arcface_sampled/kernel"] = (None, "model")
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")


def check(n):
    r = {}
    keras.distribution.set_distribution(None)
    keras.utils.set_random_seed(1)
    plain = ArcFace(C, scale=32.0, margin=0.3, name="arcface")
    plain.build((None, D))
    kernel_np = np.asarray(plain.kernel.value)
    ref_value, ref_grads = jax.value_and_grad(
        lambda w, v: reference_loss(plain, w, v), argnums=(0, 1))(kernel_np, x)

    keras.distribution.set_distribution(distribution(n))
    head = ArcFace(C, scale=32.0, margin=0.3, name="arcface")
    head.build((None, D))
    head.kernel.assign(kernel_np)
    kernel = head.kernel.value
    r["kernel_spec"] = str(kernel.sharding.spec)
    r["kernel_shard_shape"] = list(kernel.addressable_shards[0].data.shape)

    def loss_fn(w, v):
        return ops.mean(margin_softmax_cross_entropy(head, v, y, kernel=w))

    step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
    value, grads = step(kernel, x)
    r["value_error"] = max_error(value, ref_value)
    r["kernel_grad_error"] = max_error(grads[0], ref_grads[0])
    r["x_grad_error"] = max_error(grads[1], ref_grads[1])
    r["kernel_grad_spec"] = str(grads[0].sharding.spec)
    hlo = step.lower(kernel, x).compile().as_text()
    shapes = set(re.findall(r"f32\[[0-9,]+\]", hlo))
    r["full_logits_in_program"] = any(s in shapes for s in (f"f32[{B},{C}]",
                                                           f"f32[{B},{n},{C // n}]"))
    r["shard_logits_in_program"] = f"f32[{B},1,{C // n}]" in shapes

    # Sampling: every positive kept; the others get no gradient.
    sampled = ArcFace(C, scale=32.0, margin=0.3, name="arcface_sampled")
    sampled.build((None, D))
    sampled.kernel.assign(kernel_np)
    seed = keras.random.SeedGenerator(5)

    @jax.jit
    def sampled_step(w, v, seed_state):
        def f(w_):
            losses, ids = margin_softmax_cross_entropy(sampled, v, y, kernel=w_, sample_rate=0.1,
                                                       seed=seed_state,
                                                       return_sampled_classes=True)
            return ops.mean(losses), ids
        (val, ids), grad = jax.value_and_grad(f, has_aux=True)(w)
        return val, ids, grad

    val, ids, grad = sampled_step(sampled.kernel.value, x, seed.state.value)
    ids = np.asarray(ids)
    r["sampled_shape"] = list(ids.shape)
    r["sampled_in_own_shard"] = bool(np.all(ids // (C // n) == np.arange(n)[:, None]))
    r["sampled_unique"] = len(set(ids.ravel().tolist())) == ids.size
    r["positives_kept"] = set(y.tolist()) <= set(ids.ravel().tolist())
    grad = np.asarray(grad)
    unsampled = np.setdiff1d(np.arange(C), ids.ravel())
    r["unsampled_grad_max"] = float(np.abs(grad[:, unsampled]).max())
    r["sampled_value_error"] = max_error(
        val, reference_loss(plain, kernel_np, x, columns=np.sort(ids.ravel())))
    other_ids = np.asarray(sampled_step(sampled.kernel.value, x,
                                        jax.random.PRNGKey(11).astype("uint32"))[1])
    r["other_seed_other_sample"] = bool(set(other_ids.ravel()) != set(ids.ravel()))
    hlo = sampled_step.lower(sampled.kernel.value, x, seed.state.value).compile().as_text()
    r["sampled_full_logits_in_program"] = f"f32[{B},{C}]" in hlo

    # fit: PartialFCModel sharded vs MarginModel on one device, same data and weights.
    data_x = rng.normal(size=(4 * B, 12)).astype("float32")
    data_y = rng.integers(0, C, 4 * B).astype("int32")

    def backbone():
        return keras.Sequential([keras.Input((12,)), keras.layers.Dense(D)])

    keras.distribution.set_distribution(None)
    keras.utils.set_random_seed(2)
    reference = MarginModel(backbone(), ArcFace(C, scale=32.0, margin=0.3, name="arcface"))
    reference.compile(optimizer=keras.optimizers.SGD(0.5))
    initial = [np.asarray(w) for w in reference.get_weights()]
    reference.fit(data_x, data_y, batch_size=B, epochs=1, shuffle=False, verbose=0)

    keras.distribution.set_distribution(distribution(n))
    model = PartialFCModel(backbone(), ArcFace(C, scale=32.0, margin=0.3, name="arcface"))
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    model.set_weights(initial)
    model.fit(data_x, data_y, batch_size=B, epochs=1, shuffle=False, verbose=0)
    r["fit_weight_error"] = max(max_error(a, b) for a, b in
                               zip(model.get_weights(), reference.get_weights(), strict=True))
    r["fit_moved"] = max(float(np.abs(a - b).max()) for a, b in
                         zip(reference.get_weights(), initial, strict=True))
    r["fit_kernel_spec"] = str(model.head.kernel.value.sharding.spec)

    sampled_model = PartialFCModel(backbone(), ArcFace(C, scale=32.0, margin=0.3,
                                                        name="arcface_sampled"),
                                   sample_rate=0.1, seed=3)
    sampled_model.compile(optimizer=keras.optimizers.SGD(0.5))
    h = sampled_model.fit(data_x, data_y, batch_size=B, epochs=2, shuffle=False, verbose=0)
    r["sampled_fit_loss"] = [float(v) for v in h.history["loss"]]
    r["sampled_fit_kernel_spec"] = str(sampled_model.head.kernel.value.sharding.spec)
    keras.distribution.set_distribution(None)
    return r


results = {"devices": len(jax.devices())}
for count in sys.argv[1:]:
    results[count] = check(int(count))
print("RESULTS " + json.dumps(results), flush=True)
