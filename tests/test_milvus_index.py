"""Tests for MilvusIndex against a real Milvus Lite (a local file), not a mock."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from keras_dml.index import ExactIndex, Index, MilvusIndex

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("pymilvus") is None,
    reason="needs the `milvus` extra (pymilvus, milvus-lite): pip install 'keras-dml[milvus]'",
)


def structured(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, dim))
    labels = rng.integers(0, 10, size=n)
    return (centres[labels] + 0.5 * rng.normal(size=(n, dim))).astype("float32")


@pytest.fixture(scope="module")
def data():
    x = structured(530, seed=2)
    return x[:500], x[500:]


@pytest.mark.parametrize("distance", ["dot", "squared_l2"])
def test_search_save_load_equal_exact_index(tmp_path, data, distance):
    x, queries = data
    ids = np.arange(1000, 1000 + 2 * len(x), 2)
    metadata = [{"row": i} if i % 3 else f"text {i}" for i in range(len(x))]
    exact = ExactIndex(distance=distance)
    exact.add(x, ids=ids)
    path = tmp_path / "gallery.db"
    index = MilvusIndex(path, collection="items", distance=distance, timeout=60)
    try:
        # Two adds: the second continues the same collection.
        index.add(x[:300], ids=ids[:300], metadata=metadata[:300])
        index.add(x[300:], ids=ids[300:], metadata=metadata[300:])
        assert len(index) == len(x) and index.dim == 16
        for k in (1, 10):
            expected_ids, expected_scores = exact.search(queries, k)
            found_ids, found_scores = index.search(queries, k)
            assert found_ids.dtype == np.int64
            np.testing.assert_array_equal(found_ids, expected_ids)
            np.testing.assert_allclose(found_scores, expected_scores, rtol=1e-4, atol=1e-4)
        single_ids, _ = index.search(queries[0], 5)
        np.testing.assert_array_equal(single_ids, exact.search(queries[0], 5)[0])
        assert index.get_metadata([1002, 1004]) == [{"row": 1}, {"row": 2}]
        assert index.get_metadata(1000) == "text 0"
        with pytest.raises(KeyError):
            index.get_metadata(1001)
        index.save(tmp_path / "saved", info={"model": "m"})
        expected = index.search(queries, 10)
    finally:
        index.close()
    # Reopening the file, through the saved header or directly, loses nothing.
    loaded = Index.load(tmp_path / "saved")
    try:
        assert isinstance(loaded, MilvusIndex)
        assert Index.saved_info(tmp_path / "saved") == {"model": "m"}
        assert len(loaded) == len(x)
        for a, b in zip(loaded.search(queries, 10), expected, strict=True):
            np.testing.assert_array_equal(a, b)
        assert loaded.get_metadata(ids[-1]) == metadata[-1]
        # Default ids continue after the largest one in the reopened collection.
        loaded.add(queries[:2])
        assert loaded.get_metadata([int(ids.max()) + 1, int(ids.max()) + 2]) == [None, None]
        assert len(loaded) == len(x) + 2
    finally:
        loaded.close()
    reopened = MilvusIndex(path, collection="items", distance=distance)
    try:
        assert len(reopened) == len(x) + 2
        assert reopened.get_config()["uri"] == str(path)
    finally:
        reopened.close()


WRONG_DIM = "dimension 15 but the index holds vectors of dimension 16"


def test_errors(tmp_path, data):
    x, queries = data
    with MilvusIndex(tmp_path / "e.db") as index:
        with pytest.raises(ValueError, match="empty"):
            index.search(queries, 1)
        index.add(x[:50])
        with pytest.raises(ValueError, match=WRONG_DIM):
            index.search(queries[:, :15], 3)
        with pytest.raises(ValueError, match=WRONG_DIM):
            index.add(x[:2, :15])
        bad = queries.copy()
        bad[0, 0] = np.nan
        with pytest.raises(ValueError, match="NaN or Inf"):
            index.search(bad, 3)
        with pytest.raises(ValueError, match="larger than the number"):
            index.search(queries, 51)
        with pytest.raises(ValueError, match="already in the index"):
            index.add(x[:2], ids=[3, 1000])
        with pytest.raises(ValueError, match="int64 ids"):
            index.add(x[:1], ids=["a"])
        with pytest.raises(ValueError, match="duplicates"):
            index.add(x[:2], ids=[7000, 7000])
        assert len(index) == 50
    # The metric of an existing collection must match.
    with pytest.raises(ValueError, match="IP metric"):
        MilvusIndex(tmp_path / "e.db", distance="squared_l2")
    with pytest.raises(ValueError, match=r"ending in \.db"):
        MilvusIndex(tmp_path / "e.sqlite")


def test_load_of_a_missing_file_is_a_clear_error(tmp_path, data):
    import shutil

    with MilvusIndex(tmp_path / "m.db") as index:
        index.add(data[0][:20])
        index.save(tmp_path / "saved")
    db = tmp_path / "m.db"
    shutil.rmtree(db) if db.is_dir() else db.unlink()
    with pytest.raises(ValueError, match="is missing"):
        Index.load(tmp_path / "saved")
