"""Tests for keras_dml.evaluation.reranking against naive NumPy loop references."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from keras_dml.evaluation.reranking import (
    alpha_query_expansion,
    average_query_expansion,
    database_augmentation,
    index_rows,
    k_reciprocal_rerank,
)
from keras_dml.index import ExactIndex

# ------------------------------------------------------------- naive references


def unit(v):
    return v / np.linalg.norm(v)


def naive_expansion(queries, database, k, alpha, exclude_self=False):
    """One query at a time: rank the database by cosine, add the top k weighted by sim^alpha."""
    database = np.array([unit(d) for d in database.astype(np.float64)])
    out = []
    for row, query in enumerate(queries.astype(np.float64)):
        q = unit(query)
        similarities = database @ q
        order = np.argsort(-similarities, kind="stable")
        order = [j for j in order if not (exclude_self and j == row)]
        expanded = q.copy()
        for j in order[:k]:
            weight = 1.0 if alpha == 0 else max(similarities[j], 0.0) ** alpha
            expanded += weight * database[j]
        out.append(unit(expanded))
    return np.array(out)


def naive_k_reciprocal(queries, gallery, k1, k2, lam):
    """Zhong et al. 2017 with dense matrices and loops; returns the (Q, gallery) distances.

    `queries=None` is the leave-one-out case: the gallery is both probe and gallery.
    """
    x = gallery if queries is None else np.concatenate([queries, gallery])
    x = np.array([unit(v) for v in x.astype(np.float64)])
    n = len(x)
    dist = np.array([[np.sum((x[i] - x[j]) ** 2) for j in range(n)] for i in range(n)])
    dist = dist / dist.max(axis=1, keepdims=True)
    rank = np.argsort(dist, axis=1, kind="stable")

    def reciprocal(i, depth):
        return [j for j in rank[i, : depth + 1] if i in rank[j, : depth + 1]]

    v = np.zeros((n, n))
    for i in range(n):
        r = reciprocal(i, k1)
        expansion = set(r)
        for c in r:
            r_half = reciprocal(c, int(np.around(k1 / 2)))
            if len(set(r_half) & set(r)) > 2 / 3 * len(r_half):
                expansion |= set(r_half)
        members = sorted(expansion)
        weights = np.exp(-dist[i, members])
        v[i, members] = weights / weights.sum()
    if k2 > 1:
        v = np.array([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    n_queries = n if queries is None else len(queries)
    final = np.zeros((n_queries, n))
    for p in range(n_queries):
        for g in range(n):
            jaccard = 1 - np.minimum(v[p], v[g]).sum() / np.maximum(v[p], v[g]).sum()
            final[p, g] = (1 - lam) * jaccard + lam * dist[p, g]
    return final if queries is None else final[:, len(queries) :]


def as_matrix(indices, distances, n_columns):
    matrix = np.full((len(indices), n_columns), np.nan)
    np.put_along_axis(matrix, indices, distances, axis=1)
    return matrix


@pytest.fixture
def data(rng):
    centres = rng.normal(size=(5, 12))
    gallery = np.repeat(centres, 9, axis=0) + 0.8 * rng.normal(size=(45, 12))
    queries = centres[rng.integers(0, 5, 14)] + 0.8 * rng.normal(size=(14, 12))
    return queries.astype("float32"), gallery.astype("float32")


# ---------------------------------------------------------------- query expansion


@pytest.mark.parametrize("alpha", [0.0, 1.0, 3.0])
def test_query_expansion_matches_naive_loop(data, alpha):
    queries, gallery = data
    expected = naive_expansion(queries, gallery, k=4, alpha=alpha)
    got = alpha_query_expansion(queries, gallery, k=4, alpha=alpha)
    np.testing.assert_allclose(got, expected, atol=2e-6)
    assert got.dtype == np.float32


def test_average_query_expansion_is_alpha_zero(data):
    queries, gallery = data
    np.testing.assert_array_equal(
        average_query_expansion(queries, gallery, k=3),
        alpha_query_expansion(queries, gallery, k=3, alpha=0.0),
    )
    np.testing.assert_allclose(
        average_query_expansion(queries, gallery, k=3),
        naive_expansion(queries, gallery, k=3, alpha=0.0),
        atol=2e-6,
    )


def test_query_expansion_over_index_results(data):
    queries, gallery = data
    index = ExactIndex()
    index.add(gallery, ids=[f"item{i}" for i in range(len(gallery))])
    ids, _ = index.search(queries, k=6)
    expanded = alpha_query_expansion(
        queries, index.embeddings, k=6, alpha=3.0, neighbors=index_rows(index, ids)
    )
    np.testing.assert_allclose(expanded, naive_expansion(queries, gallery, 6, 3.0), atol=2e-6)
    # Only the first k columns of a longer result list are used.
    ids, _ = index.search(queries, k=10)
    np.testing.assert_allclose(
        alpha_query_expansion(queries, gallery, k=6, neighbors=index_rows(index, ids)),
        expanded,
        atol=1e-6,
    )


def test_negative_similarities_get_zero_weight():
    database = np.array([[1.0, 0.0], [-1.0, 0.1]], "float32")
    query = np.array([[1.0, 0.05]], "float32")
    expanded = alpha_query_expansion(query, database, k=2, alpha=3.0)
    np.testing.assert_allclose(expanded, naive_expansion(query, database, 2, 3.0), atol=1e-6)
    assert np.all(np.isfinite(expanded))


# ------------------------------------------------------------------------- DBA


@pytest.mark.parametrize("alpha", [0.0, 3.0])
def test_database_augmentation_matches_naive_loop(data, alpha):
    _, gallery = data
    expected = naive_expansion(gallery, gallery, k=3, alpha=alpha, exclude_self=True)
    got = database_augmentation(gallery, k=3, alpha=alpha)
    np.testing.assert_allclose(got, expected, atol=2e-6)


def test_database_augmentation_ignores_self_in_neighbors(data):
    _, gallery = data
    index = ExactIndex()
    index.add(gallery)
    ids, _ = index.search(gallery, k=4)  # each item finds itself first
    assert np.all(index_rows(index, ids)[:, 0] == np.arange(len(gallery)))
    np.testing.assert_allclose(
        database_augmentation(gallery, k=4, neighbors=index_rows(index, ids)),
        database_augmentation(gallery, k=3),
        atol=1e-6,
    )


def test_index_rows_maps_ids_and_rejects_unknown():
    index = ExactIndex()
    index.add(np.eye(4, dtype="float32"), ids=[40, 10, 30, 20])
    np.testing.assert_array_equal(index_rows(index, [[10, 20], [40, 30]]), [[1, 3], [0, 2]])
    with pytest.raises(ValueError, match="not in the index"):
        index_rows(index, [10, 11])


def test_expansion_input_errors(data):
    queries, gallery = data
    with pytest.raises(ValueError, match="neighbors"):
        alpha_query_expansion(queries, gallery, k=3, neighbors=np.zeros((len(queries), 2), int))
    with pytest.raises(ValueError, match="rows of `database`"):
        alpha_query_expansion(queries, gallery, k=1, neighbors=np.full((len(queries), 1), 99))
    with pytest.raises(ValueError, match="alpha"):
        alpha_query_expansion(queries, gallery, alpha=-1.0)
    with pytest.raises(ValueError, match="at most"):
        database_augmentation(gallery, k=len(gallery))
    with pytest.raises(ValueError, match="NaN"):
        average_query_expansion(np.full((1, 12), np.nan, "float32"), gallery)


# ---------------------------------------------------------------- k-reciprocal


@pytest.mark.parametrize("k1,k2,lam", [(6, 3, 0.3), (5, 1, 0.0), (8, 4, 1.0)])
def test_k_reciprocal_matches_naive_reference(data, k1, k2, lam):
    queries, gallery = data
    expected = naive_k_reciprocal(queries, gallery, k1, k2, lam)
    indices, distances = k_reciprocal_rerank(queries, gallery, k1=k1, k2=k2, lambda_value=lam)
    assert indices.shape == distances.shape == (len(queries), len(gallery))
    np.testing.assert_allclose(as_matrix(indices, distances, len(gallery)), expected, atol=1e-5)
    assert np.all(np.diff(distances, axis=1) >= 0)


def test_k_reciprocal_leave_one_out_matches_naive_reference(data):
    _, gallery = data
    expected = naive_k_reciprocal(None, gallery, 6, 3, 0.3)
    indices, distances = k_reciprocal_rerank(None, gallery, k1=6, k2=3)
    assert indices.shape == (len(gallery), len(gallery) - 1)
    assert not np.any(indices == np.arange(len(gallery))[:, None])  # never its own result
    matrix = as_matrix(indices, distances, len(gallery))
    np.fill_diagonal(expected, np.nan)
    np.testing.assert_allclose(matrix, expected, atol=1e-5)


def test_k_reciprocal_blocks_and_top_k_do_not_change_results(data):
    queries, gallery = data
    full = k_reciprocal_rerank(queries, gallery, k1=6, k2=3)
    small = k_reciprocal_rerank(queries, gallery, k=7, k1=6, k2=3, batch_size=1)
    np.testing.assert_array_equal(small[0], full[0][:, :7])
    np.testing.assert_allclose(small[1], full[1][:, :7], atol=1e-6)


def test_k_reciprocal_degenerate_inputs_stay_finite():
    identical = np.ones((6, 3), "float32")
    indices, distances = k_reciprocal_rerank(None, identical, k1=3, k2=2)
    assert np.all(np.isfinite(distances))
    assert not np.any(indices == np.arange(6)[:, None])
    duplicates = np.repeat(np.eye(3, dtype="float32"), 3, axis=0)
    indices, distances = k_reciprocal_rerank(None, duplicates, k=2, k1=3, k2=2)
    # Each item's two nearest are its duplicates.
    assert np.all(indices // 3 == np.arange(9)[:, None] // 3)
    assert np.all(np.isfinite(distances))


def test_k_reciprocal_input_errors(data):
    queries, gallery = data
    with pytest.raises(ValueError, match="k1"):
        k_reciprocal_rerank(queries, gallery, k1=0)
    with pytest.raises(ValueError, match="`k`"):
        k_reciprocal_rerank(None, gallery, k=len(gallery))
    with pytest.raises(ValueError, match="lambda_value"):
        k_reciprocal_rerank(queries, gallery, lambda_value=1.5)
    with pytest.raises(ValueError, match="dimension"):
        k_reciprocal_rerank(queries[:, :3], gallery)


def test_docstring_examples_run():
    from keras_dml.evaluation import reranking

    assert doctest.testmod(reranking).failed == 0
