"""CircleLoss against a naive loop reference and keras.losses.Circle (backend-agnostic)."""

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

from keras_dml.losses.circle import CircleLoss, circle_loss

DISTANCES = ["cosine", "dot", "euclidean"]


def ref_similarity(a, b, distance):
    """One pair, float64, as the loss sees it (a similarity: larger is closer)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    dot = sum(a[k] * b[k] for k in range(len(a)))
    if distance == "cosine":
        norms = max(math.sqrt(a @ a), 1e-6) * max(math.sqrt(b @ b), 1e-6)
        return min(max(dot / norms, -1.0), 1.0)
    if distance == "dot":
        return dot
    if distance == "euclidean":
        return -math.sqrt(sum((a[k] - b[k]) ** 2 for k in range(len(a))))
    raise ValueError(distance)


def ref_logsumexp(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def ref_softplus(v):
    return max(v, 0.0) + math.log1p(math.exp(-abs(v)))


def ref_circle_per_anchor(
    labels, x, margin=0.25, gamma=256.0, distance="cosine", weights_from=None
):
    """Per-anchor losses (None for anchors without a positive or a negative).

    `weights_from` computes the weights alpha from other embeddings, so that a
    finite difference of this function is the gradient with alpha held constant.
    """
    weights_from = x if weights_from is None else weights_from
    n = len(labels)
    out = []
    for i in range(n):
        pos_logits, neg_logits = [], []
        for j in range(n):
            if j == i:
                continue
            s = ref_similarity(x[i], x[j], distance)
            s_weight = ref_similarity(weights_from[i], weights_from[j], distance)
            if labels[j] == labels[i]:
                alpha_p = max(1.0 + margin - s_weight, 0.0)
                pos_logits.append(-gamma * alpha_p * (s - (1.0 - margin)))
            else:
                alpha_n = max(s_weight + margin, 0.0)
                neg_logits.append(gamma * alpha_n * (s - margin))
        if pos_logits and neg_logits:
            out.append(ref_softplus(ref_logsumexp(neg_logits) + ref_logsumexp(pos_logits)))
        else:
            out.append(None)
    return out


def ref_circle(labels, x, margin=0.25, gamma=256.0, distance="cosine", weights_from=None):
    values = [
        v
        for v in ref_circle_per_anchor(labels, x, margin, gamma, distance, weights_from)
        if v is not None
    ]
    return sum(values) / len(values) if values else 0.0


def batch(rng, n=10, dim=4, classes=3, scale=0.5, normalize=False):
    labels = rng.integers(0, classes, size=n)
    x = scale * rng.normal(size=(n, dim))
    if normalize:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return labels, x.astype("float32")


def numeric_gradient(f, x, eps=1e-5):
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += eps
        down[idx] -= eps
        grad[idx] = (f(up) - f(down)) / (2 * eps)
    return grad


HYPERPARAMETERS = [(0.25, 256.0), (0.4, 80.0), (0.1, 16.0)]


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("margin, gamma", HYPERPARAMETERS, ids=["paper", "keras", "small"])
def test_matches_reference(distance, margin, gamma):
    rng = np.random.default_rng(0)
    loss = CircleLoss(margin=margin, gamma=gamma, distance=distance)
    for classes in (2, 3, 5):
        labels, x = batch(rng, classes=classes)
        want = ref_circle(labels, x, margin, gamma, distance)
        np.testing.assert_allclose(float(loss(labels, x)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("margin, gamma", HYPERPARAMETERS, ids=["paper", "keras", "small"])
def test_values_agree_with_keras_circle(margin, gamma):
    """Same value as keras.losses.Circle on normalised embeddings (its mean skips zero losses)."""
    rng = np.random.default_rng(1)
    # Class 4 never repeats below, so some anchors lack positives: both losses skip them.
    for labels in (np.array([0, 0, 1, 1, 2, 2, 0, 1]), np.array([0, 0, 1, 1, 2, 3, 0, 4])):
        _, x = batch(rng, n=len(labels), normalize=True)
        ours = float(CircleLoss(margin=margin, gamma=gamma)(labels, x))
        theirs = float(keras.losses.Circle(gamma=gamma, margin=margin)(labels, x))
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
        # Keras's "sum" reduction adds the per-anchor losses: ours times the anchors counted.
        per_anchor = ref_circle_per_anchor(labels, x, margin, gamma)
        counted = sum(v is not None for v in per_anchor)
        summed = float(keras.losses.Circle(gamma=gamma, margin=margin, reduction="sum")(labels, x))
        np.testing.assert_allclose(summed, ours * counted, rtol=1e-5, atol=1e-4)


def test_normalises_its_inputs_unlike_keras_circle():
    rng = np.random.default_rng(2)
    labels, x = batch(rng, classes=3, normalize=True)
    np.testing.assert_allclose(
        float(CircleLoss()(labels, 3.0 * x)), float(CircleLoss()(labels, x)), rtol=1e-5
    )


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_gradient_treats_weights_as_constants(distance):
    rng = np.random.default_rng(3)
    labels, x = batch(rng, n=7, dim=3, classes=2)
    margin, gamma = 0.25, 8.0
    value, grad = loss_gradient(
        lambda v: circle_loss(labels, v, margin=margin, gamma=gamma, distance=distance), x
    )
    frozen = lambda z: ref_circle(labels, z, margin, gamma, distance, weights_from=x)
    full = lambda z: ref_circle(labels, z, margin, gamma, distance)
    np.testing.assert_allclose(value, full(x), rtol=1e-5)
    np.testing.assert_allclose(grad, numeric_gradient(frozen, x), rtol=1e-3, atol=1e-4)
    # Differentiating through the weights (as keras.losses.Circle does) gives another gradient.
    assert not np.allclose(grad, numeric_gradient(full, x), rtol=1e-2, atol=1e-3)


# --------------------------------------------------------------------------- degenerate input

DEGENERATE = [
    (np.zeros(5, "int32"), np.eye(5, 3, dtype="float32")),
    (np.arange(5), np.eye(5, 3, dtype="float32")),
    (np.array([2]), np.ones((1, 3), "float32")),
    (np.array([0, 0, 1, 1]), np.ones((4, 3), "float32")),
    (np.array([0, 0, 1, 1, 2]), np.array([[1, 2], [1, 2], [1, 2], [0, 0], [0, 0]], "float32")),
]
DEGENERATE_IDS = ["one-class", "all-distinct", "single", "all-identical", "duplicates-and-zeros"]


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("labels, x", DEGENERATE, ids=DEGENERATE_IDS)
def test_degenerate_batches_are_finite_and_match_reference(distance, labels, x):
    loss = CircleLoss(distance=distance)
    value, grad = loss_gradient(lambda v: loss(labels, v), x)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(value, ref_circle(labels, x, distance=distance), rtol=1e-5)


def test_no_positive_or_single_class_gives_zero():
    x = np.random.default_rng(1).normal(size=(4, 3)).astype("float32")
    assert float(CircleLoss()(np.arange(4), x)) == 0.0
    assert float(CircleLoss()(np.zeros(4, "int32"), x)) == 0.0


def test_large_gamma_and_dot_products_stay_finite():
    rng = np.random.default_rng(6)
    labels, x = batch(rng, classes=3, scale=10.0)
    for loss in (CircleLoss(gamma=256.0, distance="dot"), CircleLoss(gamma=1024.0)):
        value, grad = loss_gradient(lambda v, loss=loss: loss(labels, v), x)
        assert np.isfinite(value) and value > 0
        assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_half_precision_inputs_and_model_outputs(policy):
    rng = np.random.default_rng(1)
    labels, x = batch(rng, classes=3)
    half = policy.split("_")[1]
    loss = CircleLoss()
    with mixed_precision(policy):
        value = float(loss(labels, keras.ops.cast(x, half)))
        assert np.isfinite(value)
        np.testing.assert_allclose(value, float(loss(labels, x)), rtol=0.05)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        assert keras.backend.standardize_dtype(model(x).dtype) == half
        value, grad = loss_gradient(lambda v: loss(labels, model(v)), x)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad))
    assert keras.config.dtype_policy().name == "float32"


# --------------------------------------------------------------------------- Keras integration


def test_config_round_trip():
    loss = CircleLoss(margin=0.4, gamma=80.0, distance="dot")
    config = loss.get_config()
    assert {k: config[k] for k in ("margin", "gamma", "distance")} == {
        "margin": 0.4,
        "gamma": 80.0,
        "distance": "dot",
    }
    assert CircleLoss.from_config(config).get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, CircleLoss)
    assert restored.get_config() == config
    labels, x = batch(np.random.default_rng(2))
    np.testing.assert_allclose(float(restored(labels, x)), float(loss(labels, x)), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, arg", [(dict(gamma=0.0), "gamma"), (dict(distance="l1"), "distance")]
)
def test_bad_hyperparameters_raise(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        CircleLoss(**kwargs)


# ------------------------------------------------------ pytorch-metric-learning parity (TF only)


@requires_pml
@pytest.mark.parametrize("margin, gamma", [(0.25, 256.0), (0.4, 80.0)])
def test_matches_pytorch_metric_learning(margin, gamma):
    # Same loss, same reduction (mean over anchors with a positive and a negative). Only the
    # defaults differ: keras-dml m=0.25, gamma=256 (the paper's face setting), PML m=0.4, 80.
    torch, pml = import_pml()
    from pytorch_metric_learning import losses

    labels, x = m_per_class_batch(30)
    labels[labels == 5] = 6  # one singleton class: an anchor without a positive drops out
    labels[np.flatnonzero(labels == 6)[:3]] = 5
    theirs = losses.CircleLoss(m=margin, gamma=gamma)
    ours = CircleLoss(margin=margin, gamma=gamma, dtype="float64")
    want = pml_value_and_grads(lambda v: theirs(v, torch.tensor(labels)), x)
    assert_parity(keras_value_and_grads(lambda v: ours(labels, v), x), want)
