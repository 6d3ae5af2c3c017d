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


def _clustered(seed, per_class=25, classes=12, dim=8):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    centres = rng.normal(size=(classes, dim))
    return (centres[labels] + 0.6 * rng.normal(size=(len(labels), dim))).astype("float32"), labels


@needs_faiss
@pytest.mark.parametrize("budget", [5_000_000, 0])
def test_faiss_kmeans_is_deterministic_and_close_to_numpy(monkeypatch, budget):
    from keras_dml.evaluation import retrieval

    # budget 0: k distinct random starting points instead of k-means++.
    monkeypatch.setattr(retrieval, "_KMEANS_SEED_BUDGET", budget)
    x, labels = _clustered(1)
    for seed in (0, 3):
        got = retrieval_metrics(x, labels, seed=seed, backend="faiss")
        assert retrieval_metrics(x, labels, seed=seed, backend="faiss") == got
        want = retrieval_metrics(x, labels, seed=seed)
        # Same starting centres, Lloyd iterations by faiss instead of scikit-learn.
        assert got["nmi"] == pytest.approx(want["nmi"], abs=0.03)
        assert got["map_at_r"] == pytest.approx(want["map_at_r"], abs=1e-6)


@needs_faiss
def test_faiss_kmeans_is_faiss_from_the_default_start():
    import faiss

    from keras_dml.evaluation import retrieval

    x, _ = _clustered(2)
    points = retrieval._l2_normalize(x)
    got = retrieval._kmeans_assignments(points, 12, seed=4, backend="faiss")
    assert got.dtype == np.int64 and got.shape == (len(points),)
    # The same k-means++ start scikit-learn's path uses, then faiss's 25 iterations.
    from sklearn.cluster import kmeans_plusplus

    start = kmeans_plusplus(points.astype("float64"), 12, random_state=4)[0].astype("float32")
    kmeans = faiss.Kmeans(8, 12, niter=25, seed=4, max_points_per_centroid=25,
                          min_points_per_centroid=1)
    kmeans.train(points, init_centroids=start)
    np.testing.assert_array_equal(got, kmeans.index.search(points, 1)[1][:, 0])
    # nmi="exact" stays scikit-learn's full k-means with either backend.
    assert (retrieval_metrics(x, _, nmi="exact", backend="faiss", seed=1)["nmi"]
            == retrieval_metrics(x, _, nmi="exact", seed=1)["nmi"])
