"""MultiSimilarityLoss against a naive loop reference (backend-agnostic)."""

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

from keras_dml.losses.multi_similarity import MultiSimilarityLoss, multi_similarity_loss

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


def ref_multi_similarity(labels, x, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1, distance="cosine"):
    """The authors' per-anchor loop, with the anchor excluded by index."""
    n = len(labels)
    total = 0.0
    for i in range(n):
        pos = [
            ref_similarity(x[i], x[j], distance)
            for j in range(n)
            if j != i and labels[j] == labels[i]
        ]
        neg = [ref_similarity(x[i], x[j], distance) for j in range(n) if labels[j] != labels[i]]
        if not pos or not neg:
            continue
        mined_pos = [s for s in pos if s - epsilon < max(neg)]
        mined_neg = [s for s in neg if s + epsilon > min(pos)]
        if not mined_pos or not mined_neg:
            continue
        pos_loss = math.log(1 + sum(math.exp(-alpha * (s - base)) for s in mined_pos)) / alpha
        neg_loss = math.log(1 + sum(math.exp(beta * (s - base)) for s in mined_neg)) / beta
        total += pos_loss + neg_loss
    return total / n


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


HYPERPARAMETERS = [
    dict(alpha=2.0, beta=50.0, base=0.5, epsilon=0.1),
    dict(alpha=1.0, beta=10.0, base=0.0, epsilon=0.3),
    dict(alpha=4.0, beta=40.0, base=-1.0, epsilon=0.0),
]


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("hyper", HYPERPARAMETERS, ids=["default", "wide", "no-mining-margin"])
def test_matches_reference(distance, hyper):
    rng = np.random.default_rng(0)
    loss = MultiSimilarityLoss(distance=distance, **hyper)
    for classes in (2, 3, 5):
        labels, x = batch(rng, classes=classes)
        want = ref_multi_similarity(labels, x, distance=distance, **hyper)
        np.testing.assert_allclose(float(loss(labels, x)), want, rtol=1e-5, atol=1e-6)


def test_mining_drops_easy_pairs_and_whole_anchors():
    # Anchor 0's positive (sim 0.9) is much closer than its negative (sim 0), so
    # neither survives mining; the anchor contributes 0 but still counts in B.
    labels = np.array([0, 0, 1])
    x = np.array([[1.0, 0.0], [0.9, math.sqrt(1 - 0.81)], [0.0, 1.0]], "float32")
    got = float(multi_similarity_loss(labels, x))
    assert got == 0.0
    np.testing.assert_allclose(got, ref_multi_similarity(labels, x), atol=1e-7)
    # With a huge mining margin every pair is kept: anchor 0 and 1 contribute, divided by 3.
    got = float(multi_similarity_loss(labels, x, epsilon=10.0))
    one = math.log(1 + math.exp(-2 * 0.4)) / 2 + math.log(1 + math.exp(50 * -0.5)) / 50
    two = math.log(1 + math.exp(-2 * 0.4)) / 2 + math.log(1 + math.exp(50 * (0.43589 - 0.5))) / 50
    np.testing.assert_allclose(got, (one + two) / 3, rtol=1e-4)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_gradient_matches_finite_differences(distance):
    rng = np.random.default_rng(3)
    labels, x = batch(rng, n=7, dim=3, classes=2)
    hyper = dict(alpha=2.0, beta=10.0, base=0.0, epsilon=0.5)
    value, grad = loss_gradient(
        lambda v: multi_similarity_loss(labels, v, distance=distance, **hyper), x
    )
    ref = lambda z: ref_multi_similarity(labels, z, distance=distance, **hyper)
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
    loss = MultiSimilarityLoss(distance=distance)
    value, grad = loss_gradient(lambda v: loss(labels, v), x)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad))
    want = ref_multi_similarity(labels, x, distance=distance)
    np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6)


def test_no_positive_or_single_class_gives_zero():
    x = np.random.default_rng(1).normal(size=(4, 3)).astype("float32")
    assert float(MultiSimilarityLoss()(np.arange(4), x)) == 0.0
    assert float(MultiSimilarityLoss()(np.zeros(4, "int32"), x)) == 0.0


def test_large_scales_stay_finite():
    rng = np.random.default_rng(6)
    labels, x = batch(rng, classes=3, scale=30.0)
    loss = MultiSimilarityLoss(alpha=20.0, beta=500.0, distance="dot")
    value, grad = loss_gradient(lambda v: loss(labels, v), x)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_half_precision_inputs_and_model_outputs(policy):
    rng = np.random.default_rng(1)
    labels, x = batch(rng, classes=3)
    half = policy.split("_")[1]
    loss = MultiSimilarityLoss()
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
    loss = MultiSimilarityLoss(alpha=1.5, beta=30.0, base=0.3, epsilon=0.2, distance="dot")
    config = loss.get_config()
    assert {k: config[k] for k in ("alpha", "beta", "base", "epsilon", "distance")} == {
        "alpha": 1.5,
        "beta": 30.0,
        "base": 0.3,
        "epsilon": 0.2,
        "distance": "dot",
    }
    assert MultiSimilarityLoss.from_config(config).get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, MultiSimilarityLoss)
    assert restored.get_config() == config
    labels, x = batch(np.random.default_rng(2))
    np.testing.assert_allclose(float(restored(labels, x)), float(loss(labels, x)), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, arg",
    [(dict(alpha=0.0), "alpha"), (dict(beta=-1.0), "beta"), (dict(distance="hamming"), "distance")],
)
def test_bad_hyperparameters_raise(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        MultiSimilarityLoss(**kwargs)


# ------------------------------------------------------ pytorch-metric-learning parity (TF only)


@requires_pml
@pytest.mark.parametrize("alpha, beta, base", [(2.0, 50.0, 0.5), (1.0, 10.0, 0.2)])
def test_matches_pytorch_metric_learning_without_mining(alpha, beta, base):
    # A mining margin epsilon larger than any similarity gap keeps every pair: then keras-dml's
    # loss is PML's MultiSimilarityLoss with no miner (mean over all B anchors).
    torch, pml = import_pml()
    from pytorch_metric_learning import losses

    labels, x = m_per_class_batch(20)
    theirs = losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base)
    ours = MultiSimilarityLoss(alpha=alpha, beta=beta, base=base, epsilon=3.0, dtype="float64")
    want = pml_value_and_grads(lambda v: theirs(v, torch.tensor(labels)), x)
    assert_parity(keras_value_and_grads(lambda v: ours(labels, v), x), want)


@requires_pml
@pytest.mark.parametrize("epsilon", [0.1, 0.3])
def test_mined_matches_pytorch_metric_learning_miner_and_loss(epsilon):
    # keras-dml mines inside the loss; PML needs MultiSimilarityMiner(epsilon) passed to
    # MultiSimilarityLoss. The pairs are the same, and so is the treatment of an anchor:
    # "a mined positive exists" and "a mined negative exists" are both
    # min(S_ap) - epsilon < max(S_an), so an anchor has both kinds or neither (then 0 in both,
    # and both divide by B).
    torch, pml = import_pml()
    from pytorch_metric_learning import losses, miners

    labels, noise = m_per_class_batch(21, classes=4, per_class=6, dim=4)
    # Clustered classes, so that some anchors' positives are all clearly the closest.
    x = 2.0 * np.random.default_rng(22).normal(size=(4, 4))[labels] + noise
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = z @ z.T
    same = labels[:, None] == labels[None]
    hardest_positive = np.where(same & ~np.eye(len(labels), dtype=bool), s, np.inf).min(1)
    hardest_negative = np.where(same, -np.inf, s).max(1)
    no_pair = hardest_positive - epsilon >= hardest_negative
    assert no_pair.any() and not no_pair.all(), "want anchors with and without mined pairs"
    miner = miners.MultiSimilarityMiner(epsilon=epsilon)
    loss = losses.MultiSimilarityLoss()
    y = torch.tensor(labels)
    want = pml_value_and_grads(lambda v: loss(v, y, miner(v, y)), x)
    ours = MultiSimilarityLoss(epsilon=epsilon, dtype="float64")
    assert_parity(keras_value_and_grads(lambda v: ours(labels, v), x), want)
