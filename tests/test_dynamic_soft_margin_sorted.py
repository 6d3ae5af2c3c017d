"""DynamicSoftMarginLoss's sorted form (no `(B, R, R)` tensor) against its dense form.

`dynamic_soft_margin_loss(..., method="dense")` forms every triplet's difference
and is what tests/test_dynamic_soft_margin.py checks against NumPy loops and
PML; the default `method="sorted"` must give the same value, histogram and
gradient (float64, to rounding) on random batches, ties, several positive
chunks, a pair miner, cross-batch references, batches without positives,
other grids, and a running histogram. TensorFlow only (the backend file
repeats the key comparison on JAX and torch).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from keras import ops
from pml_parity import keras_value_and_grads

from keras_dml import miners
from keras_dml.losses import dynamic_soft_margin as dsm
from keras_dml.losses.base import References

pytestmark = pytest.mark.skipif(
    __import__("keras").backend.backend() != "tensorflow", reason="TensorFlow-only checks"
)


def both_methods(labels, x, references=None, dtype="float64", **kwargs):
    """`{method: (value, histogram, gradient)}` of both forms on the same inputs."""
    out = {}
    for method in dsm.METHODS:
        state = {}

        def fn(v, method=method, state=state):
            value, histogram = dsm.dynamic_soft_margin_loss(
                ops.convert_to_tensor(labels, "int32"), v, references=references(v)
                if callable(references) else references, return_histogram=True, method=method,
                **kwargs,
            )
            state["histogram"] = np.asarray(histogram)
            return value

        value, (grad,) = keras_value_and_grads(fn, x, dtype=dtype)
        out[method] = (value, state["histogram"], grad)
    return out


def assert_methods_agree(out, rtol=1e-9, atol=1e-12):
    (value, histogram, grad), (want, want_histogram, want_grad) = out["sorted"], out["dense"]
    np.testing.assert_allclose(value, want, rtol=rtol, atol=atol, err_msg="value")
    np.testing.assert_allclose(histogram, want_histogram, rtol=rtol, atol=atol,
                               err_msg="histogram")
    np.testing.assert_allclose(grad, want_grad, rtol=rtol, atol=atol, err_msg="gradient")


def batch(seed, size=24, classes=4, dim=6):
    rng = np.random.default_rng(seed)
    return rng.integers(0, classes, size=size), rng.normal(size=(size, dim))


@pytest.mark.parametrize("seed", range(4))
def test_random_batches_equal_the_dense_form(seed):
    labels, x = batch(seed)
    out = both_methods(labels, x)
    assert_methods_agree(out)
    assert out["sorted"][0] != 0 and np.any(out["sorted"][2] != 0)


def test_running_histogram_and_other_grids_equal_the_dense_form():
    labels, x = batch(5)
    previous = np.random.default_rng(0).uniform(size=7)
    for kwargs in ({"histogram": previous, "num_bins": 7, "momentum": 0.3},
                   {"min_val": -0.5, "num_bins": 4},  # much of the mass off the grid
                   {"min_val": -3.0, "num_bins": 13},
                   {"num_bins": 1},
                   {"num_bins": 2, "min_val": -0.1}):
        assert_methods_agree(both_methods(labels, x, **kwargs))


def test_ties_and_duplicate_embeddings_equal_the_dense_form():
    # Coarse 2-D points: many equal distances and zero distances (x = 0: a bin edge).
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=20)
    x = rng.integers(-2, 3, size=(20, 2)).astype("float64")
    x[np.all(x == 0, axis=1)] = 1.0
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = np.linalg.norm(u[:, None] - u[None], axis=2)
    assert len(np.unique(np.round(d, 12))) < d.size // 10
    for kwargs in ({}, {"min_val": -1.0, "num_bins": 5}):
        assert_methods_agree(both_methods(labels, x, **kwargs))


def test_differences_exactly_on_bin_edges_land_in_the_same_bins():
    # Distances 0, sqrt 2 and 2, exact ties: x = -2 (the first grid point), 0 (grid point 5
    # of 10), sqrt 2 - 2 and -sqrt 2.
    x = np.array([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    labels = np.array([0, 0, 1, 0, 1])
    assert_methods_agree(both_methods(labels, x))
    assert_methods_agree(both_methods(labels, x, dtype="float32"), rtol=1e-6, atol=1e-7)


def test_more_positives_than_one_chunk_equal_the_dense_form(monkeypatch):
    labels, x = batch(2, size=30, classes=2)  # ~14 positives per anchor
    monkeypatch.setattr(dsm, "POSITIVE_CHUNK", 3)  # five passes of the loops
    assert_methods_agree(both_methods(labels, x))
    monkeypatch.setattr(dsm, "POSITIVE_CHUNK", 16)
    labels, x = batch(3, size=40, classes=1)  # 39 positives, no negatives: no triplet
    out = both_methods(labels, x)
    assert out["sorted"][0] == 0.0 and not np.any(out["sorted"][2])
    labels[:4] = 1  # 35 positives for most anchors: three chunks
    assert_methods_agree(both_methods(labels, x))


def test_a_pair_miner_equals_the_dense_form():
    labels, x = batch(6)
    # On these inputs the miner keeps part of the pairs (checked below).
    miner = miners.PairMarginMiner(0.7, 1.2)
    mined = miner(labels.astype("int32"), x / np.linalg.norm(x, axis=1, keepdims=True))
    positive, negative = np.asarray(mined.positive), np.asarray(mined.negative)
    assert 0 < positive.sum() and 0 < negative.sum() < (labels[:, None] != labels).sum()
    assert_methods_agree(both_methods(labels, x, miner=miner))


def test_a_triplet_miner_takes_the_dense_form():
    labels, x = batch(7)
    out = both_methods(labels, x, miner=miners.TripletMarginMiner(0.3, "semihard"))
    for got, want in zip(out["sorted"], out["dense"], strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("query_offset", [None, 3])
def test_cross_batch_references_equal_the_dense_form(query_offset):
    rng = np.random.default_rng(8)
    labels, x = batch(9, size=8)
    memory_labels = rng.integers(0, 4, size=20).astype("int32")
    memory = rng.normal(size=(20, 6))
    valid = np.arange(20) < 17  # the last slots are empty

    def references(v):
        embeddings = tf.convert_to_tensor(memory)
        if query_offset is not None:  # the queries were just written at rows 3 .. 10
            memory_labels[3:11] = labels
            embeddings = tf.concat([embeddings[:3], v, embeddings[11:]], axis=0)
        return References(memory_labels, embeddings, query_offset=query_offset, valid=valid)

    out = both_methods(labels, x, references=references)
    assert_methods_agree(out)
    assert out["sorted"][0] != 0


def test_a_batch_without_positives_gives_zero_and_keeps_the_histogram():
    x = batch(10, size=6)[1]
    previous = np.linspace(0.0, 1.0, 10) / 5.0  # sums to 1, as a running histogram
    out = both_methods(np.arange(6), x, histogram=previous)
    assert out["sorted"][0] == 0.0 and not np.any(out["sorted"][2])
    np.testing.assert_array_equal(out["sorted"][1], previous)
    assert_methods_agree(out)


def test_float32_is_close_to_the_dense_form():
    labels, x = batch(11, size=32, classes=2, dim=16)
    assert_methods_agree(both_methods(labels, x, dtype="float32", histogram=np.ones(10)),
                         rtol=2e-5, atol=1e-6)


def test_no_batch_cubed_tensor_in_the_traced_gradient():
    num, chunk_width = 96, dsm.POSITIVE_CHUNK * 12  # 12 = num_bins + 2 bin edges
    labels, x = batch(12, size=num, classes=6)

    @tf.function
    def step(v):
        with tf.GradientTape() as tape:
            tape.watch(v)
            value = dsm.dynamic_soft_margin_loss(tf.constant(labels, tf.int32), v)
        return value, tape.gradient(value, v)

    graph = step.get_concrete_function(tf.constant(x, tf.float32)).graph
    sizes = []

    def walk(graph):
        for op in graph.get_operations():
            sizes.extend(t.shape.num_elements() or 0 for t in op.outputs)
        for fn in graph._functions.values():  # while-loop bodies and conditions
            walk(fn.graph)

    walk(graph)
    assert max(sizes) <= num * max(num + 1, chunk_width) < num**3 // 8


def test_unknown_method_raises():
    labels, x = batch(0, size=4)
    with pytest.raises(ValueError, match="method"):
        dsm.dynamic_soft_margin_loss(labels.astype("int32"), x, method="cubic")
