"""SupConLoss against a naive loop reference (backend-agnostic)."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from conftest import loss_gradient, mixed_precision
from pml_parity import (
    assert_parity,
    import_pml,
    keras_value_and_grads,
    m_per_class_batch,
    pml_value_and_grads,
    requires_pml,
)

from keras_dml.losses.ntxent import nt_xent_loss
from keras_dml.losses.supcon import SupConLoss, supcon_loss


def ref_cosine(a, b):
    a, b = [float(v) for v in a], [float(v) for v in b]
    norm_a = max(math.sqrt(sum(v * v for v in a)), 1e-6)
    norm_b = max(math.sqrt(sum(v * v for v in b)), 1e-6)
    cos = sum(x * y for x, y in zip(a, b, strict=True)) / (norm_a * norm_b)
    return min(max(cos, -1.0), 1.0)


def ref_supcon(labels, x, temperature=0.07, base_temperature=0.07):
    """Khosla et al.'s L_out, one anchor and one positive at a time, in float64."""
    n = len(labels)
    losses = []
    for i in range(n):
        positives = [p for p in range(n) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        logits = [ref_cosine(x[i], x[k]) / temperature for k in range(n)]
        log_denominator = math.log(sum(math.exp(logits[k]) for k in range(n) if k != i))
        mean_log_prob = sum(logits[p] - log_denominator for p in positives) / len(positives)
        losses.append(-(temperature / base_temperature) * mean_log_prob)
    return sum(losses) / len(losses) if losses else 0.0


# Few distinct batch shapes: JAX compiles every eager op once per shape.
def batch(rng, n=12, dim=4, classes=3):
    labels = rng.integers(0, classes, size=n)
    return labels, rng.normal(size=(n, dim)).astype("float32")


def run_compiled(fn, *arrays):
    """Runs `fn` as a compiled graph; on TensorFlow with the batch size unknown at trace time."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        specs = [tf.TensorSpec([None, *a.shape[1:]], a.dtype) for a in arrays]
        return np.asarray(tf.function(fn, input_signature=specs, autograph=False)(*arrays))
    if keras.backend.backend() == "jax":
        import jax

        return np.asarray(jax.jit(fn)(*arrays))
    return np.asarray(fn(*arrays))


def numeric_gradient(f, x, eps=1e-5):
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += eps
        down[idx] -= eps
        grad[idx] = (f(up) - f(down)) / (2 * eps)
    return grad


@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5, 1.0])
def test_matches_reference(temperature):
    rng = np.random.default_rng(0)
    for n, classes in ((8, 2), (12, 3), (12, 6), (12, 12), (5, 2)):
        labels, x = batch(rng, n=n, classes=classes)
        want = ref_supcon(labels, x, temperature, temperature)
        loss = SupConLoss(temperature=temperature, base_temperature=temperature)
        np.testing.assert_allclose(float(loss(labels, x)), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature, base_temperature", [(0.07, 0.07), (0.1, 0.07), (0.5, 1.0)])
def test_function_equals_class_and_base_temperature_scales(temperature, base_temperature):
    labels, x = batch(np.random.default_rng(1))
    kwargs = dict(temperature=temperature, base_temperature=base_temperature)
    want = ref_supcon(labels, x, **kwargs)
    np.testing.assert_allclose(float(supcon_loss(labels, x, **kwargs)), want, rtol=1e-5)
    np.testing.assert_allclose(float(SupConLoss(**kwargs)(labels, x)), want, rtol=1e-5)
    unscaled = float(supcon_loss(labels, x, temperature=temperature, base_temperature=temperature))
    np.testing.assert_allclose(want, unscaled * temperature / base_temperature, rtol=1e-5)


@pytest.mark.parametrize("temperature, base_temperature", [(0.1, 0.1), (0.07, 0.07), (0.2, 0.07)])
def test_instance_labels_on_two_views_equal_nt_xent(temperature, base_temperature):
    rng = np.random.default_rng(2)
    for n in (1, 4, 6):
        view_1 = rng.normal(size=(n, 4)).astype("float32")
        view_2 = view_1 + 0.3 * rng.normal(size=(n, 4)).astype("float32")
        ids = np.concatenate([np.arange(n), np.arange(n)])
        supcon = supcon_loss(
            ids,
            np.concatenate([view_1, view_2]),
            temperature=temperature,
            base_temperature=base_temperature,
        )
        ntxent = nt_xent_loss(view_1, view_2, temperature=temperature)
        np.testing.assert_allclose(
            float(supcon), float(ntxent) * temperature / base_temperature, rtol=1e-5, atol=1e-6
        )


def test_more_than_two_views():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, size=4)
    views = [rng.normal(size=(4, 4)).astype("float32") for _ in range(3)]
    stacked_labels, stacked = np.tile(labels, 3), np.concatenate(views)
    np.testing.assert_allclose(
        float(SupConLoss()(stacked_labels, stacked)), ref_supcon(stacked_labels, stacked), rtol=1e-5
    )


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_gradient_matches_finite_differences(temperature):
    labels, x = batch(np.random.default_rng(4), n=8, classes=2)
    kwargs = dict(temperature=temperature, base_temperature=0.07)
    value, grad = loss_gradient(lambda v: supcon_loss(labels, v, **kwargs), x)
    want = numeric_gradient(lambda z: ref_supcon(labels, z, **kwargs), x)
    np.testing.assert_allclose(value, ref_supcon(labels, x, **kwargs), rtol=1e-5)
    np.testing.assert_allclose(grad, want, rtol=1e-3, atol=1e-4)


def test_compiled_with_unknown_batch_matches_eager():
    labels, x = batch(np.random.default_rng(10), n=8)
    labels = labels.astype("int32")
    got = run_compiled(lambda y, v: SupConLoss(temperature=0.2)(y, v), labels, x)
    np.testing.assert_allclose(got, ref_supcon(labels, x, 0.2, 0.07), rtol=1e-5)


def test_gradient_through_class_matches_function():
    labels, x = batch(np.random.default_rng(5))
    _, through_class = loss_gradient(lambda v: SupConLoss(temperature=0.2)(labels, v), x)
    _, through_fn = loss_gradient(lambda v: supcon_loss(labels, v, temperature=0.2), x)
    np.testing.assert_allclose(through_class, through_fn, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- degenerate input

DEGENERATE = [
    (np.zeros(5, "int32"), np.eye(5, 4, dtype="float32")),
    (np.arange(5), np.eye(5, 4, dtype="float32")),
    (np.array([2]), np.ones((1, 4), "float32")),
    (np.array([0, 0, 1, 1]), np.ones((4, 4), "float32")),
    (np.array([0, 0, 1, 1, 2]), np.array([[1, 2, 0, 1]] * 3 + [[0, 0, 0, 0]] * 2, "float32")),
    (np.array([0, 0]), np.array([[1e4, -1e4, 0, 0], [1e-4, 0, 0, 0]], "float32")),
]
DEGENERATE_IDS = [
    "one-class", "no-positive-pair", "single", "all-identical", "duplicates-and-zeros", "scales",
]


@pytest.mark.parametrize("temperature", [0.07, 1.0])
@pytest.mark.parametrize("labels, x", DEGENERATE, ids=DEGENERATE_IDS)
def test_degenerate_batches_are_finite_and_match_reference(labels, x, temperature):
    loss = SupConLoss(temperature=temperature)
    value, grad = loss_gradient(lambda v: loss(labels, v), x)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad))
    want = ref_supcon(labels, x, temperature, 0.07)
    np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("labels", [np.arange(8), np.array([7])], ids=["all-distinct", "single"])
def test_no_positive_pair_gives_zero_and_zero_gradient(labels):
    x = np.random.default_rng(6).normal(size=(len(labels), 4)).astype("float32")
    value, grad = loss_gradient(lambda v: supcon_loss(labels, v), x)
    assert float(value) == 0.0
    assert np.all(grad == 0.0)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_half_precision_inputs_and_model_outputs(policy):
    labels, x = batch(np.random.default_rng(7), n=8, classes=3)
    half = policy.split("_")[1]
    loss = SupConLoss(temperature=0.1)
    exact = float(loss(labels, x))
    with mixed_precision(policy):
        direct = supcon_loss(labels, keras.ops.cast(x, half), temperature=0.1)
        assert keras.backend.standardize_dtype(direct.dtype) == "float32"
        np.testing.assert_allclose(float(direct), exact, rtol=0.05, atol=0.05)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4)])
        assert keras.backend.standardize_dtype(model(x).dtype) == half
        value, grad = loss_gradient(lambda v: loss(labels, model(v)), x)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad))
    assert keras.config.dtype_policy().name == "float32"


def test_half_precision_gradient_wrt_half_embeddings():
    labels, x = batch(np.random.default_rng(8), n=8, classes=2)
    for half in ("float16", "bfloat16"):
        value, grad = loss_gradient(
            lambda v: supcon_loss(labels, v), keras.ops.convert_to_numpy(keras.ops.cast(x, half))
        )
        assert np.isfinite(value)
        assert np.all(np.isfinite(np.asarray(grad, np.float32)))


# --------------------------------------------------------------------------- Keras integration


def test_config_round_trip():
    loss = SupConLoss(temperature=0.2, base_temperature=0.1, name="my_supcon")
    config = loss.get_config()
    assert config["temperature"] == 0.2
    assert config["base_temperature"] == 0.1
    assert config["name"] == "my_supcon"
    clone = SupConLoss.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, SupConLoss)
    assert restored.get_config() == config
    labels, x = batch(np.random.default_rng(9))
    np.testing.assert_allclose(float(restored(labels, x)), float(loss(labels, x)), rtol=1e-6)


def test_function_names_its_arguments():
    with pytest.raises(ValueError, match="embeddings"):
        supcon_loss(np.zeros(2, "int32"), np.ones((2, 2, 2), "float32"))
    with pytest.raises(ValueError, match="labels"):
        supcon_loss(np.zeros(3, "int32"), np.ones((2, 2), "float32"))


@pytest.mark.parametrize("arg", ["temperature", "base_temperature"])
@pytest.mark.parametrize("value", [0.0, -0.1])
def test_non_positive_temperature_raises(arg, value):
    with pytest.raises(ValueError, match=arg):
        SupConLoss(**{arg: value})
    with pytest.raises(ValueError, match=arg):
        supcon_loss(np.zeros(2, "int32"), np.ones((2, 2), "float32"), **{arg: value})


# ------------------------------------------------------ pytorch-metric-learning parity (TF only)


@requires_pml
@pytest.mark.parametrize("temperature", [0.07, 0.1])
def test_matches_pytorch_metric_learning(temperature):
    # PML's SupConLoss has no base temperature: it is keras-dml's with
    # base_temperature=temperature (keras-dml's defaults, 0.07 and 0.07, give the same scale;
    # PML's default temperature is 0.1). Anchors without a positive drop out in both.
    torch, pml = import_pml()
    from pytorch_metric_learning import losses

    labels, x = m_per_class_batch(60)
    labels[np.flatnonzero(labels == 5)[:3]] = 6  # class 5 is now a singleton
    theirs = losses.SupConLoss(temperature=temperature)
    ours = SupConLoss(temperature=temperature, base_temperature=temperature, dtype="float64")
    want = pml_value_and_grads(lambda v: theirs(v, torch.tensor(labels)), x)
    assert_parity(keras_value_and_grads(lambda v: ours(labels, v), x), want)
