"""Retrieval metrics against a deliberately naive, loop-by-loop NumPy reference."""

import math

import numpy as np
import pytest
from keras import ops

from keras_dml import distances
from keras_dml.evaluation import nearest_neighbors, retrieval, retrieval_metrics

DISTANCES = ["cosine", "euclidean", "squared_euclidean", "dot", "angular"]


def naive_distance(a, b, name):
    if callable(name):
        return name(a, b)
    a = [float(v) for v in a]
    b = [float(v) for v in b]
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    if name in ("cosine", "angular"):
        norm_a = math.sqrt(sum(x * x for x in a))
        norm_b = math.sqrt(sum(y * y for y in b))
        cos = dot / (norm_a * norm_b)
        return 1.0 - cos if name == "cosine" else max(1.0 - cos, 0.0)
    if name == "dot":
        return -dot
    squared = sum((x - y) ** 2 for x, y in zip(a, b, strict=True))
    return squared if name == "squared_euclidean" else math.sqrt(squared)


def naive_ranking(query, references, name, skip=None):
    """Reference indices sorted by distance, ties to the lower index."""
    candidates = [j for j in range(len(references)) if j != skip]
    dists = {j: naive_distance(query, references[j], name) for j in candidates}
    return sorted(candidates, key=lambda j: (dists[j], j)), dists


def naive_metrics(embeddings, labels, ref_embeddings=None, ref_labels=None, ks=(1, 2, 4, 8),
                  name="cosine"):
    leave_one_out = ref_embeddings is None
    if leave_one_out:
        ref_embeddings, ref_labels = embeddings, labels
    totals = {"precision_at_1": 0.0, **{f"recall_at_{k}": 0.0 for k in ks},
              "r_precision": 0.0, "map_at_r": 0.0}
    scored = 0
    for i in range(len(embeddings)):
        skip = i if leave_one_out else None
        ranking, _ = naive_ranking(embeddings[i], ref_embeddings, name, skip)
        relevant = [ref_labels[j] == labels[i] for j in ranking]
        r = sum(relevant)
        if r == 0:
            continue
        scored += 1
        totals["precision_at_1"] += relevant[0]
        for k in ks:
            totals[f"recall_at_{k}"] += any(relevant[:k])
        totals["r_precision"] += sum(relevant[:r]) / r
        hits, average_precision = 0, 0.0
        for position in range(r):
            if relevant[position]:
                hits += 1
                average_precision += hits / (position + 1)
        totals["map_at_r"] += average_precision / r
    if scored == 0:
        return {key: float("nan") for key in totals}
    return {key: value / scored for key, value in totals.items()}


def naive_nmi(classes, clusters):
    n = len(classes)
    class_ids, cluster_ids = sorted(set(classes)), sorted(set(clusters))

    def entropy(values, ids):
        h = 0.0
        for v in ids:
            p = sum(1 for x in values if x == v) / n
            h -= p * math.log(p)
        return h

    mutual = 0.0
    for c in class_ids:
        for k in cluster_ids:
            joint = sum(1 for a, b in zip(classes, clusters, strict=True) if a == c and b == k) / n
            if joint:
                p_c = sum(1 for a in classes if a == c) / n
                p_k = sum(1 for b in clusters if b == k) / n
                mutual += joint * math.log(joint / (p_c * p_k))
    h_classes, h_clusters = entropy(classes, class_ids), entropy(clusters, cluster_ids)
    if h_classes == 0 and h_clusters == 0:
        return 1.0
    return mutual / ((h_classes + h_clusters) / 2)


def random_set(seed, n=40, dim=6, classes=5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    centres = rng.normal(size=(classes, dim))
    embeddings = centres[labels] * 0.8 + rng.normal(size=(n, dim))
    return embeddings.astype("float32"), labels


def assert_metrics_close(actual, expected, atol=1e-6):
    assert list(actual)[: len(expected)] == list(expected)
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=atol, nan_ok=True), key


@pytest.mark.parametrize("name", DISTANCES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_leave_one_out_matches_naive_reference(name, seed):
    embeddings, labels = random_set(seed)
    actual = retrieval_metrics(embeddings, labels, distance=name, nmi=False)
    assert_metrics_close(actual, naive_metrics(embeddings, labels, name=name))
    assert "nmi" not in actual


@pytest.mark.parametrize("name", ["cosine", "euclidean"])
@pytest.mark.parametrize("seed", [3, 4])
def test_reference_set_matches_naive_reference(name, seed):
    queries, query_labels = random_set(seed, n=25)
    references, ref_labels = random_set(seed + 100, n=50)
    # Class 7 has no reference: those queries are left out.
    query_labels[:3] = 7
    actual = retrieval_metrics(queries, query_labels, references, ref_labels, k=(1, 3, 5),
                               distance=name, nmi=False)
    expected = naive_metrics(queries, query_labels, references, ref_labels, ks=(1, 3, 5),
                             name=name)
    assert_metrics_close(actual, expected)


def test_keys_and_order():
    embeddings, labels = random_set(0)
    metrics = retrieval_metrics(embeddings, labels)
    assert list(metrics) == ["precision_at_1", "recall_at_1", "recall_at_2", "recall_at_4",
                             "recall_at_8", "r_precision", "map_at_r", "nmi"]
    assert all(type(v) is float for v in metrics.values())
    assert list(retrieval_metrics(embeddings, labels, k=5, nmi=False)) == [
        "precision_at_1", "recall_at_5", "r_precision", "map_at_r"]


def test_hand_computed_example():
    # 1-D points, euclidean; labels a a b b a. Leave-one-out rankings by hand:
    # q0 (0.0): 1(a) 2(b) 3(b) 4(a)  R=2  P@1=1 R-prec=1/2 AP=(1/1)/2
    # q1 (1.0): 0(a) 2(b) 3(b) 4(a)  R=2  P@1=1 R-prec=1/2 AP=1/2
    # q2 (2.5): 3(b) 1(a) 0(a) 4(a)  R=1  P@1=1 R-prec=1   AP=1
    # q3 (3.0): 2(b) 1(a) 0(a) 4(a)  R=1  P@1=1 R-prec=1   AP=1
    # q4 (9.0): 3(b) 2(b) 1(a) 0(a)  R=2  P@1=0 R-prec=0   AP=0
    x = np.array([[0.0], [1.0], [2.5], [3.0], [9.0]], "float32")
    labels = ["a", "a", "b", "b", "a"]
    metrics = retrieval_metrics(x, labels, k=(1, 2, 3), distance="euclidean", nmi=False)
    assert metrics["precision_at_1"] == pytest.approx(4 / 5)
    assert metrics["recall_at_2"] == pytest.approx(4 / 5)
    assert metrics["recall_at_3"] == pytest.approx(5 / 5)
    assert metrics["r_precision"] == pytest.approx((0.5 + 0.5 + 1 + 1 + 0) / 5)
    assert metrics["map_at_r"] == pytest.approx((0.5 + 0.5 + 1 + 1 + 0) / 5)


def test_single_sample_classes_are_left_out():
    embeddings, labels = random_set(5, n=30, classes=4)
    labels = labels.copy()
    labels[[0, 1, 2]] = [10, 11, 12]  # three classes of one sample each
    actual = retrieval_metrics(embeddings, labels, nmi=False)
    assert_metrics_close(actual, naive_metrics(embeddings, labels))
    scored_only = retrieval_metrics(embeddings[3:], labels[3:], nmi=False)
    # Lone queries are out of the averages but stay in the search as references.
    assert actual != scored_only


def test_all_lone_queries_give_nan_with_a_warning():
    x = np.eye(4, dtype="float32")
    with pytest.warns(UserWarning, match="No query"):
        metrics = retrieval_metrics(x, [0, 1, 2, 3])
    assert math.isnan(metrics["map_at_r"]) and math.isnan(metrics["precision_at_1"])
    assert metrics["nmi"] == pytest.approx(1.0)
    with pytest.warns(UserWarning):
        assert math.isnan(retrieval_metrics(x[:1], [0])["recall_at_1"])


@pytest.mark.parametrize("name", ["dot", "squared_euclidean", "euclidean"])
def test_ties_go_to_the_lower_index(name):
    # Small integer vectors: every score is exact in float32, so ties are real ties.
    rng = np.random.default_rng(7)
    x = rng.integers(-1, 2, size=(30, 3)).astype("float32")
    labels = rng.integers(0, 3, size=30)
    actual = retrieval_metrics(x, labels, k=(1, 2, 4, 8), distance=name, nmi=False)
    assert_metrics_close(actual, naive_metrics(x, labels, name=name))


def test_duplicate_embeddings():
    x = np.repeat(np.eye(3, dtype="float32"), 4, axis=0)
    labels = np.array([0, 1, 0, 1, 2, 2, 2, 2, 0, 0, 1, 1])
    actual = retrieval_metrics(x, labels, nmi=False)
    assert_metrics_close(actual, naive_metrics(x, labels))


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_chunking_does_not_change_results(batch_size):
    embeddings, labels = random_set(8, n=50)
    full = retrieval_metrics(embeddings, labels, nmi=False)
    assert retrieval_metrics(embeddings, labels, nmi=False, batch_size=batch_size) == full


def test_chunks_never_hold_all_pairs(monkeypatch):
    shapes = []
    scores = retrieval._Scorer.scores

    def recording_scores(self, queries):
        result = scores(self, queries)
        shapes.append(tuple(result.shape))
        return result

    monkeypatch.setattr(retrieval._Scorer, "scores", recording_scores)
    embeddings, labels = random_set(9, n=60)
    retrieval_metrics(embeddings, labels, batch_size=7, nmi=False)
    assert shapes and max(rows for rows, _ in shapes) == 7
    # The default chunk for 100,000 references is a 256 MiB slice, not 100,000 rows.
    rows = retrieval._chunk_rows(None, 100_000, k=8)
    assert rows * 100_000 * 4 <= 256 * 2**20 and rows < 1000
    # Large classes (a long top-k per query) shrink the chunk further.
    assert retrieval._chunk_rows(None, 100_000, k=65_536) < rows


def test_default_chunks_follow_class_sizes(monkeypatch):
    monkeypatch.setattr(retrieval, "_CHUNK_BYTES", 8 * 4 * 200)
    shapes = []
    scores = retrieval._Scorer.scores

    def recording_scores(self, queries):
        result = scores(self, queries)
        shapes.append(tuple(result.shape))
        return result

    monkeypatch.setattr(retrieval._Scorer, "scores", recording_scores)
    rng = np.random.default_rng(16)
    labels = np.concatenate([np.repeat(np.arange(40), 2), np.full(120, 99)])  # R = 1 and 119
    embeddings = rng.normal(size=(200, 4)).astype("float32")
    actual = retrieval_metrics(embeddings, labels, nmi=False)
    assert len(shapes) > 2 and min(rows for rows, _ in shapes) < max(rows for rows, _ in shapes)
    assert_metrics_close(actual, naive_metrics(embeddings, labels))


def test_nmi_matches_naive_formula():
    embeddings, labels = random_set(10, n=60, classes=4)
    metrics = retrieval_metrics(embeddings, labels, seed=3)
    clusters = retrieval._kmeans_assignments(retrieval._l2_normalize(embeddings), 4, seed=3)
    assert metrics["nmi"] == pytest.approx(naive_nmi(labels.tolist(), clusters.tolist()))
    assert retrieval_metrics(embeddings, labels, seed=3)["nmi"] == metrics["nmi"]


def test_nmi_is_one_for_separated_classes():
    rng = np.random.default_rng(11)
    labels = np.repeat(np.arange(5), 10)
    embeddings = np.eye(5)[labels] * 10 + rng.normal(scale=0.01, size=(50, 5))
    metrics = retrieval_metrics(embeddings, labels, distance="euclidean")
    assert metrics["nmi"] == pytest.approx(1.0)
    assert metrics["map_at_r"] == pytest.approx(1.0)
    assert metrics["precision_at_1"] == pytest.approx(1.0)


def test_accepts_tensors_column_labels_strings_and_half_precision():
    embeddings, labels = random_set(12)
    expected = retrieval_metrics(embeddings, labels, nmi=False)
    as_tensors = retrieval_metrics(
        ops.convert_to_tensor(embeddings), ops.convert_to_tensor(labels.reshape(-1, 1)), nmi=False
    )
    assert as_tensors == expected
    as_strings = retrieval_metrics(embeddings, [f"class-{v}" for v in labels], nmi=False)
    assert as_strings == expected
    bfloat16 = ops.cast(ops.convert_to_tensor(embeddings), "bfloat16")
    assert_metrics_close(
        retrieval_metrics(bfloat16, labels, nmi=False),
        naive_metrics(np.asarray(ops.convert_to_numpy(ops.cast(bfloat16, "float32"))), labels),
    )
    half = embeddings.astype("float16")
    assert_metrics_close(
        retrieval_metrics(half, labels, nmi=False),
        naive_metrics(half.astype("float32"), labels),
    )


def test_custom_distance_object():
    manhattan = distances.Distance(
        "manhattan",
        lambda x, y=None: ops.sum(ops.abs(ops.expand_dims(x, 1) - ops.expand_dims(y, 0)), -1),
        is_similarity=False,
    )

    def naive_manhattan(a, b):
        return sum(abs(float(x) - float(y)) for x, y in zip(a, b, strict=True))

    embeddings, labels = random_set(13, n=20)
    actual = retrieval_metrics(embeddings, labels, distance=manhattan, nmi=False)
    assert_metrics_close(actual, naive_metrics(embeddings, labels, name=naive_manhattan),
                         atol=1e-5)


@pytest.mark.parametrize("name", DISTANCES)
def test_nearest_neighbors_matches_naive(name):
    queries, _ = random_set(14, n=12)
    references, _ = random_set(15, n=30)
    indices, dists = nearest_neighbors(queries, references, k=5, distance=name, batch_size=4)
    for i in range(len(queries)):
        ranking, naive = naive_ranking(queries[i], references, name)
        assert indices[i].tolist() == ranking[:5]
        np.testing.assert_allclose(dists[i], [naive[j] for j in ranking[:5]], atol=1e-4)


def test_nearest_neighbors_leave_one_out_never_returns_self():
    x = np.repeat(np.eye(2, dtype="float32"), 3, axis=0)  # three copies of each point
    indices, dists = nearest_neighbors(x, k=5)
    assert not np.any(indices == np.arange(6)[:, None])
    assert indices[0].tolist() == [1, 2, 3, 4, 5]  # ties go to the lower index
    np.testing.assert_allclose(dists[0], [0, 0, 1, 1, 1], atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"embeddings": np.zeros((4,))}, "`embeddings` must be embeddings of shape"),
        ({"embeddings": np.zeros((0, 3))}, "`embeddings` is empty"),
        ({"labels": [0, 1, 2]}, "`labels` has 3 labels but `embeddings` has 4"),
        # (4, 2) labels are multi-hot label sets (issue 19); rank 3 is refused.
        ({"labels": np.zeros((4, 2, 2))}, "`labels` must be labels of shape"),
        ({"labels": [0.0, 1.0, np.nan, 1.0]}, "`labels` contains NaN"),
        ({"embeddings": np.array([[0.0, 1.0]] * 3 + [[np.nan, 0.0]])}, "`embeddings` contains NaN"),
        ({"reference_embeddings": np.ones((3, 2))}, "given together"),
        ({"reference_labels": [0, 1, 2]}, "given together"),
        ({"reference_embeddings": np.ones((3, 5)), "reference_labels": [0, 1, 2]},
         "`reference_embeddings` have dimension 5"),
        ({"reference_embeddings": np.ones((3, 2)), "reference_labels": [0, 1]},
         "`reference_labels` has 2 labels"),
        ({"k": 0}, "`k` must be a positive integer"),
        ({"k": (1, 2.5)}, "`k` must be a positive integer"),
        ({"k": ()}, "`k` must be a positive integer"),
        ({"distance": "hamming"}, "Unknown `distance`"),
        ({"batch_size": 0}, "`batch_size` must be a positive integer"),
        ({"embeddings": np.ones((4, 2), bool)}, "`embeddings` must hold real numbers"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(kwargs, match):
    args = {"embeddings": np.eye(4, 2, dtype="float32"), "labels": [0, 0, 1, 1], **kwargs}
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(**args)


def test_nearest_neighbors_bad_k():
    with pytest.raises(ValueError, match=r"`k` must be an integer in \[1, 3\]"):
        nearest_neighbors(np.eye(4, dtype="float32"), k=4)
    with pytest.raises(ValueError, match="`references` have dimension 3"):
        nearest_neighbors(np.eye(4, 2, dtype="float32"), np.eye(3, dtype="float32"), k=1)


# --- The chunked NumPy path (issue 21) against a vectorised full-matrix reference ---


def matrix_metrics(embeddings, labels, ref_embeddings=None, ref_labels=None, ks=(1, 2, 4, 8),
                   name="cosine"):
    """The same metrics from the full float64 distance matrix and one stable argsort per row."""
    leave_one_out = ref_embeddings is None
    if leave_one_out:
        ref_embeddings, ref_labels = embeddings, labels
    q, r = np.asarray(embeddings, "float64"), np.asarray(ref_embeddings, "float64")
    if name in ("cosine", "angular"):
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        r = r / np.linalg.norm(r, axis=1, keepdims=True)
    if name in ("cosine", "angular", "dot"):
        dist = -q @ r.T
    else:
        dist = np.sum(np.square(q[:, None, :] - r[None, :, :]), axis=-1)
    if leave_one_out:
        np.fill_diagonal(dist, np.inf)
    order = np.argsort(dist, axis=1, kind="stable")
    if leave_one_out:
        order = order[:, :-1]
    relevant = np.asarray(ref_labels)[order] == np.asarray(labels)[:, None]
    r_count = relevant.sum(axis=1)
    scored = r_count > 0
    relevant, r_count = relevant[scored], r_count[scored]
    if not len(r_count):
        return None
    ranks = np.arange(1, relevant.shape[1] + 1)
    within_r = ranks[None, :] <= r_count[:, None]
    precision = np.cumsum(relevant, axis=1) / ranks
    out = {"precision_at_1": relevant[:, 0].mean()}
    for k in ks:
        out[f"recall_at_{k}"] = relevant[:, :k].any(axis=1).mean()
    out["r_precision"] = ((relevant & within_r).sum(axis=1) / r_count).mean()
    out["map_at_r"] = ((precision * relevant * within_r).sum(axis=1) / r_count).mean()
    return out


def clustered_set(seed, n=600, dim=8, classes=60, integer=False):
    """Many small classes, so that `_top_k` takes its grouped path (N >> 8k)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    if integer:  # small integer vectors: float32 scores are exact, ties are real ties
        return rng.integers(-1, 2, size=(n, dim)).astype("float32"), labels
    centres = rng.normal(size=(classes, dim))
    return (centres[labels] + 0.7 * rng.normal(size=(n, dim))).astype("float32"), labels


def test_top_k_matches_a_stable_full_sort():
    rng = np.random.default_rng(30)
    for n in (1, 7, 64, 100, 1000, 1063, 4097):
        for data in ("normal", "ties"):
            scores = (rng.normal(size=(9, n)) if data == "normal"
                      else rng.integers(-2, 3, size=(9, n))).astype("float32")
            for k in sorted({1, 2, 5, min(n, 31), max(1, n // 8), n}):
                if k > n:
                    continue
                values, indices = retrieval._top_k(scores, k)
                expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
                np.testing.assert_array_equal(indices, expected)
                np.testing.assert_array_equal(values, np.take_along_axis(scores, expected, 1))


def test_top_k_every_group_layout():
    """Every (N, k) up to N = 300: groups of unequal sizes, a short last round."""
    rng = np.random.default_rng(32)
    for n in range(1, 301):
        scores = rng.integers(-3, 4, size=(3, n)).astype("float32")
        for k in {1, 2, 3, max(1, n // 5), n}:
            values, indices = retrieval._top_k(scores, k)
            expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            np.testing.assert_array_equal(indices, expected, err_msg=f"n={n}, k={k}")
            np.testing.assert_array_equal(values, np.take_along_axis(scores, expected, 1))


def test_nearest_neighbors_k1_among_200_references():
    # Regression: 200 references and k=1 once failed to reshape the group maxima.
    rng = np.random.default_rng(33)
    queries, references = rng.normal(size=(5, 8)), rng.normal(size=(200, 8))
    indices, _ = nearest_neighbors(queries, references, k=1, distance="dot")
    np.testing.assert_array_equal(indices[:, 0], np.argmax(queries @ references.T, axis=1))


def test_top_k_negative_zero_ties_zero_and_nan_is_refused():
    scores = np.array([[0.0, -0.0, 1.0, -0.0, 0.0, -1.0] * 50], "float32")
    _, indices = retrieval._top_k(scores, 5)
    np.testing.assert_array_equal(indices[0], [2, 8, 14, 20, 26])
    _, indices = retrieval._top_k(scores, 60)
    zeros = np.flatnonzero(scores[0] == 0)
    np.testing.assert_array_equal(indices[0, 50:], zeros[:10])
    scores[0, 7] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        retrieval._top_k(scores[:, :12], 12)


def test_top_k_rows_tied_at_the_cut_are_ordered_a_few_rows_at_a_time(monkeypatch):
    # Whole rows tied: every entry is a candidate, more than `_CANDIDATES` in all.
    monkeypatch.setattr(retrieval, "_CANDIDATES", 700)
    rng = np.random.default_rng(34)
    scores = rng.integers(0, 2, size=(9, 400)).astype("float32")
    scores[2:5] = 1.0
    mask = np.empty(scores.shape, bool)
    for k in (1, 30, 400):
        values, indices = retrieval._top_k(scores, k, mask)
        expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(indices, expected)
        np.testing.assert_array_equal(values, np.take_along_axis(scores, expected, 1))


# One block, a row a thread, two blocks, several.
@pytest.mark.parametrize("rows, per_thread", [(1, 64), (2, 1), (127, 64), (128, 64), (300, 64)])
def test_threaded_top_k_equals_top_k(rows, per_thread, monkeypatch):
    monkeypatch.setattr(retrieval.os, "sched_getaffinity", lambda pid: set(range(4)),
                        raising=False)
    monkeypatch.setattr(retrieval, "_SCORES_PER_THREAD", per_thread * 500)  # rows a thread
    rng = np.random.default_rng(31)
    scores = rng.integers(-3, 4, size=(rows, 500)).astype("float32")  # many ties
    for k in (1, 17, 500):
        values, indices = retrieval._top_k_threaded(scores, k)
        want_values, want_indices = retrieval._top_k(scores, k)
        np.testing.assert_array_equal(indices, want_indices)
        np.testing.assert_array_equal(values, want_values)


# Integer vectors give exact float32 scores, so ties are real ties; not once normalised.
EXACT_CASES = [(name, False) for name in DISTANCES] + [
    (name, True) for name in ("dot", "euclidean", "squared_euclidean")
]


@pytest.mark.parametrize("name, integer", EXACT_CASES)
def test_leave_one_out_matches_full_matrix_reference(name, integer):
    embeddings, labels = clustered_set(31, integer=integer)
    labels[:5] = 1000 + np.arange(5)  # single-sample classes: left out
    expected = matrix_metrics(embeddings, labels, name=name)
    for batch_size in (None, 37):
        actual = retrieval_metrics(embeddings, labels, distance=name, nmi=False,
                                   batch_size=batch_size)
        assert_metrics_close(actual, expected)


@pytest.mark.parametrize("name, integer", EXACT_CASES)
def test_reference_set_matches_full_matrix_reference(name, integer):
    queries, query_labels = clustered_set(32, n=150, integer=integer)
    references, ref_labels = clustered_set(33, n=700, integer=integer)
    query_labels[:4] = 999  # no reference of their class: left out
    expected = matrix_metrics(queries, query_labels, references, ref_labels, ks=(1, 3, 10),
                              name=name)
    actual = retrieval_metrics(queries, query_labels, references, ref_labels, k=(1, 3, 10),
                               distance=name, nmi=False, batch_size=64)
    assert_metrics_close(actual, expected)


@pytest.mark.parametrize("name, integer", EXACT_CASES)
def test_references_in_blocks_give_the_same_neighbours_and_metrics(name, integer, monkeypatch):
    # 700 references in blocks of 53 (the last one of 11), some k above a block.
    queries, query_labels = clustered_set(36, n=150, integer=integer)
    references, ref_labels = clustered_set(37, n=700, integer=integer)
    want = nearest_neighbors(queries, references, k=80, distance=name)
    want_self = nearest_neighbors(references, k=9, distance=name)
    monkeypatch.setattr(retrieval, "_BLOCK_COLUMNS", 53)
    for got, expected in ((nearest_neighbors(queries, references, k=80, distance=name), want),
                          (nearest_neighbors(references, k=9, distance=name), want_self)):
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_allclose(got[1], expected[1], rtol=1e-6, atol=1e-6)
    expected = matrix_metrics(queries, query_labels, references, ref_labels, ks=(1, 3, 10),
                              name=name)
    for batch_size in (None, 37):
        actual = retrieval_metrics(queries, query_labels, references, ref_labels,
                                   k=(1, 3, 10), distance=name, nmi=False,
                                   batch_size=batch_size)
        assert_metrics_close(actual, expected)
    actual = retrieval_metrics(references, ref_labels, distance=name, nmi=False)
    assert_metrics_close(actual, matrix_metrics(references, ref_labels, name=name))


@pytest.mark.parametrize("k", [5, 20, 80, 700])
def test_blocks_of_references_in_ascending_order_of_score(k, monkeypatch):
    # For the first query every later block lies wholly above the k-th best so far:
    # with k < 53 the block's own top-k is taken instead (bounded memory; k = 5: more
    # than k per row on average, k = 20: in one row only), with k >= 53 all of it merges.
    angles = np.linspace(1.5, 0.0, 700)
    references = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype("float32")
    queries = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]], "float32")
    want = nearest_neighbors(queries, references, k=k)
    monkeypatch.setattr(retrieval, "_BLOCK_COLUMNS", 53)
    got = nearest_neighbors(queries, references, k=k)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[0][0], np.argsort(-(references @ queries[0]),
                                                        kind="stable")[:k])


def test_blocks_let_a_chunk_hold_more_queries():
    k = 1152  # the R of 1,000 classes among 1,000,000 references
    whole = retrieval._chunk_rows(None, 1_000_000, k)
    blocked = retrieval._chunk_rows(None, 1_000_000, k, retrieval._BLOCK_COLUMNS)
    assert blocked >= 4 * whole
    assert blocked * (5 * retrieval._BLOCK_COLUMNS + 16 * k * 8) <= retrieval._CHUNK_BYTES


def test_backend_matmul_path_gives_the_same_metrics(monkeypatch):
    # On a GPU/TPU the backend computes the scores; forced here on the CPU.
    embeddings, labels = clustered_set(34)
    expected = {name: retrieval_metrics(embeddings, labels, distance=name, nmi=False)
                for name in DISTANCES}
    monkeypatch.setattr(retrieval, "_backend_has_accelerator", lambda: True)
    for name in DISTANCES:
        actual = retrieval_metrics(embeddings, labels, distance=name, nmi=False)
        assert_metrics_close(actual, expected[name])


@pytest.mark.parametrize("with_references", [False, True])
def test_matches_pytorch_metric_learning(with_references):
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    embeddings, labels = clustered_set(35, n=1500, dim=16, classes=40)
    calculator = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count",
        knn_func=CustomKNN(CosineSimilarity(), batch_size=256),  # faiss is not a dependency
    )
    args = [embeddings, labels]
    if with_references:
        args = [embeddings[:300], labels[:300], embeddings[300:], labels[300:]]
    expected = calculator.get_accuracy(*[torch.from_numpy(np.asarray(a)) for a in args])
    actual = retrieval_metrics(*args, nmi=False)
    assert actual["precision_at_1"] == pytest.approx(expected["precision_at_1"], abs=1e-6)
    assert actual["map_at_r"] == pytest.approx(expected["mean_average_precision_at_r"],
                                               abs=1e-6)


def test_exact_nmi_is_the_full_kmeans_and_close_to_the_default():
    embeddings, labels = random_set(36, n=400, classes=8)
    points = retrieval._l2_normalize(embeddings)
    exact = retrieval_metrics(embeddings, labels, nmi="exact", seed=2)["nmi"]
    clusters = retrieval._kmeans_assignments(points, 8, seed=2, exact=True)
    assert exact == pytest.approx(naive_nmi(labels.tolist(), clusters.tolist()))
    # Below 32 points per cluster the default seeds on every point, as the exact one.
    default = retrieval_metrics(embeddings, labels, seed=2)["nmi"]
    assert default == pytest.approx(exact, abs=0.05)
    with pytest.raises(ValueError, match="`nmi` must be"):
        retrieval_metrics(embeddings, labels, nmi="fast")


def kmeans_set(seed, per_class=25, classes=12, dim=8, spread=0.6):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    centres = rng.normal(size=(classes, dim))
    embeddings = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    return embeddings.astype("float32"), labels


def reference_kmeans(points, k, seed, kmeans_plus_plus):
    """The default k-means by its definition: k-means++ on every point (small sets) or k
    distinct points drawn with the seed, then at most 25 float32 Lloyd iterations."""
    from sklearn.cluster import KMeans, kmeans_plusplus

    points = points.astype("float32")
    if kmeans_plus_plus:
        centres = kmeans_plusplus(points.astype("float64"), k, random_state=seed)[0]
    else:
        rng = np.random.default_rng(seed)
        centres = points[np.sort(rng.choice(len(points), k, replace=False))]
    kmeans = KMeans(k, init=centres.astype("float32"), n_init=1, max_iter=25, random_state=seed)
    return kmeans.fit_predict(points)


@pytest.mark.parametrize("budget, kmeans_plus_plus", [(5_000_000, True), (0, False)])
def test_default_kmeans_follows_its_definition(monkeypatch, budget, kmeans_plus_plus):
    # The default budget seeds 300 points x 12 clusters with k-means++ on every point;
    # a zero budget leaves under 4 sample points per cluster: k distinct random points.
    monkeypatch.setattr(retrieval, "_KMEANS_SEED_BUDGET", budget)
    embeddings, labels = kmeans_set(3)
    points = retrieval._l2_normalize(embeddings)
    for seed in (0, 5):
        got = retrieval._kmeans_assignments(points, 12, seed)
        np.testing.assert_array_equal(got, reference_kmeans(points, 12, seed, kmeans_plus_plus))
        metrics = retrieval_metrics(embeddings, labels, seed=seed)
        assert metrics["nmi"] == pytest.approx(naive_nmi(labels.tolist(), got.tolist()))


@pytest.mark.parametrize("budget", [5_000_000, 0])
def test_default_nmi_is_deterministic_and_close_to_exact(monkeypatch, budget):
    monkeypatch.setattr(retrieval, "_KMEANS_SEED_BUDGET", budget)
    embeddings, labels = kmeans_set(4)
    for seed in (0, 1, 2):
        default = retrieval_metrics(embeddings, labels, seed=seed)["nmi"]
        assert retrieval_metrics(embeddings, labels, seed=seed)["nmi"] == default
        exact = retrieval_metrics(embeddings, labels, seed=seed, nmi="exact")["nmi"]
        assert 0.5 < exact < 1.0
        assert default == pytest.approx(exact, abs=0.05)


def test_kmeans_seed_sample_is_bounded(monkeypatch):
    # k-means++ runs on a seeded sample of budget / (k (2 + int(ln k))) points when the
    # set is larger: here 120 of 300 points, 10 per cluster.
    from sklearn import cluster

    seen = []
    original = cluster.kmeans_plusplus

    def spy(points, n_clusters, **kwargs):
        seen.append(points.shape)
        return original(points, n_clusters, **kwargs)

    monkeypatch.setattr(cluster, "kmeans_plusplus", spy)
    monkeypatch.setattr(retrieval, "_KMEANS_SEED_BUDGET", 120 * 12 * (2 + int(np.log(12))))
    embeddings, _ = kmeans_set(5)
    first = retrieval._kmeans_assignments(embeddings, 12, seed=1)
    assert seen == [(120, 8)]
    np.testing.assert_array_equal(retrieval._kmeans_assignments(embeddings, 12, seed=1), first)


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, "0", None])
def test_bad_seed(seed):
    embeddings, labels = kmeans_set(6)
    with pytest.raises(ValueError, match="`seed` must be an integer"):
        retrieval_metrics(embeddings, labels, seed=seed)
