"""Tests for ShardedIndex: exact merge, ScaNN shards, persistence, faults, threads."""

from __future__ import annotations

import doctest
import json
import os
import threading

import numpy as np
import pytest

from keras_dml.index import ExactIndex, Index, ScaNNIndex, ShardedIndex
from keras_dml.index import sharded as sharded_module
from keras_dml.index.sharded import merge_top_k, shard_of_ids


def structured(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Clustered vectors (30 centres, intrinsic dimension 8), like trained embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(30, dim))
    basis = rng.normal(size=(8, dim)) / 3.0
    labels = rng.integers(0, 30, size=n)
    x = centres[labels] + rng.normal(size=(n, 8)) @ basis + 0.1 * rng.normal(size=(n, dim))
    return x.astype("float32")


@pytest.fixture(scope="module")
def data():
    x = structured(2_100, seed=3)
    return x[:2_000], x[2_000:]


def _exact(x, distance, ids=None, metadata=None):
    index = ExactIndex(distance=distance)
    index.add(x, ids=ids, metadata=metadata)
    return index


@pytest.mark.parametrize("distance", ["dot", "squared_l2"])
@pytest.mark.parametrize("num_shards", [2, 4])
def test_merged_exact_shards_equal_one_exact_index(data, distance, num_shards):
    x, queries = data
    ids = np.random.default_rng(0).permutation(10 * len(x))[: len(x)]
    one = _exact(x, distance, ids=ids)
    sharded = ShardedIndex(num_shards=num_shards, shard_class="ExactIndex", distance=distance)
    sharded.add(x, ids=ids)
    assert len(sharded) == len(x)
    assert all(len(shard) > 0 for shard in sharded.shards)
    assert sorted(sharded.ids.tolist()) == sorted(ids.tolist())
    for k in (1, 10, 50):
        expected_ids, expected_scores = one.search(queries, k)
        found_ids, found_scores = sharded.search(queries, k)
        np.testing.assert_array_equal(found_ids, expected_ids)
        np.testing.assert_allclose(found_scores, expected_scores, rtol=1e-5, atol=1e-5)
    # One query, 1-D: the same as the batched row.
    single_ids, single_scores = sharded.search(queries[3], 10)
    np.testing.assert_array_equal(single_ids, one.search(queries[3], 10)[0])
    assert single_ids.shape == single_scores.shape == (10,)


def test_merge_orders_ties_by_id_whatever_the_shard_order():
    ids = np.array([[9, 4, 7, 1]])
    scores = np.array([[0.5, 0.5, 0.9, 0.5]], np.float32)
    merged_ids, merged_scores = merge_top_k(ids, scores, 3, higher_is_better=True)
    assert merged_ids.tolist() == [[7, 1, 4]]
    assert merged_scores.tolist() == [[pytest.approx(0.9), 0.5, 0.5]]
    merged_ids, _ = merge_top_k(ids[:, ::-1], scores[:, ::-1], 3, higher_is_better=True)
    assert merged_ids.tolist() == [[7, 1, 4]]
    # Distances: smaller first.
    merged_ids, _ = merge_top_k(ids, scores, 2, higher_is_better=False)
    assert merged_ids.tolist() == [[1, 4]]


def test_k_larger_than_a_shard_still_returns_the_global_top_k():
    x = structured(40, seed=1)
    sharded = ShardedIndex(num_shards=8)
    sharded.add(x)
    assert min(len(s) for s in sharded.shards) < 10
    found_ids, _ = sharded.search(x[:5], 40)
    np.testing.assert_array_equal(found_ids, _exact(x, "dot").search(x[:5], 40)[0])


def test_shard_of_ids_is_stable_and_balanced():
    # Fixed values: the placement must never change between versions.
    assert shard_of_ids([0, 1, 2, 3], 2).tolist() == [0, 1, 0, 0]
    assert shard_of_ids(np.array(["a", "b", "c"]), 3).tolist() == shard_of_ids(
        ["a", "b", "c"], 3
    ).tolist()
    counts = np.bincount(shard_of_ids(np.arange(40_000), 4), minlength=4)
    assert counts.min() > 9_500
    with pytest.raises(ValueError, match="num_shards"):
        shard_of_ids([1], 0)


def test_scann_shards_recall_at_10(data):
    x = structured(24_000, seed=5)
    base, queries = x[:23_800], x[23_800:]
    truth = _exact(base, "dot").search(queries, 10)[0]
    # 4 shards of ~6k items; a low threshold so each shard builds its tree.
    sharded = ShardedIndex(
        num_shards=4, shard_class=ScaNNIndex, shard_config={"brute_force_threshold": 1000}
    )
    sharded.add(base)
    assert all(shard.uses_tree for shard in sharded.shards)
    sharded.build()
    found = sharded.search(queries, 10)[0]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)])
    assert recall >= 0.95, recall


def test_save_load_round_trip_with_string_ids_and_metadata(tmp_path, data):
    x, queries = data
    ids = np.array([f"item-{i}" for i in range(len(x))])
    metadata = [{"row": i} for i in range(len(x))]
    sharded = ShardedIndex(num_shards=3, distance="squared_l2")
    sharded.add(x, ids=ids, metadata=metadata)
    path = tmp_path / "sharded"
    sharded.save(path, info={"model": "m1"})
    assert sorted(os.listdir(path)) == ["index.json", "shard-00000", "shard-00001", "shard-00002"]
    loaded = Index.load(path)
    assert isinstance(loaded, ShardedIndex)
    assert ShardedIndex.load(path).num_shards == 3
    assert Index.saved_info(path) == {"model": "m1"}
    assert loaded.get_config() == sharded.get_config()
    for a, b in zip(loaded.search(queries, 10), sharded.search(queries, 10), strict=True):
        np.testing.assert_array_equal(a, b)
    assert loaded.get_metadata(["item-5", "item-1999"]) == [{"row": 5}, {"row": 1999}]
    with pytest.raises(KeyError):
        loaded.get_metadata("nope")
    # Each shard is itself a saved index.
    assert len(Index.load(path / "shard-00001")) == len(sharded.shards[1])
    # Overwriting a saved sharded index works; a foreign file blocks it.
    sharded.save(path, overwrite=True)
    (path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        sharded.save(path, overwrite=True)


def test_scann_shards_save_load_search_identically(tmp_path):
    x = structured(6_000, seed=8)
    sharded = ShardedIndex(
        num_shards=2, shard_class="ScaNNIndex", shard_config={"brute_force_threshold": 1000}
    )
    sharded.add(x)
    path = tmp_path / "scann_shards"
    sharded.save(path)
    loaded = Index.load(path)
    assert all(isinstance(s, ScaNNIndex) and s.uses_tree for s in loaded.shards)
    for a, b in zip(loaded.search(x[:50], 10), sharded.search(x[:50], 10), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture
def saved(tmp_path, data):
    sharded = ShardedIndex(num_shards=4)
    sharded.add(data[0])
    path = tmp_path / "sharded"
    sharded.save(path)
    return path


def test_missing_shard_names_the_shard(saved):
    import shutil

    shutil.rmtree(saved / "shard-00002")
    with pytest.raises(ValueError, match=r"shard 2 of 4 \('shard-00002'\) is missing"):
        Index.load(saved)


def test_truncated_shard_file_names_the_shard_and_the_file(saved):
    path = saved / "shard-00001" / "embeddings.npy"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match=r"shard 1 of 4 \('shard-00001'\).*embeddings.npy"):
        Index.load(saved)


def test_truncated_or_replaced_shard_header_names_the_shard(saved, tmp_path):
    header = saved / "shard-00003" / "index.json"
    text = header.read_text()
    header.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"shard 3 of 4 \('shard-00003'\)"):
        Index.load(saved)


def test_edited_manifest_is_rejected(saved):
    header = json.loads((saved / "index.json").read_text())
    header["shards"] = header["shards"][:3]
    (saved / "index.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match="checksum"):
        Index.load(saved)


WRONG_DIM = "dimension 31 but the index holds vectors of dimension 32"


def test_errors_match_the_other_indexes(data):
    x, queries = data
    sharded = ShardedIndex(num_shards=2)
    with pytest.raises(ValueError, match="empty"):
        sharded.search(queries, 1)
    sharded.add(x)
    with pytest.raises(ValueError, match=WRONG_DIM):
        sharded.search(queries[:, :31], 5)
    with pytest.raises(ValueError, match=WRONG_DIM):
        sharded.search(queries[0, :31], 5)
    bad = queries.copy()
    bad[1, 4] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        sharded.search(bad, 5)
    with pytest.raises(ValueError, match="larger than the number"):
        sharded.search(queries, len(x) + 1)
    with pytest.raises(ValueError, match="positive integer"):
        sharded.search(queries, 0)
    with pytest.raises(ValueError, match="dimension 31"):
        sharded.add(x[:3, :31])
    with pytest.raises(ValueError, match="already in the index"):
        sharded.add(x[:2], ids=[5, 100_000])
    with pytest.raises(ValueError, match="duplicates"):
        sharded.add(x[:2], ids=[100_001, 100_001])
    with pytest.raises(ValueError, match="integer ids"):
        sharded.add(x[:1], ids=["a"])
    with pytest.raises(ValueError, match="one entry per embedding"):
        sharded.add(x[:2], metadata=[{}])
    assert len(sharded) == len(x)  # nothing was added by the failed calls
    # Default ids continue after the largest one, across shards.
    sharded.add(x[:2])
    assert sorted(sharded.ids.tolist())[-2:] == [len(x), len(x) + 1]
    assert sharded.search(np.zeros((0, 32), np.float32), 3)[0].shape == (0, 3)
    with pytest.raises(ValueError, match="shard_class"):
        ShardedIndex(shard_class="NoSuchIndex")
    with pytest.raises(ValueError, match="num_shards"):
        ShardedIndex(num_shards=0)
    with pytest.raises(ValueError, match="distance"):
        ShardedIndex(shards=[ExactIndex(distance="dot"), ExactIndex(distance="squared_l2")])


def test_existing_shards_are_searched_together(data):
    x, queries = data
    first, second = ExactIndex(), ExactIndex()
    first.add(x[:700], ids=np.arange(700))
    second.add(x[700:], ids=np.arange(700, len(x)))
    together = ShardedIndex(shards=[first, second])
    np.testing.assert_array_equal(
        together.search(queries, 10)[0], _exact(x, "dot").search(queries, 10)[0]
    )
    with pytest.raises(ValueError, match="more than once"):
        ShardedIndex(shards=[first, first])


def test_concurrent_searches_equal_serial_ones(data):
    x, queries = data
    sharded = ShardedIndex(num_shards=4, max_workers=4)
    sharded.add(x)
    serial = [sharded.search(queries[i::4], 10) for i in range(4)]
    results: dict[int, list] = {}
    errors = []
    barrier = threading.Barrier(4)

    def work(worker):
        try:
            barrier.wait()
            results[worker] = [sharded.search(queries[worker::4], 10) for _ in range(20)]
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    for worker in range(4):
        for ids, scores in results[worker]:
            np.testing.assert_array_equal(ids, serial[worker][0])
            np.testing.assert_array_equal(scores, serial[worker][1])
    sharded.close()


def test_get_config_round_trip():
    sharded = ShardedIndex(
        num_shards=3,
        shard_class=ScaNNIndex,
        distance="squared_l2",
        shard_config={"leaves_to_search": 7},
        max_workers=2,
    )
    config = sharded.get_config()
    json.dumps(config)
    again = ShardedIndex.from_config(config)
    assert again.get_config() == config
    assert again.num_shards == 3
    assert all(isinstance(s, ScaNNIndex) and s.leaves_to_search == 7 for s in again.shards)


def test_docstrings():
    assert doctest.testmod(sharded_module).failed == 0
