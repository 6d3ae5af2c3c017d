"""QuadrupletLoss against a naive loop over (anchor, positive, negative pair) quadruplets.

Backend-agnostic: runs under TensorFlow and JAX.
"""

from __future__ import annotations

import doctest
import math

import keras
import numpy as np
import pytest
from conftest import loss_gradient, mixed_precision
from keras import ops

from keras_dml.layers import L2Normalize
from keras_dml.losses import quadruplet
from keras_dml.losses.quadruplet import QuadrupletLoss, hardest_negative_pair, quadruplet_loss


def ref_distance(a, b, distance):
    if distance == "euclidean":
        return math.sqrt(max(float(np.sum((a - b) ** 2)), 0.0))
    if distance == "squared_euclidean":
        return float(np.sum((a - b) ** 2))
    if distance == "cosine":  # as a distance: 1 - cos
        return 1.0 - float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    raise ValueError(distance)


def ref_quadruplet(labels, x, margin, pair_margin, negative_mining, positive_mining, distance):
    """Every (a, p); its triplet negative; the hardest valid (n1, n2) by a double loop."""
    n = len(labels)
    d = [[ref_distance(x[i], x[j], distance) for j in range(n)] for i in range(n)]
    triplet_terms, pair_terms = [], []
    for a in range(n):
        positives = [p for p in range(n) if p != a and labels[p] == labels[a]]
        negatives = [k for k in range(n) if labels[k] != labels[a]]
        if not positives or not negatives:
            continue
        if positive_mining == "hard":
            positives = [max(positives, key=lambda p: d[a][p])]
        pair_d = None
        for i in range(n):
            for j in range(n):
                if labels[i] != labels[j] and labels[a] not in (labels[i], labels[j]):
                    pair_d = d[i][j] if pair_d is None else min(pair_d, d[i][j])
        for p in positives:
            if negative_mining == "hard":
                neg = min(d[a][k] for k in negatives)
            else:  # semi-hard, tensorflow-addons' rule
                farther = [d[a][k] for k in negatives if d[a][k] > d[a][p]]
                neg = min(farther) if farther else max(d[a][k] for k in negatives)
            triplet_terms.append(max(d[a][p] - neg + margin, 0.0))
            if pair_d is not None:
                pair_terms.append(max(d[a][p] - pair_d + pair_margin, 0.0))
    mean = lambda v: sum(v) / len(v) if v else 0.0  # noqa: E731
    return mean(triplet_terms) + mean(pair_terms)


def batch(seed, n=12, classes=4, dim=3):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    return labels, rng.normal(size=(n, dim)).astype("float32")


@pytest.mark.parametrize(
    "seed, negative_mining, positive_mining, distance",
    [
        (0, "semi-hard", "all", "euclidean"),
        (1, "hard", "all", "squared_euclidean"),
        (2, "semi-hard", "hard", "cosine"),
        (3, "hard", "hard", "euclidean"),
    ],
)
def test_matches_naive_reference(seed, negative_mining, positive_mining, distance):
    labels, x = batch(seed)
    loss = QuadrupletLoss(
        margin=0.3,
        pair_margin=0.4,
        negative_mining=negative_mining,
        positive_mining=positive_mining,
        distance=distance,
    )
    expected = ref_quadruplet(
        labels, x.astype("float64"), 0.3, 0.4, negative_mining, positive_mining, distance
    )
    assert expected > 0
    np.testing.assert_allclose(float(loss(labels, x)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed, classes", [(0, 3), (1, 5), (2, 9)])
def test_hardest_negative_pair_is_exact(seed, classes):
    labels, x = batch(seed, n=16, classes=classes)
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    got, has = hardest_negative_pair(ops.convert_to_tensor(d.astype("float32")), labels)
    for a in range(len(labels)):
        valid = [
            d[i, j]
            for i in range(len(labels))
            for j in range(len(labels))
            if labels[i] != labels[j] and labels[a] not in (labels[i], labels[j])
        ]
        assert bool(np.asarray(has)[a]) == bool(valid)
        if valid:
            assert float(np.asarray(got)[a]) == pytest.approx(min(valid), rel=1e-6)


def test_pair_term_adds_to_the_triplet_loss():
    # Classes 0/1 well apart from the anchor, but 1 and 2 close to each other:
    # no triplet violates its margin, yet the pair (1, 2) is closer than (a, p).
    labels = np.array([0, 0, 1, 2])
    x = np.array([[0.0, 0.0], [0.5, 0.0], [3.0, 0.0], [3.2, 0.0]], "float32")
    triplet_only = QuadrupletLoss(margin=0.2, pair_margin=0.0, negative_mining="hard")
    # Anchors 0 and 1 have d(a, p) = 0.5 and the hardest pair (1, 2) is 0.2 apart.
    np.testing.assert_allclose(float(triplet_only(labels, x)), 0.5 - 0.2, rtol=1e-5)
    with_margin = QuadrupletLoss(margin=0.2, pair_margin=0.1, negative_mining="hard")
    np.testing.assert_allclose(float(with_margin(labels, x)), 0.5 - 0.2 + 0.1, rtol=1e-5)


def test_degenerate_batches_are_finite():
    loss = QuadrupletLoss()
    x = np.random.default_rng(0).normal(size=(6, 3)).astype("float32")
    assert float(loss(np.zeros(6, "int32"), x)) == 0.0  # one class: no negatives
    assert float(loss(np.arange(6), x)) == 0.0  # no positive pair
    assert float(loss(np.array([0]), x[:1])) == 0.0  # a single sample
    # Two classes: no negative pair, so the loss is the triplet term alone.
    two = np.array([0, 0, 0, 1, 1, 1])
    triplet = keras_dml_triplet(two, x)
    np.testing.assert_allclose(float(loss(two, x)), triplet, rtol=1e-6)
    # Identical embeddings everywhere: distance 0 to everything.
    same = np.ones((6, 3), "float32")
    labels = np.array([0, 0, 1, 1, 2, 2])
    np.testing.assert_allclose(float(loss(labels, same)), 0.2 + 0.1, rtol=1e-6)


def keras_dml_triplet(labels, x):
    from keras_dml.losses.triplet import triplet_loss

    return float(triplet_loss(labels, ops.convert_to_tensor(x), margin=0.2))


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_finite_gradients_at_zero_distance_and_cos_plus_minus_one(distance):
    labels = np.array([0, 0, 1, 1, 2, 2])
    # Duplicates (distance 0, cos = 1) and opposite points (cos = -1).
    x = np.array(
        [[1, 0, 0], [1, 0, 0], [-1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, 1, 0]], "float32"
    )
    loss = QuadrupletLoss(margin=2.5, pair_margin=2.5, distance=distance)
    value, grad = loss_gradient(lambda v: loss(labels, v), x)
    assert np.isfinite(value) and value > 0
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_no_nan_under_mixed_float16():
    labels, x = batch(4, n=16)
    with mixed_precision("mixed_float16"):
        loss = QuadrupletLoss()
        value = loss(labels, (x * 300.0).astype("float16"))
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(8), L2Normalize()])
        model.compile(optimizer="adam", loss=loss)
        history = model.fit(x * 100.0, labels, batch_size=16, epochs=2, verbose=0)
    assert keras.config.dtype_policy().name == "float32"
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(history.history["loss"]))


def test_config_round_trip_and_fit_save_load(tmp_path):
    loss = QuadrupletLoss(margin=0.4, pair_margin=0.2, negative_mining="hard", distance="L2")
    config = loss.get_config()
    assert config["distance"] == "euclidean" and config["pair_margin"] == 0.2
    assert QuadrupletLoss.from_config(config).get_config() == config
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is QuadrupletLoss and restored.get_config() == config

    labels, x = batch(5, n=32)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.UnitNormalization()]
    )
    model.compile(optimizer="adam", loss=loss)
    history = model.fit(x, labels, batch_size=16, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    assert reloaded.loss.get_config() == config
    np.testing.assert_allclose(
        reloaded.evaluate(x, labels, batch_size=32, verbose=0),
        model.evaluate(x, labels, batch_size=32, verbose=0),
        rtol=1e-5,
    )


def test_functional_form_and_bad_arguments():
    labels, x = batch(6)
    np.testing.assert_allclose(
        float(quadruplet_loss(ops.convert_to_tensor(labels), ops.convert_to_tensor(x))),
        float(QuadrupletLoss()(labels, x)),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="negative_mining"):
        QuadrupletLoss(negative_mining="hardest")
    with pytest.raises(ValueError, match="positive_mining"):
        QuadrupletLoss(positive_mining="semi-hard")
    with pytest.raises(ValueError, match="pair_margin"):
        QuadrupletLoss(pair_margin=-0.1)
    with pytest.raises(ValueError, match="distance"):
        QuadrupletLoss(distance="manhattan")
    with pytest.raises(ValueError, match="y_true"):
        QuadrupletLoss()(labels + 0.5, x)


def test_docstring_example():
    assert doctest.testmod(quadruplet).failed == 0
