"""`mining.semi_hard_terms`: the fused, bucketed and sorting paths against a NumPy reference.

`max_queries=None` takes the XLA masked minimum on TensorFlow for at most
`SEMI_HARD_FUSED_QUERIES` queries per anchor; `fused=0` turns it off.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import loss_gradient, ref_semi_hard_terms
from keras import ops

from keras_dml import mining


def _terms(d, negatives, queries, margin, max_queries):
    return mining.semi_hard_terms(
        d,
        negatives,
        queries,
        lambda dap, dan: ops.maximum(margin + dap - dan, 0.0),
        max_queries=max_queries,
    )


def _case(rng, n, classes, ties):
    labels = rng.integers(0, classes, size=n)
    if ties:
        d = rng.integers(0, 4, size=(n, n)).astype("float32")  # many exact ties
    else:
        d = rng.uniform(0.0, 3.0, size=(n, n)).astype("float32")
    np.fill_diagonal(d, 0.0)
    same = labels[:, None] == labels[None, :]
    queries = same & ~np.eye(n, dtype=bool)
    negatives = ~same
    return d, negatives, queries


@pytest.mark.parametrize("fused", [16, 0])  # SEMI_HARD_FUSED_QUERIES (TensorFlow only)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_queries", [None, 0, 3])  # bucketed, sorted, bucketed or sorted
@pytest.mark.parametrize("offset", [0.0, -1.5])  # negative "distances", as -dot gives
def test_matches_numpy_reference(ties, seed, max_queries, offset, fused, monkeypatch):
    monkeypatch.setattr(mining, "SEMI_HARD_FUSED_QUERIES", fused)
    rng = np.random.default_rng(seed)
    d, negatives, queries = _case(rng, n=13, classes=4, ties=ties)
    d = d + np.float32(offset)
    queries[0] = False  # an anchor without any query
    negatives[1] = False  # an anchor without negatives: row minimum
    d[2, negatives[2]] = d[2].min()  # every negative closer than every query: largest negative
    for margin in (1.0, 0.2):
        total, count = _terms(d, negatives, queries, margin, max_queries)
        want_total, want_count = ref_semi_hard_terms(d, negatives, queries, margin)
        np.testing.assert_allclose(float(total), want_total, rtol=1e-5, atol=1e-5)
        assert float(count) == want_count


@pytest.mark.parametrize("ties", [False, True])
def test_fused_bucketed_and_sorted_paths_give_the_same_gradient(ties, monkeypatch):
    rng = np.random.default_rng(7)
    d, negatives, queries = _case(rng, n=12, classes=3, ties=ties)
    negatives[1] = False  # no negative: row minimum
    d[2, negatives[2]] = d[2].min()  # no farther negative: the farthest one
    grads = []
    for fused, max_queries in ((16, None), (0, None), (0, 0)):
        monkeypatch.setattr(mining, "SEMI_HARD_FUSED_QUERIES", fused)
        value, grad = loss_gradient(
            lambda v, k=max_queries: _terms(v * 1.0, negatives, queries, 1.0, k)[0], d
        )
        grads.append(grad)
    assert np.any(grads[0] != 0)
    np.testing.assert_array_equal(grads[0], grads[1])
    np.testing.assert_array_equal(grads[0], grads[2])


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the XLA path is TF-only")
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", ["float32", "float64"])  # int64 keys / value-then-column
def test_xla_masked_minimum_picks_the_bucketed_columns(ties, seed, dtype):
    """Same (has a semi-hard negative, column) for every (anchor, query rank), ties included."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    d, negatives, queries = _case(rng, n=29, classes=4, ties=ties)
    d[3, negatives[3]] = d[3].min()  # no negative farther than any query
    negatives[4] = False
    k, n = 16, len(d)
    filler = float(d.max()) + 1.0
    query_sorted = np.sort(np.where(queries, d, filler), axis=1)[:, :k].astype("float32")
    count = np.where(negatives, (query_sorted[:, None, :] < d[:, :, None]).sum(-1), 0)
    segment = (np.arange(n)[:, None] * (k + 1) + count).reshape(-1).astype("int32")
    want_has, want_col = mining._tf_bucket_minima(
        tf.constant(d), tf.constant(negatives), tf.constant(segment), n * (k + 1), k, k
    )
    has, col = mining._xla_masked_minimum()(
        tf.constant(d.astype(dtype)), tf.constant(query_sorted.astype(dtype)),
        tf.constant(negatives),
    )
    assert np.any(want_has) and not np.all(want_has)
    np.testing.assert_array_equal(has.numpy(), want_has.numpy())
    np.testing.assert_array_equal(col.numpy(), want_col.numpy())


def test_no_query_and_no_negative_batches():
    d = np.ones((4, 4), "float32")
    none = np.zeros((4, 4), bool)
    total, count = _terms(d, none, none, 1.0, None)
    assert float(total) == 0.0 and float(count) == 0.0
    queries = ~np.eye(4, dtype=bool)
    total, count = _terms(d, none, queries, 1.0, None)  # one class: row minimum 1.0
    np.testing.assert_allclose(float(total), 12.0)
    assert float(count) == 12.0


def test_more_queries_than_the_threshold_sorts():
    rng = np.random.default_rng(3)
    d, negatives, queries = _case(rng, n=10, classes=2, ties=False)  # ~4 queries per anchor
    total, _ = _terms(d, negatives, queries, 1.0, 2)
    want, _ = ref_semi_hard_terms(d, negatives, queries, 1.0)
    np.testing.assert_allclose(float(total), want, rtol=1e-5)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TF graph shapes")
def test_unknown_batch_size_in_a_tensorflow_graph():
    import tensorflow as tf

    rng = np.random.default_rng(4)
    spec = tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([None, None], tf.bool)

    @tf.function(input_signature=[*spec, tf.TensorSpec([None, None], tf.bool)])
    def fn(d, negatives, queries):
        return _terms(d, negatives, queries, 1.0, None)[0]

    for n in (5, 40, 90):  # below, around and above SEMI_HARD_MAX_QUERIES columns
        d, negatives, queries = _case(rng, n=n, classes=max(n // 8, 1), ties=False)
        want, _ = ref_semi_hard_terms(d, negatives, queries, 1.0)
        np.testing.assert_allclose(float(fn(d, negatives, queries)), want, rtol=1e-5)
