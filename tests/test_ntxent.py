"""NTXentLoss / nt_xent_loss against a naive loop reference (backend-agnostic)."""

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

from keras_dml.losses.ntxent import NTXentLoss, nt_xent_loss


def ref_cosine(a, b):
    a, b = [float(v) for v in a], [float(v) for v in b]
    norm_a = max(math.sqrt(sum(v * v for v in a)), 1e-6)
    norm_b = max(math.sqrt(sum(v * v for v in b)), 1e-6)
    cos = sum(x * y for x, y in zip(a, b, strict=True)) / (norm_a * norm_b)
    return min(max(cos, -1.0), 1.0)


def ref_nt_xent(view_1, view_2, temperature=0.1):
    """SimCLR's loss one anchor at a time, in float64: the positive of row i is row i +- N."""
    rows = list(view_1) + list(view_2)
    n, two_n = len(view_1), 2 * len(view_1)
    total = 0.0
    for i in range(two_n):
        positive = (i + n) % two_n
        logits = [ref_cosine(rows[i], rows[k]) / temperature for k in range(two_n)]
        log_denominator = math.log(sum(math.exp(logits[k]) for k in range(two_n) if k != i))
        total += -(logits[positive] - log_denominator)
    return total / two_n


# Few distinct batch shapes: JAX compiles every eager op once per shape.
def views(rng, n=6, dim=4, noise=0.5):
    view_1 = rng.normal(size=(n, dim)).astype("float32")
    return view_1, (view_1 + noise * rng.normal(size=(n, dim))).astype("float32")


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
    for n, noise in ((1, 0.5), (4, 0.1), (6, 0.5), (6, 2.0), (6, 0.0)):
        view_1, view_2 = views(rng, n=n, noise=noise)
        want = ref_nt_xent(view_1, view_2, temperature)
        got = nt_xent_loss(view_1, view_2, temperature=temperature)
        np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_class_on_stacked_views_equals_function(temperature):
    view_1, view_2 = views(np.random.default_rng(1))
    stacked = np.concatenate([view_1, view_2])
    want = ref_nt_xent(view_1, view_2, temperature)
    loss = NTXentLoss(temperature=temperature)
    # y_true: one row per input (model builds the views) or one per view; values are ignored.
    for y_true in (np.zeros(6), np.arange(6), np.zeros(12, "int32"), np.tile(np.arange(6), 2)):
        np.testing.assert_allclose(float(loss(y_true, stacked)), want, rtol=1e-5)
    np.testing.assert_allclose(float(loss(np.zeros((12, 1)), stacked)), want, rtol=1e-5)


def test_default_temperature_is_simclr_0_1():
    view_1, view_2 = views(np.random.default_rng(2))
    want = ref_nt_xent(view_1, view_2, 0.1)
    np.testing.assert_allclose(float(nt_xent_loss(view_1, view_2)), want, rtol=1e-5)
    stacked = np.concatenate([view_1, view_2])
    np.testing.assert_allclose(float(NTXentLoss()(np.zeros(12), stacked)), want, rtol=1e-5)


def test_swapping_views_or_permuting_instances_keeps_the_loss():
    rng = np.random.default_rng(3)
    view_1, view_2 = views(rng)
    order = rng.permutation(6)
    base = float(nt_xent_loss(view_1, view_2))
    np.testing.assert_allclose(float(nt_xent_loss(view_2, view_1)), base, rtol=1e-5)
    np.testing.assert_allclose(float(nt_xent_loss(view_1[order], view_2[order])), base, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_gradient_matches_finite_differences(temperature):
    view_1, view_2 = views(np.random.default_rng(4), n=4)
    x = np.concatenate([view_1, view_2])

    def ref(z):
        return ref_nt_xent(z[:4], z[4:], temperature)

    value, grad = loss_gradient(lambda v: nt_xent_loss(v[:4], v[4:], temperature=temperature), x)
    np.testing.assert_allclose(value, ref(x), rtol=1e-5)
    np.testing.assert_allclose(grad, numeric_gradient(ref, x), rtol=1e-3, atol=1e-4)


def test_compiled_with_unknown_batch_matches_eager():
    view_1, view_2 = views(np.random.default_rng(10), n=4)
    stacked = np.concatenate([view_1, view_2])
    want = ref_nt_xent(view_1, view_2, 0.1)
    for y_true in (np.zeros(4, "float32"), np.zeros(8, "float32")):
        got = run_compiled(lambda y, v: NTXentLoss()(y, v), y_true, stacked)
        np.testing.assert_allclose(got, want, rtol=1e-5)
    got = run_compiled(lambda a, b: nt_xent_loss(a, b), view_1, view_2)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_gradient_through_class_matches_function():
    view_1, view_2 = views(np.random.default_rng(5))
    x = np.concatenate([view_1, view_2])
    _, through_class = loss_gradient(lambda v: NTXentLoss(temperature=0.2)(np.zeros(6), v), x)
    _, through_fn = loss_gradient(lambda v: nt_xent_loss(v[:6], v[6:], temperature=0.2), x)
    np.testing.assert_allclose(through_class, through_fn, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- degenerate input

DEGENERATE = [
    (np.ones((1, 4), "float32"), np.ones((1, 4), "float32")),
    (np.ones((4, 4), "float32"), np.ones((4, 4), "float32")),
    (np.zeros((4, 4), "float32"), np.zeros((4, 4), "float32")),
    (np.eye(4, dtype="float32"), np.eye(4, dtype="float32")),
    (np.eye(4, dtype="float32"), -np.eye(4, dtype="float32")),
    (np.array([[1e4, -1e4, 0, 0]], "float32"), np.array([[1e-4, 0, 0, 0]], "float32")),
]
DEGENERATE_IDS = [
    "one-pair", "all-identical", "all-zero", "identical-views", "opposite-views", "scales",
]


@pytest.mark.parametrize("temperature", [0.05, 1.0])
@pytest.mark.parametrize("view_1, view_2", DEGENERATE, ids=DEGENERATE_IDS)
def test_degenerate_batches_are_finite_and_match_reference(view_1, view_2, temperature):
    x = np.concatenate([view_1, view_2])
    loss = NTXentLoss(temperature=temperature)
    value, grad = loss_gradient(lambda v: loss(np.zeros(len(x)), v), x)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad))
    want = ref_nt_xent(view_1, view_2, temperature)
    np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6)


def test_one_pair_has_no_negative_and_zero_loss():
    # With N = 1 the positive is the only candidate, so its probability is 1.
    value, grad = loss_gradient(
        lambda v: nt_xent_loss(v[:1], v[1:]), np.array([[1.0, 2.0], [3.0, -1.0]], "float32")
    )
    assert abs(float(value)) < 1e-6
    assert np.all(grad == 0.0)


def test_identical_rows_give_log_of_candidate_count():
    x = np.ones((4, 4), "float32")
    np.testing.assert_allclose(float(nt_xent_loss(x, x)), math.log(7), rtol=1e-5)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_half_precision_inputs_and_model_outputs(policy):
    view_1, view_2 = views(np.random.default_rng(7), n=4)
    half = policy.split("_")[1]
    exact = float(nt_xent_loss(view_1, view_2))
    with mixed_precision(policy):
        direct = nt_xent_loss(keras.ops.cast(view_1, half), keras.ops.cast(view_2, half))
        assert keras.backend.standardize_dtype(direct.dtype) == "float32"
        np.testing.assert_allclose(float(direct), exact, rtol=0.05, atol=0.05)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4)])
        assert keras.backend.standardize_dtype(model(view_1).dtype) == half
        x = np.concatenate([view_1, view_2])
        value, grad = loss_gradient(lambda v: NTXentLoss()(np.zeros(4), model(v)), x)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad))
    assert keras.config.dtype_policy().name == "float32"


def test_half_precision_gradient_wrt_half_embeddings():
    view_1, view_2 = views(np.random.default_rng(8), n=4)
    x = np.concatenate([view_1, view_2])
    for half in ("float16", "bfloat16"):
        x_half = keras.ops.convert_to_numpy(keras.ops.cast(x, half))
        value, grad = loss_gradient(lambda v: nt_xent_loss(v[:4], v[4:], temperature=0.05), x_half)
        assert np.isfinite(value)
        assert np.all(np.isfinite(np.asarray(grad, np.float32)))


# --------------------------------------------------------------------------- Keras integration


def test_config_round_trip():
    loss = NTXentLoss(temperature=0.3, name="my_ntxent")
    config = loss.get_config()
    assert config["temperature"] == 0.3
    assert config["name"] == "my_ntxent"
    clone = NTXentLoss.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, NTXentLoss)
    assert restored.get_config() == config
    view_1, view_2 = views(np.random.default_rng(9))
    stacked = np.concatenate([view_1, view_2])
    np.testing.assert_allclose(
        float(restored(np.zeros(12), stacked)), float(loss(np.zeros(12), stacked)), rtol=1e-6
    )


def test_fit_with_views_built_in_the_model():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    encoder = keras.Sequential([keras.layers.Dense(16, activation="relu"), keras.layers.Dense(4)])
    augment = keras.layers.GaussianNoise(0.1)
    inputs = keras.Input((8,))
    stacked = keras.ops.concatenate([encoder(augment(inputs)), encoder(augment(inputs))], axis=0)
    model = keras.Model(inputs, stacked)
    model.compile(optimizer="adam", loss=NTXentLoss(temperature=0.2))
    history = model.fit(x, np.zeros(64), batch_size=16, epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2
    assert np.all(np.isfinite(history.history["loss"]))


def test_fit_with_views_stacked_in_the_input_pipeline():
    # Each batch of 16 rows is [8 first views; the 8 matching second views].
    rng = np.random.default_rng(1)
    blocks = []
    for _ in range(4):
        base = rng.normal(size=(8, 8))
        blocks += [base + 0.1 * rng.normal(size=(8, 8)), base + 0.1 * rng.normal(size=(8, 8))]
    x = np.concatenate(blocks).astype("float32")
    ids = np.tile(np.arange(8), 8).astype("int32")
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    model.compile(optimizer="adam", loss=NTXentLoss())
    history = model.fit(x, ids, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "y_true, y_pred, arg",
    [
        (np.zeros(5), np.ones((5, 2), "float32"), "y_pred"),
        (np.zeros(3), np.ones((3, 2), "float32"), "y_pred"),
        (np.zeros(4), np.ones((4,), "float32"), "y_pred"),
        (np.zeros(4), np.array([[np.nan, 1.0]] * 4, "float32"), "y_pred"),
        (np.zeros(0), np.ones((0, 2), "float32"), "y_pred"),
        (np.zeros(3), np.ones((4, 2), "float32"), "y_true"),
        (np.zeros(5), np.ones((4, 2), "float32"), "y_true"),
        (np.zeros((4, 2)), np.ones((4, 2), "float32"), "y_true"),
    ],
    ids=["odd", "odd-3", "rank", "nan", "empty", "y-true-short", "y-true-long", "y-true-rank"],
)
def test_bad_inputs_to_the_class_raise(y_true, y_pred, arg):
    with pytest.raises(ValueError, match=arg):
        NTXentLoss()(y_true, y_pred)


@pytest.mark.parametrize(
    "view_1, view_2, arg",
    [
        (np.ones((3,), "float32"), np.ones((3, 2), "float32"), "embeddings_a"),
        (np.ones((3, 2), "float32"), np.ones((3, 2, 1), "float32"), "embeddings_b"),
        (np.ones((3, 2), "float32"), np.ones((4, 2), "float32"), "same shape"),
        (np.ones((3, 2), "float32"), np.ones((3, 3), "float32"), "same shape"),
        (np.ones((0, 2), "float32"), np.ones((0, 2), "float32"), "empty"),
        (np.ones((2, 2), "float32"), np.array([[1.0, np.inf], [0.0, 1.0]], "float32"), "NaN"),
    ],
    ids=["rank-a", "rank-b", "batch", "dim", "empty", "inf"],
)
def test_bad_inputs_to_the_function_raise(view_1, view_2, arg):
    with pytest.raises(ValueError, match=arg):
        nt_xent_loss(view_1, view_2)


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_non_positive_temperature_raises(value):
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature=value)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(np.ones((2, 2)), np.ones((2, 2)), temperature=value)


# ------------------------------------------------------ pytorch-metric-learning parity (TF only)


@requires_pml
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_matches_pytorch_metric_learning(temperature):
    # PML's NTXentLoss takes the stacked views with instance ids as labels (each anchor's
    # only positive is its other view). Defaults differ: keras-dml 0.1, PML 0.07.
    torch, pml = import_pml()
    from pytorch_metric_learning import losses

    _, x = m_per_class_batch(50, classes=16, per_class=1)
    ids = np.tile(np.arange(8), 2)
    theirs = losses.NTXentLoss(temperature=temperature)
    ours = NTXentLoss(temperature=temperature, dtype="float64")
    want = pml_value_and_grads(lambda v: theirs(v, torch.tensor(ids)), x)
    assert_parity(keras_value_and_grads(lambda v: ours(np.zeros(16), v), x), want)
