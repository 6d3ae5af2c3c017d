"""Tests for keras_dml.index: exact and ScaNN search, persistence without pickle, errors."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from keras_dml.index import ExactIndex, Index, ScaNNIndex
from keras_dml.index import exact as exact_module
from keras_dml.index.scann_index import load_scann_searcher


def structured_embeddings(n: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    """Embedding-like vectors: 50 class centres plus variation of intrinsic dimension 16.

    Trained embeddings have such structure; isotropic Gaussian vectors have no
    meaningful neighbours and would test nothing but noise.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, dim))
    basis = rng.normal(size=(16, dim)) / 4.0
    labels = rng.integers(0, 50, size=n)
    x = centres[labels] + rng.normal(size=(n, 16)) @ basis + 0.1 * rng.normal(size=(n, dim))
    return x.astype("float32")


def naive_search(database, queries, k, distance, normalize):
    """Full sort per query, ties by lower row: the reference for ExactIndex."""
    database = np.asarray(database, np.float64)
    queries = np.asarray(queries, np.float64)
    if normalize:
        database = database / np.linalg.norm(database, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    rows, scores = [], []
    for query in queries:
        if distance == "dot":
            values = database @ query
            order = sorted(range(len(values)), key=lambda j: (-values[j], j))
        else:
            values = ((database - query) ** 2).sum(1)
            order = sorted(range(len(values)), key=lambda j: (values[j], j))
        rows.append(order[:k])
        scores.append(values[order[:k]])
    return np.array(rows), np.array(scores)


def recall_at_k(found, truth):
    pairs = zip(found.tolist(), truth.tolist(), strict=True)
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in pairs])


@pytest.fixture(scope="module")
def data_20k():
    x = structured_embeddings(20_500, seed=1)
    return x[:20_000], x[20_000:]


@pytest.fixture(scope="module")
def scann_20k(data_20k):
    index = ScaNNIndex()
    index.add(data_20k[0])
    index.build()
    return index


# ----------------------------------------------------------------- exact search


@pytest.mark.parametrize(
    "distance,normalize", [("dot", True), ("dot", False), ("squared_l2", False)]
)
def test_exact_index_matches_naive_reference(distance, normalize):
    x = structured_embeddings(300, dim=16, seed=2)
    queries = structured_embeddings(20, dim=16, seed=3)
    index = ExactIndex(distance=distance, normalize=normalize)
    index.add(x)
    ids, scores = index.search(queries, k=7)
    want_rows, want_scores = naive_search(x, queries, 7, distance, normalize)
    np.testing.assert_array_equal(ids, want_rows)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-3)
    assert ids.dtype == np.int64 and scores.dtype == np.float32


def test_exact_index_default_is_cosine():
    index = ExactIndex()
    assert index.normalize and index.higher_is_better
    index.add(np.array([[10.0, 0.0], [1.0, 1.0]], "float32"))
    _, scores = index.search(np.array([[3.0, 3.0]], "float32"), k=2)
    np.testing.assert_allclose(scores, [[1.0, np.sqrt(0.5)]], rtol=1e-6)


def test_exact_index_chunked_search_equals_one_block(monkeypatch):
    x = structured_embeddings(500, dim=8, seed=4)
    queries = structured_embeddings(33, dim=8, seed=5)
    index = ExactIndex(distance="squared_l2")
    index.add(x)
    whole = index.search(queries, k=5)
    monkeypatch.setattr(exact_module, "_BLOCK_ELEMENTS", 1000)  # two queries per block
    chunked = index.search(queries, k=5)
    np.testing.assert_array_equal(whole[0], chunked[0])
    # BLAS may round a 2-row block differently from a 33-row one.
    np.testing.assert_allclose(whole[1], chunked[1], rtol=1e-5)


def test_ties_go_to_the_earlier_item_like_tf_top_k():
    index = ExactIndex()
    index.add(np.array([[1.0, 0.0]] * 4 + [[0.0, 1.0]], "float32"), ids=[40, 30, 20, 10, 0])
    ids, _ = index.search(np.array([1.0, 0.0], "float32"), k=3)
    assert ids.tolist() == [40, 30, 20]


def test_one_dimensional_query_gives_one_dimensional_result():
    index = ExactIndex()
    index.add(np.eye(3, dtype="float32"))
    ids, scores = index.search(np.array([0.0, 1.0, 0.0], "float32"), k=2)
    assert ids.shape == (2,) and scores.shape == (2,) and ids[0] == 1


def test_incremental_add_continues_ids_and_search_sees_new_items():
    index = ExactIndex()
    index.add(np.eye(4, dtype="float32")[:2])
    index.add(np.eye(4, dtype="float32")[2:], metadata=[{"name": "c"}, {"name": "d"}])
    assert len(index) == 4 and index.ids.tolist() == [0, 1, 2, 3]
    ids, _ = index.search(np.eye(4, dtype="float32")[3:], k=1)
    assert ids.tolist() == [[3]]
    assert index.get_metadata(ids) == [[{"name": "d"}]]
    assert index.get_metadata(0) is None
    custom = ExactIndex()
    custom.add(np.eye(4, dtype="float32")[:2], ids=[7, 3])
    custom.add(np.eye(4, dtype="float32")[2:])
    assert custom.ids.tolist() == [7, 3, 8, 9]  # defaults never collide with given ids


# ----------------------------------------------------------------- ScaNN search


def test_scann_defaults_follow_data_size(scann_20k):
    params = scann_20k.resolved_params(k=10)
    assert params["brute_force"] is False
    assert params["num_leaves"] == 141  # round(sqrt(20000))
    assert params["leaves_to_search"] == 24  # ceil(2 * sqrt(141))
    assert params["reorder_num_neighbors"] == 100
    assert scann_20k.resolved_params(k=50)["reorder_num_neighbors"] == 500
    small = ScaNNIndex()
    small.add(structured_embeddings(100, dim=8))
    assert small.resolved_params()["brute_force"] is True


def test_scann_overrides_are_used():
    index = ScaNNIndex(
        num_leaves=20, leaves_to_search=5, reorder_num_neighbors=40, brute_force_threshold=100
    )
    index.add(structured_embeddings(1000, dim=8))
    params = index.resolved_params(k=10)
    assert params["num_leaves"] == 20 and params["leaves_to_search"] == 5
    assert params["reorder_num_neighbors"] == 40
    assert "num_children: 20" in index.searcher.config()


def test_scann_recall_at_10_on_20k_vectors(data_20k, scann_20k):
    database, queries = data_20k
    exact = ExactIndex()
    exact.add(database)
    truth, truth_scores = exact.search(queries, k=10)
    found, scores = scann_20k.search(queries, k=10)
    assert recall_at_k(found, truth) >= 0.95
    # Reordering rescores exactly: the top score is the exact cosine.
    np.testing.assert_allclose(scores[:, 0], truth_scores[:, 0], atol=1e-5)


@pytest.mark.parametrize("distance", ["dot", "squared_l2"])
def test_scann_brute_force_equals_exact_search(distance):
    x = structured_embeddings(800, dim=16, seed=6)
    queries = structured_embeddings(30, dim=16, seed=7)
    approximate, exact = ScaNNIndex(distance=distance), ExactIndex(distance=distance)
    approximate.add(x)
    exact.add(x)
    ids, scores = approximate.search(queries, k=5)
    want_ids, want_scores = exact.search(queries, k=5)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-4)


def test_scann_single_and_batched_queries_agree(data_20k, scann_20k):
    queries = data_20k[1][:3]
    batched_ids, batched_scores = scann_20k.search(queries, k=10)
    for row, query in enumerate(queries):
        ids, scores = scann_20k.search(query, k=10)
        np.testing.assert_array_equal(ids, batched_ids[row])
        np.testing.assert_allclose(scores, batched_scores[row], rtol=1e-6)


def test_scann_returns_k_results_when_searched_leaves_are_too_small():
    index = ScaNNIndex(num_leaves=40, leaves_to_search=1, brute_force_threshold=100)
    index.add(structured_embeddings(2000, dim=8, seed=8))
    for queries in (structured_embeddings(4, dim=8, seed=9), structured_embeddings(1, dim=8)):
        ids, scores = index.search(queries, k=300)
        assert ids.shape == (len(queries), 300) and np.isfinite(scores).all()
        assert all(len(set(row)) == 300 for row in ids.tolist())
        assert (np.diff(scores, axis=1) <= 1e-6).all()  # similarities, best first
    # A 1-D query takes the single-query path, with the same fallback.
    ids, scores = index.search(structured_embeddings(1, dim=8)[0], k=300)
    assert ids.shape == (300,) and len(set(ids.tolist())) == 300 and np.isfinite(scores).all()


@pytest.mark.parametrize("index_class", [ExactIndex, ScaNNIndex])
def test_a_bad_single_query_raises(index_class):
    index = index_class()
    index.add(structured_embeddings(50, dim=8, seed=1))
    with pytest.raises(ValueError, match="dimension 7"):
        index.search(np.ones(7, "float32"), k=1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        index.search(np.array([np.nan] + [1.0] * 7, "float32"), k=1)


def test_adding_after_search_rebuilds_the_searcher():
    index = ScaNNIndex()
    index.add(np.eye(8, dtype="float32")[:4])
    index.search(np.eye(8, dtype="float32")[:1], k=1)
    index.add(np.eye(8, dtype="float32")[4:])
    ids, _ = index.search(np.eye(8, dtype="float32")[7:], k=1)
    assert ids.tolist() == [[7]]


# ------------------------------------------------------------------ persistence


def _assert_same_search(a, b, queries, k=10):
    ids_a, scores_a = a.search(queries, k)
    ids_b, scores_b = b.search(queries, k)
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_array_equal(scores_a, scores_b)


def test_scann_save_load_search_is_identical(tmp_path, data_20k, scann_20k):
    scann_20k.save(tmp_path / "index")
    loaded = ScaNNIndex.load(tmp_path / "index")
    assert isinstance(loaded, ScaNNIndex) and len(loaded) == 20_000
    assert loaded.get_config() == scann_20k.get_config()
    _assert_same_search(scann_20k, loaded, data_20k[1])
    # Loading reuses the saved searcher instead of retraining a new one.
    assert loaded._searcher is not None


@pytest.mark.parametrize("distance", ["dot", "squared_l2"])
def test_exact_save_load_with_string_ids_and_metadata(tmp_path, distance):
    x = structured_embeddings(200, dim=8, seed=10)
    index = ExactIndex(distance=distance)
    index.add(x, ids=[f"item-{i}" for i in range(200)], metadata=[{"row": i} for i in range(200)])
    index.save(tmp_path / "index")
    loaded = Index.load(tmp_path / "index")
    assert type(loaded) is ExactIndex and loaded.distance == distance
    _assert_same_search(index, loaded, x[:20])
    ids, _ = loaded.search(x[:1], k=1)
    assert ids.tolist() == [["item-0"]] and loaded.get_metadata("item-3") == {"row": 3}


def test_empty_index_round_trips(tmp_path):
    ExactIndex().save(tmp_path / "empty")
    loaded = Index.load(tmp_path / "empty")
    assert len(loaded) == 0 and loaded.dim is None


def test_saved_directory_has_no_pickles_and_load_never_unpickles(tmp_path):
    index = ScaNNIndex(brute_force_threshold=100)
    index.add(structured_embeddings(500, dim=8))
    index.save(tmp_path / "index")
    files = [os.path.join(root, name) for root, _, names in os.walk(tmp_path) for name in names]
    assert not [f for f in files if f.endswith((".pkl", ".pickle"))]
    # ScaNN's own loader unpickles scann_docids.pkl: plant one that would
    # write a file when unpickled and check that loading ignores it.
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "index" / "scann" / "scann_docids.pkl", "wb") as f:
        pickle.dump(Payload(), f)
    Index.load(tmp_path / "index").search(structured_embeddings(2, dim=8), k=3)
    assert not marker.exists()


def test_save_refuses_to_overwrite_by_default(tmp_path):
    index = ExactIndex()
    index.add(np.eye(3, dtype="float32"))
    index.save(tmp_path / "index")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        index.save(tmp_path / "index")
    index.add(np.ones((1, 3), "float32"))
    index.save(tmp_path / "index", overwrite=True)
    assert len(Index.load(tmp_path / "index")) == 4
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a saved index"):
        index.save(tmp_path / "other", overwrite=True)


@pytest.fixture
def saved_scann(tmp_path):
    index = ScaNNIndex(brute_force_threshold=100)
    index.add(structured_embeddings(600, dim=8, seed=11))
    index.save(tmp_path / "index")
    return tmp_path / "index"


def test_load_truncated_file_is_a_clear_error(saved_scann):
    path = saved_scann / "embeddings.npy"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="embeddings.npy has .* bytes.*truncated"):
        Index.load(saved_scann)


def test_load_truncated_scann_asset_is_a_clear_error(saved_scann):
    path = saved_scann / "scann" / "dataset.npy"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="scann/dataset.npy .*truncated"):
        Index.load(saved_scann)


def test_load_files_from_another_save_is_a_clear_error(tmp_path, saved_scann):
    other = ScaNNIndex(brute_force_threshold=100)
    other.add(structured_embeddings(600, dim=8, seed=12))
    other.save(tmp_path / "other")
    (saved_scann / "ids.npy").write_bytes((tmp_path / "other" / "ids.npy").read_bytes())
    (saved_scann / "embeddings.npy").write_bytes(
        (tmp_path / "other" / "embeddings.npy").read_bytes()
    )
    with pytest.raises(ValueError, match="checksum.*different save"):
        Index.load(saved_scann)


def test_load_missing_header_or_file_is_a_clear_error(saved_scann):
    (saved_scann / "ids.npy").unlink()
    with pytest.raises(ValueError, match="ids.npy is missing"):
        Index.load(saved_scann)
    (saved_scann / "index.json").unlink()
    with pytest.raises(ValueError, match="index.json is missing"):
        Index.load(saved_scann)
    with pytest.raises(FileNotFoundError):
        Index.load(saved_scann / "nowhere")


def test_load_wrong_version_class_or_corrupt_header(saved_scann):
    with pytest.raises(ValueError, match="holds a ScaNNIndex, not a ExactIndex"):
        ExactIndex.load(saved_scann)
    header_path = saved_scann / "index.json"
    header = json.loads(header_path.read_text())
    header_path.write_text(json.dumps({**header, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        Index.load(saved_scann)
    header_path.write_text(json.dumps(header)[:40])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Index.load(saved_scann)


def test_load_inconsistent_header_is_a_clear_error(saved_scann):
    header_path = saved_scann / "index.json"
    header = json.loads(header_path.read_text())
    header_path.write_text(json.dumps({**header, "size": 599}))
    with pytest.raises(ValueError, match="does not match its own checksum"):
        Index.load(saved_scann)
    # A header without a checksum (saved before it existed) is checked against the data.
    del header["header_sha256"]
    header_path.write_text(json.dumps({**header, "size": 599}))
    with pytest.raises(ValueError, match="embeddings.npy has shape"):
        Index.load(saved_scann)


def test_scann_loader_rejects_assets_outside_its_directory(saved_scann):
    scann_dir = saved_scann / "scann"
    text = (scann_dir / "scann_assets.pbtxt").read_text()
    (scann_dir / "scann_assets.pbtxt").write_text(
        text.replace('"dataset.npy"', '"../embeddings.npy"')
    )
    with pytest.raises(ValueError, match="points outside its directory"):
        load_scann_searcher(str(scann_dir))


# ----------------------------------------------------------------------- errors


@pytest.fixture(params=[ExactIndex, ScaNNIndex])
def small_index(request):
    index = request.param()
    index.add(np.eye(5, dtype="float32"), ids=[1, 2, 3, 4, 5])
    return index


def test_dimension_mismatch_is_rejected(small_index):
    with pytest.raises(ValueError, match="`queries` has dimension 4 .* dimension 5"):
        small_index.search(np.ones((2, 4), "float32"), k=1)
    with pytest.raises(ValueError, match="`embeddings` has dimension 3"):
        small_index.add(np.ones((2, 3), "float32"))
    with pytest.raises(ValueError, match="`queries` must have shape"):
        small_index.search(np.ones((2, 5, 1), "float32"), k=1)


def test_k_out_of_range_is_rejected(small_index):
    with pytest.raises(ValueError, match=r"`k` \(6\) is larger than .* \(5\)"):
        small_index.search(np.ones((1, 5), "float32"), k=6)
    for k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="`k` must be a positive integer"):
            small_index.search(np.ones((1, 5), "float32"), k=k)


def test_nan_queries_and_embeddings_are_rejected(small_index):
    queries = np.ones((2, 5), "float32")
    queries[1, 2] = np.nan
    with pytest.raises(ValueError, match="`queries` contains NaN"):
        small_index.search(queries, k=1)
    with pytest.raises(ValueError, match="`embeddings` contains NaN or Inf"):
        small_index.add(np.full((1, 5), np.inf, "float32"))


@pytest.mark.parametrize("cls", [ExactIndex, ScaNNIndex])
def test_empty_index_search_is_rejected(cls):
    with pytest.raises(ValueError, match="index is empty"):
        cls().search(np.ones((1, 3), "float32"), k=1)


def test_bad_ids_and_metadata_are_rejected(small_index):
    x = np.ones((2, 5), "float32")
    with pytest.raises(ValueError, match="`ids` contains ids that are already"):
        small_index.add(x, ids=[5, 6])
    with pytest.raises(ValueError, match="`ids` contains duplicates"):
        small_index.add(x, ids=[7, 7])
    with pytest.raises(ValueError, match="`ids` must be a 1-D sequence of 2"):
        small_index.add(x, ids=[7])
    with pytest.raises(ValueError, match="`ids` must be integer ids"):
        small_index.add(x, ids=["a", "b"])
    with pytest.raises(ValueError, match="`ids` must be integers or strings"):
        small_index.add(x, ids=[0.5, 1.5])
    with pytest.raises(ValueError, match="`metadata` must have one entry per embedding"):
        small_index.add(x, metadata=[{}])
    with pytest.raises(ValueError, match="`metadata` must be JSON serialisable"):
        small_index.add(x, metadata=[object(), object()])
    assert len(small_index) == 5  # nothing was added by the failed calls
    with pytest.raises(KeyError):
        small_index.get_metadata(99)


def test_bad_constructor_arguments_are_rejected():
    with pytest.raises(ValueError, match="`distance` must be one of"):
        ExactIndex(distance="cosine")
    with pytest.raises(ValueError, match="`num_leaves` must be a positive integer"):
        ScaNNIndex(num_leaves=0)
    with pytest.raises(ValueError, match="`leaves_to_search` .* cannot exceed"):
        ScaNNIndex(num_leaves=10, leaves_to_search=20)


def test_save_info_is_stored_in_the_checked_header(tmp_path):
    index = ExactIndex()
    index.add(np.eye(3, dtype="float32"))
    index.save(tmp_path / "a", info={"run_id": "abc"})
    assert Index.saved_info(tmp_path / "a") == {"run_id": "abc"}
    assert len(Index.load(tmp_path / "a")) == 3
    index.save(tmp_path / "b")
    assert Index.saved_info(tmp_path / "b") == {}
    header = tmp_path / "a" / "index.json"
    header.write_text(header.read_text().replace('"abc"', '"xyz"'))
    with pytest.raises(ValueError, match="checksum"):
        Index.saved_info(tmp_path / "a")
    with pytest.raises(TypeError, match="dict"):
        index.save(tmp_path / "c", info="abc")


def test_an_index_may_own_search_without_a_search_hook():
    # ShardedIndex and MilvusIndex override `search` whole: no `_search` stub needed.
    class _SearchOnly(Index):
        def search(self, queries, k=10):
            return np.zeros((len(queries), k), np.int64), np.zeros((len(queries), k), "float32")

    ids, _ = _SearchOnly().search(np.ones((2, 3), "float32"), k=1)
    assert ids.shape == (2, 1)
    with pytest.raises(NotImplementedError, match="_SearchOnly overrides `search`"):
        _SearchOnly()._search(np.ones((1, 3), "float32"), 1)


def test_an_index_must_implement_search_or_its_hook():
    with pytest.raises(TypeError, match="must implement `_search"):

        class _Neither(Index):
            pass

    assert "_Neither" not in Index._registry
    with pytest.raises(TypeError, match="base class"):
        Index()
