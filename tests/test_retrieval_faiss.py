"""`backend="faiss"` of `retrieval_metrics` / `nearest_neighbors` against the NumPy backend.

Skipped, with the reason, only where faiss is not installed (it is optional:
`pip install faiss-cpu`).
"""

import importlib.util

import numpy as np
import pytest
from keras import ops

from keras_dml import distances
from keras_dml.evaluation import nearest_neighbors, retrieval_metrics

DISTANCES = ["cosine", "euclidean", "squared_euclidean", "dot", "angular"]
needs_faiss = pytest.mark.skipif(
    importlib.util.find_spec("faiss") is None, reason="faiss is not installed (optional)"
)


def _data(seed, n=400, dim=12, classes=15):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    centres = rng.normal(size=(classes, dim))
    x = (centres[labels] + rng.normal(size=(n, dim))).astype("float32")
    return x, labels


@needs_faiss
@pytest.mark.parametrize("name", DISTANCES)
def test_faiss_metrics_equal_numpy(name):
    x, labels = _data(0)
    for args in ((x, labels), (x[:100], labels[:100], x[100:], labels[100:])):
        want = retrieval_metrics(*args, distance=name, nmi=False)
        got = retrieval_metrics(*args, distance=name, nmi=False, backend="faiss")
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_allclose(got[key], want[key], atol=1e-6, err_msg=key)


@needs_faiss
@pytest.mark.parametrize("name", DISTANCES)
def test_faiss_neighbours_equal_numpy(name):
    x, _ = _data(1, n=300)
    for references in (None, x[:200] * 1.5):
        queries = x if references is None else x[200:]
        want_idx, want_d = nearest_neighbors(queries, references, k=7, distance=name)
        got_idx, got_d = nearest_neighbors(
            queries, references, k=7, distance=name, backend="faiss", batch_size=64
        )
        np.testing.assert_array_equal(got_idx, want_idx)
        np.testing.assert_allclose(got_d, want_d, rtol=1e-5, atol=1e-5)


@needs_faiss
def test_faiss_breaks_ties_by_lower_index_among_those_returned():
    x = np.repeat(np.eye(4, dtype="float32"), 3, axis=0)  # three copies of each vector
    idx, dist = nearest_neighbors(x, k=2, distance="dot", backend="faiss")
    want, _ = nearest_neighbors(x, k=2, distance="dot")
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_array_equal(dist, -np.ones_like(dist))


def test_bad_backend_and_custom_distance_with_faiss():
    x, labels = _data(2, n=20)
    with pytest.raises(ValueError, match="backend"):
        retrieval_metrics(x, labels, backend="scann")
    with pytest.raises(ValueError, match="backend"):
        nearest_neighbors(x, k=2, backend="torch")
    if importlib.util.find_spec("faiss") is None:
        pytest.skip("faiss is not installed (optional)")
    manhattan = distances.Distance(
        "manhattan",
        lambda a, b=None: ops.sum(ops.abs(ops.expand_dims(a, 1) - ops.expand_dims(b, 0)), -1),
        is_similarity=False,
    )
    with pytest.raises(ValueError, match="built-in distances"):
        retrieval_metrics(x, labels, distance=manhattan, nmi=False, backend="faiss")
