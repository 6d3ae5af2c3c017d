"""CenterLoss head: softmax logits, centre term and the paper's centre update, against loops.

Backend-agnostic: runs under TensorFlow and JAX (the centre update reaches the
layer through MarginModel's stateless call on JAX).
"""

from __future__ import annotations

import doctest
import math

import keras
import numpy as np
import pytest
from conftest import loss_gradient, mixed_precision
from keras import ops

from keras_dml.heads import CenterLoss, center
from keras_dml.layers import MetricEmbedding
from keras_dml.models import MarginModel

B, D, C = 8, 3, 4


def np_(x):
    return np.asarray(ops.convert_to_numpy(x), dtype="float64")


def ref_logits(x, kernel, bias):
    out = np.zeros((x.shape[0], kernel.shape[1]))
    for i in range(x.shape[0]):
        for j in range(kernel.shape[1]):
            out[i, j] = sum(x[i, d] * kernel[d, j] for d in range(x.shape[1])) + bias[j]
    return out


def ref_cross_entropy(logits, labels):
    total = 0.0
    for i, row in enumerate(logits):
        top = max(row)
        total += top + math.log(sum(math.exp(v - top) for v in row)) - row[labels[i]]
    return total / len(labels)


def ref_center_term(x, labels, centers):
    total = 0.0
    for i in range(x.shape[0]):
        total += 0.5 * sum((x[i, d] - centers[d, labels[i]]) ** 2 for d in range(x.shape[1]))
    return total / x.shape[0]


def ref_update(x, labels, centers, alpha):
    new = centers.copy()
    for j in range(centers.shape[1]):
        members = [i for i in range(len(labels)) if labels[i] == j]
        delta = sum((centers[:, j] - x[i] for i in members), np.zeros(centers.shape[0]))
        new[:, j] = centers[:, j] - alpha * delta / (1 + len(members))
    return new


def built_head(rng, **kwargs):
    head = CenterLoss(C, **kwargs)
    head.build((None, D))
    head.kernel.assign(rng.normal(size=(D, C)).astype("float32"))
    head.bias.assign(rng.normal(size=(C,)).astype("float32"))
    head.centers.assign(rng.normal(size=(D, C)).astype("float32"))
    return head


def test_logits_loss_and_update_match_reference():
    rng = np.random.default_rng(0)
    head = built_head(rng, alpha=0.3, weight=0.5)
    x = rng.normal(size=(B, D)).astype("float32")
    labels = np.array([0, 0, 1, 1, 1, 2, 0, 1])  # class 3 absent: its centre stays
    kernel, bias, centers = np_(head.kernel), np_(head.bias), np_(head.centers)

    logits = head(x, labels, training=True)
    expected = ref_logits(x.astype("float64"), kernel, bias)
    np.testing.assert_allclose(np_(logits), expected, rtol=1e-5, atol=1e-5)
    assert len(head.losses) == 1
    # The loss uses the centres from before the update.
    np.testing.assert_allclose(
        float(np_(head.losses[0])),
        0.5 * ref_center_term(x.astype("float64"), labels, centers),
        rtol=1e-5,
    )
    updated = ref_update(x.astype("float64"), labels, centers, 0.3)
    np.testing.assert_allclose(np_(head.centers), updated, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np_(head.centers)[:, 3], centers[:, 3])
    total = ref_cross_entropy(expected, labels) + 0.5 * ref_center_term(
        x.astype("float64"), labels, centers
    )
    ce = ops.mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
    assert float(np_(ce)) + float(np_(head.losses[0])) == pytest.approx(total, rel=1e-5)


def test_centres_move_only_when_training_and_loss_needs_labels():
    rng = np.random.default_rng(1)
    head = built_head(rng)
    x = rng.normal(size=(B, D)).astype("float32")
    labels = np.arange(B) % C
    before = np_(head.centers)
    head(x, labels, training=False)
    assert len(head.losses) == 1  # evaluation still reports the centre term
    head(x)
    assert head.losses == []
    np.testing.assert_array_equal(np_(head.centers), before)
    # alpha = 1 with one sample per class puts that class's centre at the mean of itself and
    # the sample: c - (c - x) / 2.
    head = built_head(rng, alpha=1.0)
    before = np_(head.centers)
    one_each = np.arange(C)
    head(x[:C], one_each, training=True)
    np.testing.assert_allclose(np_(head.centers), (before + x[:C].T) / 2.0, rtol=1e-5)


def test_gradient_reaches_embeddings_not_centres_and_is_finite_at_the_centre():
    rng = np.random.default_rng(2)
    head = built_head(rng, weight=1.0)
    labels = np.array([0, 1, 2, 3])
    x = np_(head.centers).T.astype("float32")  # every sample exactly on its centre

    def centre_term(v):
        _, _, losses = head.stateless_call(
            head.trainable_variables, head.non_trainable_variables, v, labels, return_losses=True
        )
        return losses[0]

    value, grad = loss_gradient(centre_term, x)
    assert float(value) == pytest.approx(0.0, abs=1e-10)
    np.testing.assert_allclose(grad, 0.0, atol=1e-7)
    y = x + 1.0
    value, grad = loss_gradient(centre_term, y)
    np.testing.assert_allclose(grad, (y - x) / len(labels), rtol=1e-5)  # d/dx of ½ mean ‖x - c‖²

    def total(v):
        logits, _, losses = head.stateless_call(
            head.trainable_variables, head.non_trainable_variables, v, labels, return_losses=True
        )
        ce = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        return ops.mean(ce) + losses[0]

    value, grad = loss_gradient(total, np.zeros((4, D), "float32"))  # degenerate zero rows
    assert np.isfinite(value) and np.all(np.isfinite(grad))


def make_backbone():
    return keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(8, activation="relu"), MetricEmbedding(D, False)]
    )


def make_data(seed=0, n=40):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % C
    x = (rng.normal(size=(C, 5))[labels] * 3 + rng.normal(size=(n, 5))).astype("float32")
    return x, labels


def test_margin_model_updates_centres_by_the_rule_on_every_backend():
    # A frozen model (learning rate 0): embeddings do not change, so two steps of
    # fit must move the centres exactly by two applications of the rule.
    x, y = make_data()
    head = CenterLoss(C, alpha=0.5, weight=0.1)
    model = MarginModel(make_backbone(), head)
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    embeddings = model.embed(x).astype("float64")
    model.fit(x, y, epochs=2, batch_size=len(y), shuffle=False, verbose=0)
    expected = ref_update(embeddings, y, np.zeros((D, C)), 0.5)
    expected = ref_update(embeddings, y, expected, 0.5)
    np.testing.assert_allclose(np_(head.centers), expected, rtol=1e-4, atol=1e-6)

    # evaluate = cross-entropy + weight * centre term, and leaves the centres alone.
    centres = np_(head.centers)
    loss = model.evaluate(x, y, batch_size=len(y), verbose=0)
    logits = np_(head(embeddings.astype("float32")))
    expected_loss = ref_cross_entropy(logits, y) + 0.1 * ref_center_term(embeddings, y, centres)
    assert loss == pytest.approx(expected_loss, rel=1e-4)
    np.testing.assert_array_equal(np_(head.centers), centres)


def test_fit_under_mixed_float16_and_keras_round_trip(tmp_path):
    x, y = make_data(3)
    with mixed_precision("mixed_float16"):
        model = MarginModel(make_backbone(), CenterLoss(C, weight=0.05))
        assert model.head.compute_dtype == "float32"
        model.compile(optimizer="adam", metrics=["accuracy"])
        history = model.fit(x * 100.0, y, epochs=2, batch_size=20, verbose=0)
    assert keras.config.dtype_policy().name == "float32"
    assert np.all(np.isfinite(history.history["loss"]))
    assert np.all(np.isfinite(np_(model.head.centers)))
    assert np.any(np_(model.head.centers) != 0)

    model = MarginModel(make_backbone(), CenterLoss(C, alpha=0.2, weight=0.05))
    model.compile(optimizer="adam")
    model.fit(x, y, epochs=1, batch_size=20, verbose=0)
    model.save(tmp_path / "center.keras")
    reloaded = keras.saving.load_model(tmp_path / "center.keras")
    assert reloaded.head.get_config() == model.head.get_config()
    np.testing.assert_allclose(np_(reloaded.head.centers), np_(model.head.centers))
    np.testing.assert_allclose(
        reloaded.evaluate(x, y, batch_size=40, verbose=0),
        model.evaluate(x, y, batch_size=40, verbose=0),
        rtol=1e-5,
    )


def test_config_and_bad_arguments():
    head = CenterLoss(C, alpha=0.1, weight=0.01, use_bias=False)
    clone = CenterLoss.from_config(head.get_config())
    assert clone.get_config() == head.get_config()
    assert tuple(head(keras.Input((D,)), keras.Input((), dtype="int32")).shape) == (None, C)
    assert head.bias is None and tuple(head.centers.shape) == (D, C)
    assert head.trainable_weights == [head.kernel]
    with pytest.raises(ValueError, match="alpha"):
        CenterLoss(C, alpha=1.5)
    with pytest.raises(ValueError, match="weight"):
        CenterLoss(C, weight=0.0)
    with pytest.raises(ValueError, match="labels"):
        CenterLoss(C)(np.ones((2, D), "float32"), np.array([0, C]))


def test_docstring_example():
    assert doctest.testmod(center).failed == 0
