"""ContrastiveLoss against a naive loop reference (backend-agnostic)."""

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

from keras_dml.losses.contrastive import ContrastiveLoss, contrastive_loss

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


def ref_contrastive(labels, x, pos_margin=0.0, neg_margin=1.0, squared=False, distance="euclidean"):
    pos, neg = [], []
    for i in range(len(labels)):
        for j in range(len(labels)):
            if i == j:
                continue
            d = ref_distance(x[i], x[j], distance)
            if labels[i] == labels[j]:
                term = max(d - pos_margin, 0.0)
                pos.append(term**2 if squared else term)
            else:
                term = max(neg_margin - d, 0.0)
                neg.append(term**2 if squared else term)
    mean_pos = sum(pos) / len(pos) if pos else 0.0
    mean_neg = sum(neg) / len(neg) if neg else 0.0
    return mean_pos + mean_neg


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
@pytest.mark.parametrize("squared", [False, True])
def test_matches_reference(distance, squared):
    rng = np.random.default_rng(0)
    for pos_margin, neg_margin in ((0.0, 1.0), (0.2, 0.8), (0.5, 2.0)):
        loss = ContrastiveLoss(
            pos_margin=pos_margin, neg_margin=neg_margin, squared=squared, distance=distance
        )
        for classes in (2, 3, 5):
            labels, x = batch(rng, n=10, classes=classes)
            want = ref_contrastive(labels, x, pos_margin, neg_margin, squared, distance)
            np.testing.assert_allclose(float(loss(labels, x)), want, rtol=1e-5, atol=1e-6)


def test_function_equals_class_and_hand_computed_value():
    labels = np.array([0, 0, 1, 1])
    x = np.array([[0.0, 0.0], [0.0, 0.5], [0.0, 0.6], [0.0, 1.2]], "float32")
    # Positive distances 0.5, 0.6; negative hinge terms 0.4, 0, 0.9, 0.3.
    want = (0.5 + 0.6) / 2 + (0.4 + 0.0 + 0.9 + 0.3) / 4
    np.testing.assert_allclose(float(contrastive_loss(labels, x)), want, rtol=1e-6)
    np.testing.assert_allclose(float(ContrastiveLoss()(labels, x)), want, rtol=1e-6)


@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
@pytest.mark.parametrize("squared", [False, True])
def test_gradient_matches_finite_differences(distance, squared):
    rng = np.random.default_rng(3)
    labels, x = batch(rng, n=7, dim=3, classes=2)
    kwargs = dict(pos_margin=0.1, neg_margin=1.0, squared=squared, distance=distance)
    value, grad = loss_gradient(lambda v: contrastive_loss(labels, v, **kwargs), x)
    want = numeric_gradient(lambda z: ref_contrastive(labels, z, **kwargs), x)
    np.testing.assert_allclose(value, ref_contrastive(labels, x, **kwargs), rtol=1e-5)
    np.testing.assert_allclose(grad, want, rtol=1e-3, atol=1e-4)


def test_gradient_through_class_matches_function():
    rng = np.random.default_rng(4)
    labels, x = batch(rng, n=9, classes=3)
    _, through_class = loss_gradient(lambda v: ContrastiveLoss(squared=True)(labels, v), x)
    _, through_fn = loss_gradient(lambda v: contrastive_loss(labels, v, squared=True), x)
    np.testing.assert_allclose(through_class, through_fn, rtol=1e-6, atol=1e-7)


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
    loss = ContrastiveLoss(pos_margin=0.1, distance=distance)
    value, grad = loss_gradient(lambda v: loss(labels, v), x)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(
        value, ref_contrastive(labels, x, 0.1, 1.0, False, distance), rtol=1e-5, atol=1e-6
    )
    squared = float(ContrastiveLoss(pos_margin=0.1, squared=True, distance=distance)(labels, x))
    np.testing.assert_allclose(
        squared, ref_contrastive(labels, x, 0.1, 1.0, True, distance), rtol=1e-5, atol=1e-6
    )


def test_single_sample_and_no_pairs_give_zero():
    assert float(ContrastiveLoss()(np.array([3]), np.ones((1, 4), "float32"))) == 0.0
    # All labels distinct: only negatives, all farther than the margin.
    x = 5.0 * np.eye(4, dtype="float32")
    assert float(ContrastiveLoss()(np.arange(4), x)) == 0.0


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_half_precision_inputs_and_model_outputs(policy):
    rng = np.random.default_rng(1)
    labels, x = batch(rng, n=10, classes=3)
    half = policy.split("_")[1]
    loss = ContrastiveLoss(squared=True)
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
    loss = ContrastiveLoss(pos_margin=0.2, neg_margin=0.7, squared=True, distance="cosine")
    config = loss.get_config()
    assert {k: config[k] for k in ("pos_margin", "neg_margin", "squared", "distance")} == {
        "pos_margin": 0.2,
        "neg_margin": 0.7,
        "squared": True,
        "distance": "cosine",
    }
    clone = ContrastiveLoss.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, ContrastiveLoss)
    assert restored.get_config() == config
    labels, x = batch(np.random.default_rng(2))
    np.testing.assert_allclose(float(restored(labels, x)), float(loss(labels, x)), rtol=1e-6)


def test_unknown_distance_raises():
    with pytest.raises(ValueError, match="distance"):
        ContrastiveLoss(distance="manhattan")


# ------------------------------------------------------ pytorch-metric-learning parity (TF only)


def _pml_distance(name):
    """PML's distance for a keras-dml distance name, and how its margins map to ours."""
    from pytorch_metric_learning import distances

    if name == "cosine":
        # PML's CosineSimilarity is a similarity s; keras-dml's "cosine" distance is 1 - s, so
        # its hinges max(d - m_pos, 0), max(m_neg - d, 0) are PML's with margins 1 - m.
        return distances.CosineSimilarity(), lambda margin: 1.0 - margin
    power = 2 if name == "squared_euclidean" else 1
    return distances.LpDistance(normalize_embeddings=False, power=power), lambda margin: margin


@requires_pml
@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
@pytest.mark.parametrize("pos_margin, neg_margin", [(0.0, 1.0), (0.3, 2.0)])
def test_matches_pytorch_metric_learning_with_mean_reducer(distance, pos_margin, neg_margin):
    # keras-dml averages each kind of pair over all of them; that is PML's ContrastiveLoss
    # with MeanReducer (PML's default reducer, AvgNonZero, is checked in the next test).
    torch, pml = import_pml()
    from pytorch_metric_learning import losses, reducers

    labels, x = m_per_class_batch(10, scale=0.4)
    pml_distance, margin = _pml_distance(distance)
    theirs = losses.ContrastiveLoss(pos_margin=margin(pos_margin), neg_margin=margin(neg_margin),
                                    distance=pml_distance, reducer=reducers.MeanReducer())
    ours = ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin, distance=distance,
                           dtype="float64")
    want = pml_value_and_grads(lambda v: theirs(v, torch.tensor(labels)), x)
    assert_parity(keras_value_and_grads(lambda v: ours(labels, v), x), want)


@requires_pml
def test_differs_from_pytorch_metric_learning_default_reducer_on_purpose():
    # PML's default AvgNonZeroReducer divides each kind's sum by its pairs with a non-zero
    # hinge; keras-dml by all pairs of that kind, so negatives already beyond the margin
    # still dilute the push (and a batch does not get a larger loss as it gets easier).
    torch, pml = import_pml()
    from pytorch_metric_learning import losses

    labels, x = m_per_class_batch(11, scale=0.4)
    theirs = losses.ContrastiveLoss(distance=_pml_distance("euclidean")[0])
    want = theirs(torch.tensor(x), torch.tensor(labels)).item()
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    same, off_diagonal = labels[:, None] == labels[None], ~np.eye(len(labels), dtype=bool)
    positive_terms = d[same & off_diagonal]
    negative_terms = np.maximum(1.0 - d[~same], 0.0)
    assert 0 < np.count_nonzero(negative_terms) < negative_terms.size
    pml_reference = positive_terms.mean() + negative_terms.sum() / np.count_nonzero(negative_terms)
    np.testing.assert_allclose(want, pml_reference, rtol=1e-5)
    ours = float(ContrastiveLoss(dtype="float64")(labels, x))
    np.testing.assert_allclose(ours, positive_terms.mean() + negative_terms.mean(), rtol=1e-5)
    assert ours < want
