"""Partial FC: the shard-wise margin softmax cross-entropy and `PartialFCModel`.

The first tests run on every backend on one device: the shard-wise loss
equals the head's full cross-entropy for any number of shards (value and
gradients), sampling keeps every positive centre. The last test (run by the
TensorFlow suite) starts a JAX interpreter with 4 virtual CPU devices
(`tests/sharded_head_checks.py`) and shards the head over 2 and 4 of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import loss_gradient

from keras_dml.heads import (
    AdaCos,
    ArcFace,
    CosFace,
    CosineHead,
    CurricularFace,
    SphereFace,
    SubCenterArcFace,
)
from keras_dml.models.partial_fc import (
    PartialFCModel,
    margin_softmax_cross_entropy,
    num_sampled_centers,
)

B, D, C = 8, 6, 24


def data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, D)).astype("float32")
    y = rng.integers(0, C, B).astype("int32")
    y[1] = y[0]
    return x, y


HEADS = {
    "cosine": lambda: CosineHead(C),
    "arcface": lambda: ArcFace(C, scale=16.0, margin=0.4),
    "arcface_per_class_margin": lambda: ArcFace(C, scale=16.0,
                                                margin=list(np.linspace(0.1, 0.5, C))),
    "cosface": lambda: CosFace(C, scale=16.0, margin=0.3),
}


@pytest.mark.parametrize("num_shards", [1, 2, 4])
@pytest.mark.parametrize("name", sorted(HEADS))
def test_shard_wise_loss_equals_the_heads_cross_entropy(name, num_shards):
    head = HEADS[name]()
    head.build((None, D))
    x, y = data()
    kernel = keras.ops.convert_to_numpy(head.kernel)

    def full(v):
        logits = head(v, y)
        return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, logits, True))

    def sharded(v):
        return keras.ops.mean(margin_softmax_cross_entropy(head, v, y, num_shards=num_shards))

    def sharded_of_kernel(w):
        return keras.ops.mean(margin_softmax_cross_entropy(head, x, y, kernel=w,
                                                           num_shards=num_shards))

    def full_of_kernel(w):
        logits = head.stateless_call([w], [], x, y)[0]
        return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, logits, True))

    value, grad = loss_gradient(full, x)
    got_value, got_grad = loss_gradient(sharded, x)
    np.testing.assert_allclose(got_value, value, rtol=1e-5)
    np.testing.assert_allclose(got_grad, grad, rtol=1e-4, atol=1e-6)
    _, kernel_grad = loss_gradient(full_of_kernel, kernel)
    _, got_kernel_grad = loss_gradient(sharded_of_kernel, kernel)
    np.testing.assert_allclose(got_kernel_grad, kernel_grad, rtol=1e-4, atol=1e-6)
    assert np.abs(kernel_grad).max() > 0


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_sampling_keeps_every_positive_and_scores_only_the_sample(num_shards):
    head = ArcFace(240, scale=16.0, margin=0.4)
    head.build((None, D))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(B, D)).astype("float32")
    y = rng.choice(240, B, replace=False).astype("int32")
    seed = keras.random.SeedGenerator(3)
    losses, ids = margin_softmax_cross_entropy(head, x, y, num_shards=num_shards,
                                               sample_rate=0.1, seed=seed,
                                               return_sampled_classes=True)
    ids = keras.ops.convert_to_numpy(ids)
    per_shard = 240 // num_shards
    k = num_sampled_centers(240, num_shards, 0.1, B)
    assert k == max(int(np.ceil(0.1 * per_shard)), B)
    assert ids.shape == (num_shards, k)
    assert np.all(ids // per_shard == np.arange(num_shards)[:, None])  # each shard its own
    assert len(set(ids.ravel().tolist())) == ids.size
    assert set(y.tolist()) <= set(ids.ravel().tolist())  # positives always kept
    # The loss is the head's cross-entropy over the sampled classes only.
    columns = np.sort(ids.ravel())
    logits = keras.ops.convert_to_numpy(head(x, y))[:, columns]
    target = np.searchsorted(columns, y)
    expected = -(logits[np.arange(B), target]
                 - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1))
                 - logits.max(1))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(losses), expected, rtol=1e-5)


def test_sample_rate_one_and_a_big_batch_score_every_class():
    assert num_sampled_centers(1000, 4, 1.0, 8) == 250
    assert num_sampled_centers(1000, 4, 0.1, 8) == 25
    assert num_sampled_centers(1000, 4, 0.01, 8) == 8  # room for the batch's positives
    assert num_sampled_centers(1000, 4, 0.01, 512) == 250


def test_unsupported_heads_and_arguments_are_refused():
    x, y = data()
    head = SubCenterArcFace(C)
    head.build((None, D))
    with pytest.raises(ValueError, match="one centre per class"):
        margin_softmax_cross_entropy(head, x, y)
    for other in (AdaCos(C), SphereFace(C), CurricularFace(C)):
        other.build((None, D))
        with pytest.raises(ValueError, match="supports CosineHead, ArcFace and CosFace"):
            margin_softmax_cross_entropy(other, x, y)
    arc = ArcFace(C)
    arc.build((None, D))
    with pytest.raises(ValueError, match="equal shards"):
        margin_softmax_cross_entropy(arc, x, y, num_shards=5)
    with pytest.raises(ValueError, match="sample_rate"):
        margin_softmax_cross_entropy(arc, x, y, sample_rate=0.0)
    backbone = keras.Sequential([keras.Input((4,)), keras.layers.Dense(D)])
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFCModel(backbone, ArcFace(C), sample_rate=1.5)
    model = PartialFCModel(backbone, ArcFace(C))
    with pytest.raises(ValueError, match="no metrics"):
        model.compile(optimizer="sgd", metrics=["accuracy"])


def test_partial_fc_model_trains_like_margin_model_without_sampling():
    from keras_dml.models import MarginModel

    rng = np.random.default_rng(2)
    x = rng.normal(size=(32, 5)).astype("float32")
    y = (np.arange(32) % C).astype("int32")

    def make(cls, **kwargs):
        keras.utils.set_random_seed(4)
        backbone = keras.Sequential([keras.Input((5,)), keras.layers.Dense(D)])
        model = cls(backbone, ArcFace(C, scale=16.0, margin=0.3), **kwargs)
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        return model

    reference, model = make(MarginModel), make(PartialFCModel, num_shards=4)
    model.set_weights(reference.get_weights())
    reference.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history
    for a, b in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    sampled = make(PartialFCModel, num_shards=2, sample_rate=0.5, seed=1)
    sampled_history = sampled.fit(x, y, batch_size=8, epochs=2, verbose=0).history
    assert np.all(np.isfinite(sampled_history["loss"])) and np.all(np.isfinite(history["loss"]))
    config = sampled.get_config()
    assert (config["sample_rate"], config["num_shards"], config["seed"]) == (0.5, 2, 1)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="runs once, in the TensorFlow suite (the check itself runs on JAX)")
def test_head_sharded_over_2_and_4_virtual_devices_equals_the_unsharded_head():
    pytest.importorskip("jax")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2",
               XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    script = os.path.join(root, "tests", "sharded_head_checks.py")
    result = subprocess.run([sys.executable, script, "2", "4"], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULTS "))
    results = json.loads(line[len("RESULTS "):])
    assert results["devices"] == 4
    for n in ("2", "4"):
        r = results[n]
        # The kernel lives in n column blocks; so does its gradient.
        assert r["kernel_spec"] == r["kernel_grad_spec"] == "P(None, 'model')", r
        assert r["kernel_shard_shape"] == [16, 1024 // int(n)], r
        assert r["value_error"] < 1e-5 and r["kernel_grad_error"] < 1e-5, r
        assert r["x_grad_error"] < 1e-5, r
        # The partitioned program holds (B, C / n) logit blocks, never (B, C).
        assert not r["full_logits_in_program"] and r["shard_logits_in_program"], r
        assert not r["sampled_full_logits_in_program"], r
        # Sampling: k = ceil(0.1 C / n) centres per shard, positives kept, others no gradient.
        assert r["sampled_shape"] == [int(n), int(np.ceil(0.1 * 1024 / int(n)))], r
        assert r["sampled_in_own_shard"] and r["sampled_unique"] and r["positives_kept"], r
        assert r["unsampled_grad_max"] == 0.0, r
        assert r["sampled_value_error"] < 1e-5 and r["other_seed_other_sample"], r
        # fit: sharded PartialFCModel == MarginModel on one device.
        assert r["fit_moved"] > 1e-3 and r["fit_weight_error"] < 1e-5, r
        assert r["fit_kernel_spec"] == r["sampled_fit_kernel_spec"] == "P(None, 'model')", r
        assert np.all(np.isfinite(r["sampled_fit_loss"])), r
