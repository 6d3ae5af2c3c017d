"""Cross-batch memory and multi-label batches on every backend (listed in backend_agnostic.txt).

Small and fast: per new piece, a forward value against a NumPy loop
reference, a finite gradient and one `fit` step. The PML parity, save/load
and `tf.distribute` checks are in tests/test_xbm.py and
tests/test_multi_label.py (TensorFlow only).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import loss_gradient

import keras_dml
from keras_dml.layers import CrossBatchMemory
from keras_dml.models import XBMModel

D, M = 4, 12


def numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def ref_contrastive(labels, x, ref_labels, refs, valid, self_slots, weights=None, margin=1.0):
    """Mean hinge over positive and over negative pairs; `weights(i, j)` for Jaccard."""
    pos_sum = pos_weight = neg_sum = neg_count = 0.0
    for i in range(len(x)):
        for j in range(len(refs)):
            if not valid[j] or j == self_slots[i]:
                continue
            d = np.linalg.norm(x[i].astype("float64") - refs[j])
            shared = np.any((np.atleast_1d(labels[i]) != 0) & (np.atleast_1d(ref_labels[j]) != 0))
            same = shared if np.ndim(labels) == 2 else labels[i] == ref_labels[j]
            if same:
                w = 1.0 if weights is None else weights(i, j)
                pos_sum, pos_weight = pos_sum + w * d, pos_weight + w
            else:
                neg_sum, neg_count = neg_sum + max(margin - d, 0.0), neg_count + 1
    return (pos_sum / pos_weight if pos_weight else 0.0) + (neg_sum / neg_count if neg_count else 0)


def check_memory_against_ring_buffer(memory, draw_labels, label_shape, rng):
    """Three writes of 5 into 12 slots (wraps): loss vs the loop reference, then the contents."""
    loss = keras_dml.ContrastiveLoss()
    stored_x, stored_y = np.zeros((M, D)), np.zeros((M, *label_shape), "int64")
    pointer = filled = 0
    for _ in range(3):
        y = draw_labels()
        x = rng.normal(size=(5, D)).astype("float32")
        refs = memory.enqueue(y, x)
        slots = [(pointer + i) % M for i in range(5)]
        stored_x[slots], stored_y[slots] = x, y
        pointer, filled = (pointer + 5) % M, min(filled + 5, M)
        value, grad = loss_gradient(
            lambda v, y=y, refs=refs: loss.compute(keras.ops.convert_to_tensor(y, "int32"), v,
                                                   references=refs), x)
        expected = ref_contrastive(y, x, stored_y, stored_x, np.arange(M) < filled, slots)
        np.testing.assert_allclose(float(value), expected, rtol=1e-5)
        assert np.all(np.isfinite(grad)) and np.any(grad)
    np.testing.assert_array_equal(numpy(memory.labels), stored_y)
    np.testing.assert_allclose(numpy(memory.embeddings), stored_x, rtol=1e-6)
    assert int(numpy(memory.pointer)) == pointer


def test_memory_references_value_and_gradient():
    rng = np.random.default_rng(0)
    check_memory_against_ring_buffer(CrossBatchMemory(M, D), lambda: rng.integers(0, 3, 5), (),
                                     rng)


def test_xbm_model_fit_step():
    # start_step=1: the first step is the warm-up (in-batch loss), the second writes.
    start_step = 1
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 5)).astype("float32")
    y = np.arange(16) % 4
    model = XBMModel(keras.Sequential([keras.Input((5,)), keras.layers.Dense(D)]),
                     memory_size=M + 4, start_step=start_step, batch_loss_weight=0.5)
    model.compile(optimizer="sgd", loss=keras_dml.TripletLoss())
    history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert int(numpy(model.memory.steps)) == 2
    assert int(numpy(model.memory.writes)) == 1
    assert int(numpy(model.memory.size)) == 8
    np.testing.assert_array_equal(numpy(model.memory.labels)[:8], y[8:])


def test_multi_label_jaccard_value_gradient_and_fit():
    rng = np.random.default_rng(1)
    sets = (rng.random((10, 4)) < 0.4).astype("int32")
    sets[np.arange(10), rng.integers(0, 4, 10)] = 1
    x = rng.normal(size=(10, D)).astype("float32")
    loss = keras_dml.ContrastiveLoss(multi_label="jaccard")

    def jaccard(i, j):
        a, b = sets[i] != 0, sets[j] != 0
        return np.sum(a & b) / np.sum(a | b)

    value, grad = loss_gradient(lambda v: loss(sets, v), x)
    expected = ref_contrastive(sets, x, sets, x, np.ones(10, bool), list(range(10)), jaccard)
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    assert np.all(np.isfinite(grad)) and np.any(grad)

    one_hot_value, _ = loss_gradient(lambda v: loss(np.eye(4, dtype="int32")[sets.argmax(1)], v), x)
    single_value, _ = loss_gradient(lambda v: loss(sets.argmax(1), v), x)
    assert float(one_hot_value) == float(single_value)

    model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss=keras_dml.SupConLoss(multi_label="jaccard"))
    history = model.fit(x, sets, batch_size=10, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def multi_hot_sets(rng, rows, classes=4):
    sets = (rng.random((rows, classes)) < 0.3).astype("int32")
    sets[np.arange(rows), rng.integers(0, classes, rows)] = 1
    return sets


def test_memory_stores_multi_hot_labels():
    rng = np.random.default_rng(3)
    memory = CrossBatchMemory(M, D, num_classes=4)
    check_memory_against_ring_buffer(memory, lambda: multi_hot_sets(rng, 5), (4,), rng)
    clone = CrossBatchMemory.from_config(memory.get_config())
    assert clone.num_classes == 4 and tuple(clone.labels.shape) == (M, 4)


def test_multi_hot_label_errors():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(5, D)).astype("float32")
    sets = multi_hot_sets(rng, 5)
    with pytest.raises(ValueError, match="num_classes"):
        CrossBatchMemory(M, D).enqueue(sets, x)
    with pytest.raises(ValueError, match="multi-hot labels of width 4"):
        CrossBatchMemory(M, D, num_classes=4).enqueue(np.arange(5), x)
    model = XBMModel(keras.Sequential([keras.Input((D,)), keras.layers.Dense(3)]),
                     memory_size=M, num_classes=4)
    model.compile(optimizer="sgd", loss=keras_dml.GeneralizedLiftedStructureLoss())
    with pytest.raises(ValueError, match="does not take multi-hot labels"):
        model.fit(x, sets, batch_size=5, verbose=0)


def test_xbm_model_fit_with_multi_hot_labels():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(16, 5)).astype("float32")
    y = multi_hot_sets(rng, 16)
    model = XBMModel(keras.Sequential([keras.Input((5,)), keras.layers.Dense(D)]),
                     memory_size=M + 4, num_classes=4)
    model.compile(optimizer="sgd", loss=keras_dml.ContrastiveLoss(multi_label="jaccard"))
    history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    np.testing.assert_array_equal(numpy(model.memory.labels)[:16], y)
    assert XBMModel.from_config(model.get_config()).memory.num_classes == 4
