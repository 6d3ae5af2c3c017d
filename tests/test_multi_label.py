"""Multi-label batches: multi-hot `(B, C)` labels in the label masks, losses and retrieval metrics.

NumPy loop references for the masks, the Jaccard overlap, the contrastive,
SupCon, batch-all triplet and multi-similarity losses and the retrieval
metrics; and one-hot labels giving exactly the single-label results (PML has
no multi-label support, so there is no parity test).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import loss_gradient

import keras_dml
from keras_dml.evaluation import retrieval_metrics
from keras_dml.losses.base import jaccard_overlap, label_masks, multi_hot

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="backend checks: test_xbm_multilabel_backends"
)


def label_sets(rng, n=10, classes=4, empty_row=True):
    sets = (rng.random((n, classes)) < 0.35).astype("int32")
    sets[np.arange(n), rng.integers(0, classes, n)] = 1  # at least one label ...
    if empty_row:
        sets[-1] = 0  # ... except one sample without any label
    return sets


def shares(a, b):
    return bool(np.any((a != 0) & (b != 0)))


def jaccard(a, b):
    a, b = a != 0, b != 0
    union = np.sum(a | b)
    return np.sum(a & b) / union if union else 0.0


def test_masks_and_jaccard_match_loops():
    rng = np.random.default_rng(0)
    sets, refs = label_sets(rng), label_sets(rng, n=7)
    positive, negative = (np.asarray(m) for m in label_masks(sets))
    overlap = np.asarray(jaccard_overlap(sets, refs))
    cross_positive, _ = (np.asarray(m) for m in label_masks(sets, refs))
    for i in range(len(sets)):
        for j in range(len(sets)):
            assert positive[i, j] == (i != j and shares(sets[i], sets[j]))
            assert negative[i, j] == (i != j and not shares(sets[i], sets[j]))
        for j in range(len(refs)):
            assert cross_positive[i, j] == shares(sets[i], refs[j])
            np.testing.assert_allclose(overlap[i, j], jaccard(sets[i], refs[j]), rtol=1e-6)


def test_multi_hot_converts_padded_label_lists():
    lists = np.array([[0, 2, -1], [3, -1, -1], [-1, -1, -1], [1, 1, 0]])
    expected = np.zeros((4, 4), "int32")
    for i, row in enumerate(lists):
        for label in row:
            if label >= 0:
                expected[i, label] = 1
    np.testing.assert_array_equal(np.asarray(multi_hot(lists, 4)), expected)


# -- NumPy loop references of the losses ------------------------------------------------


def pair_distances(x):
    return np.linalg.norm(x[:, None] - x[None], axis=-1)


def ref_contrastive(sets, x, mode="any", neg_margin=1.0):
    d = pair_distances(x.astype("float64"))
    pos_sum = pos_weight = neg_sum = neg_count = 0.0
    for i in range(len(x)):
        for j in range(len(x)):
            if i == j:
                continue
            if shares(sets[i], sets[j]):
                w = jaccard(sets[i], sets[j]) if mode == "jaccard" else 1.0
                pos_sum, pos_weight = pos_sum + w * d[i, j], pos_weight + w
            else:
                neg_sum, neg_count = neg_sum + max(neg_margin - d[i, j], 0.0), neg_count + 1
    return (pos_sum / pos_weight if pos_weight else 0.0) + (neg_sum / neg_count if neg_count else 0)


def ref_supcon(sets, x, mode="any", temperature=0.5):
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = z @ z.T / temperature
    losses = []
    for i in range(len(x)):
        others = [k for k in range(len(x)) if k != i]
        log_norm = np.log(np.sum(np.exp(s[i, others])))
        terms, weights = [], []
        for p in others:
            if shares(sets[i], sets[p]):
                terms.append(s[i, p] - log_norm)
                weights.append(jaccard(sets[i], sets[p]) if mode == "jaccard" else 1.0)
        if terms:
            losses.append(-np.dot(weights, terms) / np.sum(weights))
    return np.mean(losses) if losses else 0.0


def ref_triplet_all(sets, x, margin=0.2):
    d = pair_distances(x.astype("float64"))
    total, count = 0.0, 0
    for a in range(len(x)):
        for p in range(len(x)):
            if p == a or not shares(sets[a], sets[p]):
                continue
            for n in range(len(x)):
                if shares(sets[a], sets[n]):
                    continue
                term = max(d[a, p] - d[a, n] + margin, 0.0)
                total, count = total + term, count + (term > 0)
    return total / max(count, 1)


def ref_multi_similarity(sets, x, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1):
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = z @ z.T
    total = 0.0
    for i in range(len(x)):
        pos = [j for j in range(len(x)) if j != i and shares(sets[i], sets[j])]
        neg = [j for j in range(len(x)) if not shares(sets[i], sets[j])]
        if not pos or not neg:
            continue
        mined_pos = [p for p in pos if s[i, p] - epsilon < max(s[i, neg])]
        mined_neg = [n for n in neg if s[i, n] + epsilon > min(s[i, pos])]
        if not mined_pos or not mined_neg:
            continue
        total += np.log1p(np.sum(np.exp(-alpha * (s[i, mined_pos] - base)))) / alpha
        total += np.log1p(np.sum(np.exp(beta * (s[i, mined_neg] - base)))) / beta
    return total / len(x)


REFERENCES = {
    "contrastive_any": (lambda: keras_dml.ContrastiveLoss(), ref_contrastive),
    "contrastive_jaccard": (lambda: keras_dml.ContrastiveLoss(multi_label="jaccard"),
                            lambda s, x: ref_contrastive(s, x, "jaccard")),
    "supcon_any": (lambda: keras_dml.SupConLoss(temperature=0.5, base_temperature=0.5),
                   ref_supcon),
    "supcon_jaccard": (lambda: keras_dml.SupConLoss(temperature=0.5, base_temperature=0.5,
                                                    multi_label="jaccard"),
                       lambda s, x: ref_supcon(s, x, "jaccard")),
    "triplet_all": (lambda: keras_dml.TripletLoss(negative_mining="all"), ref_triplet_all),
    "multi_similarity": (lambda: keras_dml.MultiSimilarityLoss(), ref_multi_similarity),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
@pytest.mark.parametrize("seed", [0, 1])
def test_multi_label_losses_match_loop_references(name, seed):
    make_loss, reference = REFERENCES[name]
    rng = np.random.default_rng(seed)
    sets = label_sets(rng, n=12, classes=5)
    x = rng.normal(size=(12, 4)).astype("float32")
    value = float(make_loss()(sets, x))
    np.testing.assert_allclose(value, reference(sets, x), rtol=2e-5, atol=1e-6)


SUPPORTED = [
    keras_dml.ContrastiveLoss(),
    keras_dml.ContrastiveLoss(multi_label="jaccard", squared=True),
    keras_dml.MultiSimilarityLoss(),
    keras_dml.CircleLoss(),
    keras_dml.SupConLoss(),
    keras_dml.SupConLoss(multi_label="jaccard"),
    keras_dml.TripletLoss(),
    keras_dml.TripletLoss(negative_mining="hard", positive_mining="hard"),
    keras_dml.TripletLoss(negative_mining="all"),
    keras_dml.TripletSemiHardLoss(),
    keras_dml.TripletHardLoss(),
    keras_dml.DynamicSoftMarginLoss(momentum=1.0),
]


@pytest.mark.parametrize("loss", SUPPORTED, ids=lambda loss: f"{loss.name}_{loss.get_config()}")
def test_one_hot_labels_give_exactly_the_single_label_loss_and_gradient(loss):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 16)
    x = rng.normal(size=(16, 6)).astype("float32")
    one_hot = np.eye(4, dtype="int32")[labels]
    value, grad = loss_gradient(lambda v: loss(labels, v), x)
    value_mh, grad_mh = loss_gradient(lambda v: loss(one_hot, v), x)
    assert float(value) == float(value_mh)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(grad_mh))


@pytest.mark.parametrize(
    "loss",
    [keras_dml.NTXentLoss(), keras_dml.NPairsLoss(), keras_dml.LiftedStructLoss(),
     keras_dml.QuadrupletLoss()],
    ids=lambda loss: loss.name,
)
def test_losses_without_multi_label_support_say_so(loss):
    sets = label_sets(np.random.default_rng(0), n=8)
    x = np.random.default_rng(1).normal(size=(8, 4)).astype("float32")
    with pytest.raises(ValueError, match="multi-hot"):
        loss(sets, x)


def test_bad_multi_label_option_and_row_mismatch():
    with pytest.raises(ValueError, match="multi_label"):
        keras_dml.ContrastiveLoss(multi_label="all")
    with pytest.raises(ValueError, match="multi_label"):
        keras_dml.SupConLoss(multi_label=None)
    with pytest.raises(ValueError, match="label rows"):
        keras_dml.ContrastiveLoss()(np.eye(3, dtype="int32"), np.zeros((4, 2), "float32"))


def test_config_round_trip_keeps_multi_label():
    loss = keras_dml.ContrastiveLoss(multi_label="jaccard")
    clone = keras_dml.ContrastiveLoss.from_config(loss.get_config())
    assert clone.multi_label == "jaccard"


def test_fit_with_multi_hot_labels():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8)).astype("float32")
    y = label_sets(rng, n=32, classes=5, empty_row=False)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    model.compile(optimizer="adam", loss=keras_dml.SupConLoss(multi_label="jaccard"))
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


# -- retrieval metrics -------------------------------------------------------------------


def ref_retrieval(x, sets, refs=None, ref_sets=None, ks=(1, 2, 4)):
    leave_one_out = refs is None
    if leave_one_out:
        refs, ref_sets = x, sets
    d = 1.0 - (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (
        refs / np.linalg.norm(refs, axis=1, keepdims=True)).T
    rows = []
    for i in range(len(x)):
        order = [j for j in np.argsort(d[i], kind="stable") if not (leave_one_out and j == i)]
        rel = [shares(sets[i], ref_sets[j]) for j in order]
        r = sum(rel)
        if r == 0:
            continue
        row = {"precision_at_1": float(rel[0])}
        for k in ks:
            row[f"recall_at_{k}"] = float(any(rel[:k]))
        row["r_precision"] = sum(rel[:r]) / r
        hits, ap = 0, 0.0
        for rank in range(r):
            if rel[rank]:
                hits += 1
                ap += hits / (rank + 1)
        row["map_at_r"] = ap / r
        rows.append(row)
    return {key: np.mean([row[key] for row in rows]) for key in rows[0]}


def test_retrieval_metrics_multi_label_match_loops():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5)).astype("float32")
    sets = label_sets(rng, n=40, classes=6)
    got = retrieval_metrics(x, sets, k=(1, 2, 4), nmi=True, batch_size=7)
    expected = ref_retrieval(x, sets)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-12, err_msg=key)
    assert np.isnan(got["nmi"])
    refs = rng.normal(size=(25, 5)).astype("float32")
    ref_sets = label_sets(rng, n=25, classes=6)
    got = retrieval_metrics(x, sets, refs, ref_sets, k=(1, 2, 4), nmi=False)
    for key, value in ref_retrieval(x, sets, refs, ref_sets).items():
        np.testing.assert_allclose(got[key], value, rtol=1e-12, err_msg=key)


def test_retrieval_metrics_one_hot_equal_single_label():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 4)).astype("float32")
    labels = rng.integers(0, 5, 60)
    single = retrieval_metrics(x, labels, nmi=False)
    multi = retrieval_metrics(x, np.eye(5, dtype="int32")[labels], nmi=False)
    assert single == multi
    # More than 64 classes: several packed words per row.
    wide = np.zeros((60, 130), "int32")
    wide[np.arange(60), labels * 25] = 1
    assert retrieval_metrics(x, wide, nmi=False) == single


def test_retrieval_metrics_multi_label_errors():
    x = np.zeros((4, 2), "float32") + np.arange(4)[:, None]
    with pytest.raises(ValueError, match="both"):
        retrieval_metrics(x, np.eye(4, dtype="int32"), x, np.arange(4))
    with pytest.raises(ValueError, match="classes"):
        retrieval_metrics(x, np.eye(4, dtype="int32"), x, np.eye(4, 3, dtype="int32"))
    with pytest.raises(ValueError, match="label rows"):
        retrieval_metrics(x, np.eye(3, dtype="int32"))


def readme_block(heading: str) -> str:
    """The first ```python block after `heading` in README.md."""
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    text = open(path, encoding="utf-8").read()
    start = text.index("```python\n", text.index(heading)) + len("```python\n")
    return text[start : text.index("```", start)]


@pytest.mark.parametrize("heading", ["## Cross-batch memory (XBM)", "## Multi-label batches"])
def test_readme_examples_run(heading, tmp_path, capsys):
    code = readme_block(heading).replace("/tmp/", str(tmp_path) + "/")
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    if "XBM" in heading:
        assert out.strip() == "192"
        assert (tmp_path / "xbm_model.keras").exists()
    else:
        assert out.startswith("MAP@R ")


@pytest.mark.parametrize("seed", [0, 1])
def test_dynamic_soft_margin_on_label_sets_matches_the_loop_reference(seed):
    """Triplets (a, p, n): p shares a label with a, n none; then PML's histogram and CDF."""
    from test_dynamic_soft_margin import ref_step, unit_rows

    rng = np.random.default_rng(seed)
    sets = label_sets(rng, n=10)
    x = rng.normal(size=(10, 5))
    u = unit_rows(x)
    diffs = [
        np.linalg.norm(u[a] - u[p]) - np.linalg.norm(u[a] - u[n])
        for a in range(10) for p in range(10) for n in range(10)
        if p != a and shares(sets[a], sets[p]) and not shares(sets[a], sets[n])
    ]
    assert diffs
    want, want_histogram = ref_step([0.0] * 10, diffs)
    loss = keras_dml.DynamicSoftMarginLoss()
    got = float(loss(sets, x.astype("float64")))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(loss.histogram.value), want_histogram, atol=1e-7)
