"""SphereFace: ψ(θ) and the annealed logits against an arccos-based loop reference.

Backend-agnostic: runs under TensorFlow and JAX.
"""

from __future__ import annotations

import doctest
import math

import keras
import numpy as np
import pytest
from conftest import assert_head_gradients_finite, loss_gradient, mixed_precision
from keras import ops
from pml_parity import head_parity, import_pml, m_per_class_batch, requires_pml

from keras_dml.heads import SphereFace, angular_margin_psi, sphereface
from keras_dml.layers import MetricEmbedding
from keras_dml.models import MarginModel

B, D, C = 8, 4, 5


def np_(x):
    return np.asarray(ops.convert_to_numpy(x), dtype="float64")


def ref_psi(cos, m):
    theta = math.acos(max(-1.0, min(1.0, cos)))
    k = min(int(math.floor(m * theta / math.pi)), m - 1)
    return (-1) ** k * math.cos(m * theta) - 2 * k


def ref_lambda(iteration, base=1000.0, gamma=0.12, power=1.0, minimum=5.0):
    return max(minimum, base * (1 + gamma * iteration) ** (-power))


def ref_logits(x, kernel, labels, m, scale, lam):
    out = np.zeros((x.shape[0], kernel.shape[1]))
    for i in range(x.shape[0]):
        norm = math.sqrt(sum(v * v for v in x[i]))
        s = norm if scale is None else scale
        for j in range(kernel.shape[1]):
            w = kernel[:, j] / np.linalg.norm(kernel[:, j])
            cos = float(np.dot(x[i], w)) / norm
            if labels is not None and j == labels[i]:
                cos = (lam * cos + ref_psi(cos, m)) / (1 + lam)
            out[i, j] = s * cos
    return out


def ref_cross_entropy(logits, labels):
    total = 0.0
    for i, row in enumerate(logits):
        top = max(row)
        total += top + math.log(sum(math.exp(v - top) for v in row)) - row[labels[i]]
    return total / len(labels)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_psi_matches_reference_and_decreases(m):
    boundaries = [j * math.pi / m for j in range(m + 1)]
    thetas = np.concatenate([np.linspace(0.0, math.pi, 181), boundaries])
    cosines = np.cos(thetas).astype("float32")
    got = np_(angular_margin_psi(ops.convert_to_tensor(cosines), m))
    expected = [ref_psi(float(c), m) for c in cosines]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    order = np.argsort(thetas)
    assert np.all(np.diff(got[order]) <= 1e-4)  # monotonic in θ, unlike cos(mθ)
    assert got.max() == pytest.approx(1.0, abs=1e-5)
    assert got.min() == pytest.approx(1 - 2 * m, abs=1e-4)


@pytest.mark.parametrize("scale", [None, 20.0])
def test_logits_and_loss_match_reference_through_annealing(scale):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(B, D)) * 2).astype("float32")
    labels = rng.integers(0, C, size=B)
    head = SphereFace(C, scale=scale, lambda_gamma=1.0)
    head.build((None, D))
    kernel = rng.normal(size=(D, C)).astype("float32")
    head.kernel.assign(kernel)
    for iteration in range(3):  # λ = 1000 / (1 + it), the counter moves on training calls only
        lam = ref_lambda(iteration, gamma=1.0)
        assert float(np_(head.annealing_lambda())) == pytest.approx(lam, rel=1e-5)
        expected = ref_logits(x.astype("float64"), kernel.astype("float64"), labels, 4, scale, lam)
        logits = head(x, labels, training=True)
        np.testing.assert_allclose(np_(logits), expected, rtol=1e-4, atol=1e-3)
        ce = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        expected_ce = ref_cross_entropy(expected, labels)
        assert float(np_(ops.mean(ce))) == pytest.approx(expected_ce, rel=1e-4)
        assert int(np_(head.iterations)) == iteration + 1
    head(x, labels)
    head(x)
    assert int(np_(head.iterations)) == 3
    inference = ref_logits(x.astype("float64"), kernel.astype("float64"), None, 4, scale, 0.0)
    np.testing.assert_allclose(np_(head(x)), inference, rtol=1e-4, atol=1e-4)


def test_lambda_schedule_reaches_its_minimum_and_pure_psi():
    head = SphereFace(C)
    head.build((None, D))
    head.iterations.assign(10_000)
    assert float(np_(head.annealing_lambda())) == pytest.approx(5.0)
    head.iterations.assign(100)
    assert float(np_(head.annealing_lambda())) == pytest.approx(ref_lambda(100), rel=1e-5)
    pure = SphereFace(2, scale=1.0, lambda_base=0.0, lambda_min=0.0)
    pure.build((None, 2))
    pure.kernel.assign(np.eye(2, dtype="float32"))
    theta = 0.5
    x = np.array([[math.cos(theta), math.sin(theta)]], "float32")
    target = float(np_(pure(x, np.array([0])))[0, 0])
    assert target == pytest.approx(ref_psi(math.cos(theta), 4), abs=1e-5)
    assert target < math.cos(theta)  # the margin makes the target harder


def test_finite_gradients_at_cos_plus_minus_one_and_zero_embedding():
    head = SphereFace(2, lambda_base=0.0, lambda_min=0.0)  # scale = ‖x‖, pure ψ
    head.build((None, 3))
    kernel = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], "float32")
    head.kernel.assign(kernel)
    x = np.array([[2.0, 0.0, 0.0], [-3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]], "float32")
    labels = np.array([0, 0, 0, 0])  # cos θ_y = 1, -1, 0 (zero row) and 0
    assert_head_gradients_finite(head, x, labels)


def make_backbone():
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="relu"), MetricEmbedding(D, False)]
    )


def test_margin_model_fit_advances_the_schedule_and_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    y = np.arange(40) % 4
    x = (rng.normal(size=(4, 6))[y] * 3 + rng.normal(size=(40, 6))).astype("float32")
    model = MarginModel(make_backbone(), SphereFace(4, scale=16.0, lambda_gamma=1.0))
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = model.fit(x, y, epochs=3, batch_size=20, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert int(np_(model.head.iterations)) == 6  # one per training step, on every backend
    model.evaluate(x, y, verbose=0)
    assert int(np_(model.head.iterations)) == 6
    model.save(tmp_path / "sphereface.keras")
    reloaded = keras.saving.load_model(tmp_path / "sphereface.keras")
    assert reloaded.head.get_config() == model.head.get_config()
    assert int(np_(reloaded.head.iterations)) == 6


def test_no_nan_under_mixed_float16():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(B, D)) * 300.0).astype("float16")
    with_zero_row = x.copy()
    with_zero_row[0] = 0.0  # degenerate embedding: logits must stay finite
    labels = rng.integers(0, C, size=B)
    with mixed_precision("mixed_float16"):
        for head in (SphereFace(C), SphereFace(C, scale=64.0, lambda_min=0.0)):
            assert head.compute_dtype == "float32"
            logits = head(with_zero_row, labels, training=True)
            value, grad = loss_gradient(
                lambda v, h=head: ops.mean(
                    keras.losses.sparse_categorical_crossentropy(labels, h(v, labels), True)
                ),
                x,
            )
            assert ops.dtype(logits) == "float32" and np.all(np.isfinite(np_(logits)))
            assert np.isfinite(value) and np.all(np.isfinite(grad))
    assert keras.config.dtype_policy().name == "float32"


def test_config_round_trip_and_bad_arguments():
    head = SphereFace(C, margin=3, scale=30.0, lambda_base=100.0, lambda_min=1.0)
    clone = SphereFace.from_config(head.get_config())
    assert clone.get_config() == head.get_config()
    assert tuple(head(keras.Input((D,)), keras.Input((), dtype="int32")).shape) == (None, C)
    with pytest.raises(ValueError, match="margin"):
        SphereFace(C, margin=1.5)
    with pytest.raises(ValueError, match="margin"):
        SphereFace(C, margin=0)
    with pytest.raises(ValueError, match="scale"):
        SphereFace(C, scale=0.0)
    with pytest.raises(ValueError, match="lambda_min"):
        SphereFace(C, lambda_min=-1.0)


def test_docstring_example():
    assert doctest.testmod(sphereface).failed == 0


# ------------------------------------------------------ pytorch-metric-learning parity (TF only)


@requires_pml
@pytest.mark.parametrize("margin", [2, 4])
def test_matches_pytorch_metric_learning_without_annealing(margin):
    # PML's SphereFaceLoss(margin, scale=1): target logit ψ(θ) = (-1)^k cos(mθ) - 2k, every
    # logit times ‖x‖. keras-dml's default also anneals the target towards cos θ,
    # (λ cos θ + ψ) / (1 + λ) with λ from 1000 down to 5 (the paper's training recipe),
    # which PML does not: with lambda_base = lambda_min = 0 (λ = 0) they are the same loss.
    torch, pml = import_pml()
    from pytorch_metric_learning import losses

    labels, x = m_per_class_batch(90, classes=5, per_class=4, dim=8)
    kernel = np.random.default_rng(190).normal(size=(8, 5))
    x = x + 1.5 * (kernel / np.linalg.norm(kernel, axis=0))[:, labels].T
    theirs = losses.SphereFaceLoss(num_classes=5, embedding_size=8, margin=margin, scale=1)
    head = SphereFace(5, margin=margin, lambda_base=0.0, lambda_min=0.0)
    head_parity(head, theirs, labels, x, kernel)
