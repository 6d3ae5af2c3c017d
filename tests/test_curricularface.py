"""CurricularFace: logits, the adaptive t and hard-negative modulation against an arccos loop.

Backend-agnostic: runs under TensorFlow and JAX (t reaches the layer through
MarginModel's stateless call on JAX).
"""

from __future__ import annotations

import doctest
import math

import keras
import numpy as np
import pytest
from conftest import assert_head_gradients_finite, loss_gradient, mixed_precision
from keras import ops

from keras_dml.heads import CurricularFace, curricularface
from keras_dml.layers import MetricEmbedding
from keras_dml.models import MarginModel

B, D, C = 10, 4, 5


def np_(x):
    return np.asarray(ops.convert_to_numpy(x), dtype="float64")


def ref_cosines(x, kernel):
    return np.array(
        [[float(np.dot(x[i], kernel[:, j]) / (np.linalg.norm(x[i]) * np.linalg.norm(kernel[:, j])))
          for j in range(kernel.shape[1])] for i in range(x.shape[0])]
    )


def ref_curricular(cos, labels, scale, margin, t_old, momentum, training):
    """Returns (logits, t) for one call, following the official code step by step."""
    targets = [cos[i, labels[i]] for i in range(len(labels))]
    t = momentum * sum(targets) / len(targets) + (1 - momentum) * t_old if training else t_old
    logits = np.zeros_like(cos)
    for i in range(cos.shape[0]):
        theta = math.acos(min(1.0, max(-1.0, targets[i])))
        shifted = math.cos(theta + margin)
        for j in range(cos.shape[1]):
            c = cos[i, j]
            if j == labels[i]:
                value = shifted if theta + margin <= math.pi else c - margin * math.sin(margin)
            elif c > shifted:
                value = c * (t + c)
            else:
                value = c
            logits[i, j] = scale * value
    return logits, t


def ref_cross_entropy(logits, labels):
    total = 0.0
    for i, row in enumerate(logits):
        top = max(row)
        total += top + math.log(sum(math.exp(v - top) for v in row)) - row[labels[i]]
    return total / len(labels)


def built_head(rng, **kwargs):
    head = CurricularFace(C, **kwargs)
    head.build((None, D))
    kernel = rng.normal(size=(D, C)).astype("float32")
    head.kernel.assign(kernel)
    return head, kernel.astype("float64")


def test_logits_loss_and_t_match_reference_over_calls():
    rng = np.random.default_rng(0)
    head, kernel = built_head(rng, momentum=0.3)  # a large momentum makes t move visibly
    x = rng.normal(size=(B, D)).astype("float32")
    labels = rng.integers(0, C, size=B)
    cos = ref_cosines(x.astype("float64"), kernel)
    t = 0.0
    hard_seen = 0
    for training in (True, True, False, True):
        expected, t = ref_curricular(cos, labels, 64.0, 0.5, t, 0.3, training)
        logits = head(x, labels, training=training)
        np.testing.assert_allclose(np_(logits), expected, rtol=1e-4, atol=2e-3)
        assert float(np_(head.t)) == pytest.approx(t, rel=1e-5, abs=1e-7)
        ce = ops.mean(keras.losses.sparse_categorical_crossentropy(labels, logits, True))
        assert float(np_(ce)) == pytest.approx(ref_cross_entropy(expected, labels), rel=1e-4)
        hard_seen += int(np.sum(np.abs(expected - 64.0 * cos) > 1e-6)) - B
    assert hard_seen > 0  # the batch really has modulated hard negatives
    np.testing.assert_allclose(np_(head(x)), 64.0 * cos, rtol=1e-4, atol=1e-3)  # no labels


def test_hard_negative_modulation_and_fallback_by_hand():
    head = CurricularFace(3, scale=1.0, margin=0.5)
    head.build((None, 2))
    angles = np.array([0.0, 0.9, 2.0])  # class centres at these angles
    head.kernel.assign(np.stack([np.cos(angles), np.sin(angles)]).astype("float32"))
    head.t.assign(0.4)
    # A sample at angle 0.3, labelled class 0: θ_y = 0.3, cos(θ_y + m) = cos(0.8).
    x = np.array([[math.cos(0.3), math.sin(0.3)]], "float32")
    logits = np_(head(x, np.array([0])))[0]
    cos1, cos2 = math.cos(0.6), math.cos(1.7)
    assert logits[0] == pytest.approx(math.cos(0.8), abs=1e-5)
    assert logits[1] == pytest.approx(cos1 * (0.4 + cos1), abs=1e-5)  # cos 0.6 > cos 0.8: hard
    assert logits[2] == pytest.approx(cos2, abs=1e-5)  # easy: unchanged
    # θ_y + m > π: ArcFace's fallback cos θ_y - m sin m.
    far = np.array([[math.cos(2.9), math.sin(2.9)]], "float32")
    assert np_(head(far, np.array([0])))[0, 0] == pytest.approx(
        math.cos(2.9) - 0.5 * math.sin(0.5), abs=1e-5
    )


def test_finite_gradients_at_cos_plus_minus_one():
    head = CurricularFace(2)
    head.build((None, 3))
    kernel = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], "float32")
    head.kernel.assign(kernel)
    head.t.assign(0.5)
    x = np.array([[2.0, 0.0, 0.0], [-3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]], "float32")
    labels = np.array([0, 0, 0, 0])  # cos θ_y = 1, -1, 0, 0; a negative at cos 1 and -1
    assert_head_gradients_finite(head, x, labels)


def make_backbone():
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="relu"), MetricEmbedding(D, False)]
    )


def test_margin_model_updates_t_on_every_backend_and_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    y = np.arange(30) % 3
    x = (rng.normal(size=(3, 6))[y] * 3 + rng.normal(size=(30, 6))).astype("float32")
    model = MarginModel(make_backbone(), CurricularFace(3, scale=16.0))
    model.compile(optimizer=keras.optimizers.SGD(0.0))  # frozen: the target cosines stay put
    cos = ref_cosines(model.embed(x).astype("float64"), np_(model.head.kernel))
    mean_target = float(np.mean(cos[np.arange(30), y]))
    model.fit(x, y, epochs=2, batch_size=30, verbose=0)
    expected = 0.01 * mean_target + 0.99 * (0.01 * mean_target)
    assert float(np_(model.head.t)) == pytest.approx(expected, rel=1e-4)
    model.evaluate(x, y, verbose=0)
    assert float(np_(model.head.t)) == pytest.approx(expected, rel=1e-4)

    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = model.fit(x, y, epochs=2, batch_size=15, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    model.save(tmp_path / "curricularface.keras")
    reloaded = keras.saving.load_model(tmp_path / "curricularface.keras")
    assert reloaded.head.get_config() == model.head.get_config()
    assert float(np_(reloaded.head.t)) == pytest.approx(float(np_(model.head.t)))


def test_no_nan_under_mixed_float16():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(B, D)) * 300.0).astype("float16")
    with_zero_row = x.copy()
    with_zero_row[0] = 0.0
    labels = rng.integers(0, C, size=B)
    with mixed_precision("mixed_float16"):
        head = CurricularFace(C)
        assert head.compute_dtype == "float32"
        logits = head(with_zero_row, labels, training=True)
        value, grad = loss_gradient(
            lambda v: ops.mean(
                keras.losses.sparse_categorical_crossentropy(labels, head(v, labels), True)
            ),
            x,
        )
    assert keras.config.dtype_policy().name == "float32"
    assert ops.dtype(logits) == "float32" and np.all(np.isfinite(np_(logits)))
    assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_config_round_trip_and_bad_arguments():
    head = CurricularFace(C, scale=30.0, margin=0.3, momentum=0.05)
    clone = CurricularFace.from_config(head.get_config())
    assert clone.get_config() == head.get_config()
    assert tuple(head(keras.Input((D,)), keras.Input((), dtype="int32")).shape) == (None, C)
    with pytest.raises(ValueError, match="margin"):
        CurricularFace(C, margin=4.0)
    with pytest.raises(ValueError, match="momentum"):
        CurricularFace(C, momentum=1.5)
    with pytest.raises(ValueError, match="scale"):
        CurricularFace(C, scale=0.0)


def test_docstring_example():
    assert doctest.testmod(curricularface).failed == 0
