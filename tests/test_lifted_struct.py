"""LiftedStructLoss against a naive loop reference (backend-agnostic)."""

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

from keras_dml.losses.lifted_struct import LiftedStructLoss, lifted_struct_loss

DISTANCES = ["euclidean", "squared_euclidean", "cosine", "angular", "dot"]


def ref_distance(a, b, distance):
    """One pair, float64, as the loss sees it (a distance: smaller is closer)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    dot = sum(a[k] * b[k] for k in range(len(a)))
    if distance == "euclidean":
        return math.sqrt(sum((a[k] - b[k]) ** 2 for k in range(len(a))))
    if distance == "squared_euclidean":
        return sum((a[k] - b[k]) ** 2 for k in range(len(a)))
    if distance in ("cosine", "angular"):
        norms = max(math.sqrt(a @ a), 1e-6) * max(math.sqrt(b @ b), 1e-6)
        cos = min(max(dot / norms, -1.0), 1.0)
        return 1.0 - cos if distance == "cosine" else max(1.0 - cos, 0.0)
    if distance == "dot":
        return -dot
    raise ValueError(distance)


def ref_lifted_struct(labels, x, margin=1.0, distance="euclidean"):
    """Song et al.'s formula over unordered positive pairs i < j."""
    n = len(labels)
    total, num_pairs = 0.0, 0
    for i in range(n):
        for j in range(i + 1, n):
            if labels[i] != labels[j]:
                continue
            num_pairs += 1
            terms = [
                margin - ref_distance(x[i], x[k], distance)
                for k in range(n)
                if labels[k] != labels[i]
            ]
            terms += [
                margin - ref_distance(x[j], x[k], distance)
                for k in range(n)
                if labels[k] != labels[j]
            ]
            if not terms:  # log(0) = -inf: the hinge is 0.
                continue
            top = max(terms)
            j_ij = top + math.log(sum(math.exp(t - top) for t in terms))
            j_ij += ref_distance(x[i], x[j], distance)
            total += max(j_ij, 0.0) ** 2
    return total / (2 * num_pairs) if num_pairs else 0.0


def batch(rng, n=10, dim=4, classes=3, scale=0.5):
    labels = rng.integers(0, classes, size=n)
    return labels, (scale * rng.normal(size=(n, dim))).astype("float32")


def numeric_gradient(f, x, eps=1e-5):
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += eps
        down[idx] -= eps
        grad[idx] = (f(up) - f(down)) / (2 * eps)
    return grad


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("margin", [1.0, 0.2, 3.0])
def test_matches_reference(distance, margin):
    rng = np.random.default_rng(0)
    loss = LiftedStructLoss(margin=margin, distance=distance)
    for classes in (2, 3, 5):
        labels, x = batch(rng, classes=classes)
        want = ref_lifted_struct(labels, x, margin, distance)
        np.testing.assert_allclose(float(loss(labels, x)), want, rtol=1e-5, atol=1e-6)


def test_hand_computed_value():
    labels = np.array([0, 0, 1, 1])
    x = np.array([[0.0, 0.0], [0.0, 0.5], [0.0, 0.6], [0.0, 1.2]], "float32")
    # Both pairs see the same four negative distances 0.6, 1.2, 0.1, 0.7.
    lse = math.log(sum(math.exp(1.0 - d) for d in (0.6, 1.2, 0.1, 0.7)))
    want = ((lse + 0.5) ** 2 + (lse + 0.6) ** 2) / (2 * 2)
    np.testing.assert_allclose(float(lifted_struct_loss(labels, x)), want, rtol=1e-5)
    np.testing.assert_allclose(float(LiftedStructLoss()(labels, x)), want, rtol=1e-5)


def test_well_separated_classes_give_zero():
    labels = np.array([0, 0, 1, 1])
    x = np.array([[0.0, 0.0], [0.0, 0.1], [10.0, 0.0], [10.0, 0.1]], "float32")
    assert float(LiftedStructLoss()(labels, x)) == 0.0


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_gradient_matches_finite_differences(distance):
    rng = np.random.default_rng(3)
    labels, x = batch(rng, n=7, dim=3, classes=2)
    value, grad = loss_gradient(
        lambda v: lifted_struct_loss(labels, v, margin=0.5, distance=distance), x
    )
    ref = lambda z: ref_lifted_struct(labels, z, 0.5, distance)
    np.testing.assert_allclose(value, ref(x), rtol=1e-5)
    np.testing.assert_allclose(grad, numeric_gradient(ref, x), rtol=1e-3, atol=1e-4)


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
    loss = LiftedStructLoss(distance=distance)
    value, grad = loss_gradient(lambda v: loss(labels, v), x)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad))
    want = ref_lifted_struct(labels, x, distance=distance)
    np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6)


def test_no_positive_or_single_class_gives_zero():
    x = np.random.default_rng(1).normal(size=(4, 3)).astype("float32")
    assert float(LiftedStructLoss()(np.arange(4), x)) == 0.0
    assert float(LiftedStructLoss()(np.zeros(4, "int32"), x)) == 0.0


def test_large_margin_and_distances_stay_finite():
    rng = np.random.default_rng(6)
    labels, x = batch(rng, classes=3, scale=100.0)
    for loss in (LiftedStructLoss(margin=200.0), LiftedStructLoss(distance="dot")):
        value, grad = loss_gradient(lambda v, loss=loss: loss(labels, v), x)
        assert np.isfinite(value)
        assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_half_precision_inputs_and_model_outputs(policy):
    rng = np.random.default_rng(1)
    labels, x = batch(rng, classes=3)
    half = policy.split("_")[1]
    loss = LiftedStructLoss()
    with mixed_precision(policy):
        value = float(loss(labels, keras.ops.cast(x, half)))
        assert np.isfinite(value)
        np.testing.assert_allclose(value, float(loss(labels, x)), rtol=0.05, atol=0.02)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        assert keras.backend.standardize_dtype(model(x).dtype) == half
        value, grad = loss_gradient(lambda v: loss(labels, model(v)), x)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad))
    assert keras.config.dtype_policy().name == "float32"


# --------------------------------------------------------------------------- Keras integration


def test_config_round_trip():
    loss = LiftedStructLoss(margin=0.5, distance="cosine")
    config = loss.get_config()
    assert (config["margin"], config["distance"]) == (0.5, "cosine")
    assert LiftedStructLoss.from_config(config).get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, LiftedStructLoss)
    assert restored.get_config() == config
    labels, x = batch(np.random.default_rng(2))
    np.testing.assert_allclose(float(restored(labels, x)), float(loss(labels, x)), rtol=1e-6)


def test_unknown_distance_raises():
    with pytest.raises(ValueError, match="distance"):
        LiftedStructLoss(distance="manhattan")


# ------------------------------------------------------ pytorch-metric-learning parity (TF only)


@requires_pml
@pytest.mark.parametrize("margin", [1.0, 0.5])
def test_matches_pytorch_metric_learning(margin):
    # keras-dml's LiftedStructLoss is PML's LiftedStructureLoss (Song et al.: per positive
    # pair, the negatives of both members; squared hinge halved), not PML's
    # GeneralizedLiftedStructureLoss (Hermans et al.'s per-anchor form). PML's default
    # distance normalises the embeddings; keras-dml's "euclidean" does not, so PML gets
    # LpDistance(normalize_embeddings=False).
    torch, pml = import_pml()
    from pytorch_metric_learning import distances, losses

    labels, x = m_per_class_batch(40, scale=0.3)
    theirs = losses.LiftedStructureLoss(
        neg_margin=margin, pos_margin=0.0,
        distance=distances.LpDistance(normalize_embeddings=False))
    ours = LiftedStructLoss(margin=margin, dtype="float64")
    want = pml_value_and_grads(lambda v: theirs(v, torch.tensor(labels)), x)
    assert_parity(keras_value_and_grads(lambda v: ours(labels, v), x), want)
