"""Triplet losses against naive loop references (backend-agnostic)."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from conftest import loss_gradient, mixed_precision, ref_semi_hard_terms
from pml_parity import (
    assert_parity,
    import_pml,
    keras_value_and_grads,
    m_per_class_batch,
    pml_value_and_grads,
    requires_pml,
)

import keras_dml
from keras_dml.losses import triplet_hard_loss, triplet_loss, triplet_semihard_loss

# --------------------------------------------------------------------------- references


def ref_distance_matrix(x, metric):
    """Loops over pairs; float64."""
    x = np.asarray(x, np.float64)
    n = len(x)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            if metric in ("L2", "euclidean"):
                out[i, j] = math.sqrt(sum((x[i, k] - x[j, k]) ** 2 for k in range(x.shape[1])))
            elif metric in ("squared-L2", "squared_euclidean"):
                out[i, j] = sum((x[i, k] - x[j, k]) ** 2 for k in range(x.shape[1]))
            elif metric in ("angular", "cosine"):
                cos = x[i] @ x[j] / (np.linalg.norm(x[i]) * np.linalg.norm(x[j]))
                out[i, j] = max(1.0 - cos, 0.0)
            else:
                raise ValueError(metric)
    return out


def ref_tfa_semihard(labels, x, margin=1.0, metric="L2"):
    d = ref_distance_matrix(x, metric)
    labels = np.asarray(labels)
    same = labels[:, None] == labels[None, :]
    total, num_pos = ref_semi_hard_terms(d, ~same, same & ~np.eye(len(labels), dtype=bool),
                                         margin)
    return total / num_pos if num_pos else 0.0


def ref_tfa_hard(labels, x, margin=1.0, soft=False, metric="L2"):
    d = ref_distance_matrix(x, metric)
    n = len(labels)
    losses = []
    for a in range(n):
        pos = [d[a, k] for k in range(n) if k != a and labels[k] == labels[a]]
        neg = [d[a, k] for k in range(n) if labels[k] != labels[a]]
        hp = max(pos) if pos else min(d[a])
        hn = min(neg) if neg else max(d[a])
        losses.append(math.log1p(math.exp(hp - hn)) if soft else max(hp - hn + margin, 0.0))
    return sum(losses) / n


def ref_triplet(labels, x, margin, neg_mining, pos_mining, soft, metric):
    d = ref_distance_matrix(x, metric)
    n = len(labels)

    def term(dap, dan):
        return math.log1p(math.exp(dap - dan)) if soft else max(dap - dan + margin, 0.0)

    values = []
    for a in range(n):
        pos = [k for k in range(n) if k != a and labels[k] == labels[a]]
        neg = [k for k in range(n) if labels[k] != labels[a]]
        if not pos or not neg:
            continue
        if pos_mining == "hard":
            pos = [max(pos, key=lambda k: d[a, k])]
        elif pos_mining == "easy":
            pos = [min(pos, key=lambda k: d[a, k])]
        for p in pos:
            negd = [d[a, k] for k in neg]
            if neg_mining == "all":
                for v in negd:
                    values.append(term(d[a, p], v))
                continue
            if neg_mining == "hard":
                v = min(negd)
            elif neg_mining == "easy":
                v = max(negd)
            else:
                farther = [w for w in negd if w > d[a, p]]
                v = min(farther) if farther else max(negd)
            values.append(term(d[a, p], v))
    if neg_mining == "all" and not soft:
        values = [v for v in values if v > 0]
    return sum(values) / len(values) if values else 0.0


def batch(rng, n=12, dim=6, classes=3, normalize=False):
    labels = rng.integers(0, classes, size=n)
    x = rng.normal(size=(n, dim)).astype("float32")
    if normalize:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return labels, x


# --------------------------------------------------------------------------- tfa semantics


@pytest.mark.parametrize("metric", ["L2", "squared-L2", "angular"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_semihard_matches_tfa_semantics(metric, seed):
    rng = np.random.default_rng(seed)
    labels, x = batch(rng, n=16, classes=4)
    for margin in (1.0, 0.3):
        got = float(triplet_semihard_loss(labels, x, margin=margin, distance_metric=metric))
        want = ref_tfa_semihard(labels, x, margin, metric)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["L2", "squared-L2"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_semihard_with_many_tied_distances_matches_tfa_semantics(metric, seed):
    """Integer-grid embeddings and duplicates: d(a, n) == d(a, p) happens often.

    The closest negative *strictly* farther than the positive must be chosen.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=14)
    x = rng.integers(-1, 2, size=(14, 3)).astype("float32")
    x[5] = x[4]  # exact duplicates, possibly of different classes
    for margin in (1.0, 0.5):
        got = float(triplet_semihard_loss(labels, x, margin=margin, distance_metric=metric))
        want = ref_tfa_semihard(labels, x, margin, metric)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["L2", "squared-L2", "angular"])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_hard_matches_tfa_semantics(metric, soft, seed):
    rng = np.random.default_rng(seed)
    labels, x = batch(rng, n=14, classes=5)
    got = float(triplet_hard_loss(labels, x, margin=0.7, soft=soft, distance_metric=metric))
    want = ref_tfa_hard(labels, x, 0.7, soft, metric)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_tfa_quirks_for_lonely_anchors():
    # Class 2 has one sample: addons counts it with d(a, p*) = 0 in the hard loss.
    labels = np.array([0, 0, 1, 1, 2])
    x = np.random.default_rng(3).normal(size=(5, 3)).astype("float32")
    got = float(keras_dml.TripletHardLoss(margin=0.5)(labels, x))
    np.testing.assert_allclose(got, ref_tfa_hard(labels, x, 0.5), rtol=1e-5)
    # One class only: no negatives anywhere.
    same = np.zeros(5, "int32")
    np.testing.assert_allclose(
        float(keras_dml.TripletSemiHardLoss()(same, x)), ref_tfa_semihard(same, x), rtol=1e-5
    )
    np.testing.assert_allclose(
        float(keras_dml.TripletHardLoss()(same, x)), ref_tfa_hard(same, x), rtol=1e-5
    )


# --------------------------------------------------------------------------- general loss


@pytest.mark.parametrize("neg_mining", ["semi-hard", "hard", "easy", "all"])
@pytest.mark.parametrize("pos_mining", ["all", "hard", "easy"])
@pytest.mark.parametrize("soft", [False, True])
def test_triplet_loss_matches_reference(neg_mining, pos_mining, soft):
    rng = np.random.default_rng(7)
    for metric in ("euclidean", "cosine"):
        labels, x = batch(rng, n=12, classes=3)
        got = float(
            triplet_loss(
                labels,
                x,
                margin=0.5,
                negative_mining=neg_mining,
                positive_mining=pos_mining,
                soft_margin=soft,
                distance=metric,
            )
        )
        want = ref_triplet(labels, x, 0.5, neg_mining, pos_mining, soft, metric)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_semi_hard_triplet_loss_equals_tfa_loss_with_same_settings():
    rng = np.random.default_rng(11)
    labels, x = batch(rng, n=20, classes=4)
    general = keras_dml.TripletLoss(margin=1.0, distance="euclidean")(labels, x)
    tfa_like = keras_dml.TripletSemiHardLoss(margin=1.0)(labels, x)
    np.testing.assert_allclose(float(general), float(tfa_like), rtol=1e-6)


# --------------------------------------------------------------------------- gradients


def numeric_gradient(f, x, eps=1e-4):
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += eps
        down[idx] -= eps
        grad[idx] = (f(up) - f(down)) / (2 * eps)
    return grad


@pytest.mark.parametrize(
    "fn, ref",
    [
        (
            lambda labels, v: triplet_semihard_loss(labels, v, margin=1.0),
            lambda labels, x: ref_tfa_semihard(labels, x, 1.0),
        ),
        (
            lambda labels, v: triplet_hard_loss(labels, v, margin=1.0),
            lambda labels, x: ref_tfa_hard(labels, x, 1.0),
        ),
        (
            lambda labels, v: triplet_loss(labels, v, margin=0.5, negative_mining="all"),
            lambda labels, x: ref_triplet(labels, x, 0.5, "all", "all", False, "euclidean"),
        ),
        (
            lambda labels, v: triplet_loss(labels, v, negative_mining="all", soft_margin=True),
            lambda labels, x: ref_triplet(labels, x, 0.2, "all", "all", True, "euclidean"),
        ),
    ],
)
def test_gradients_match_finite_differences(fn, ref):
    rng = np.random.default_rng(5)
    labels, x = batch(rng, n=8, dim=3, classes=3)
    x = x.astype("float32")
    _, grad = loss_gradient(lambda v: fn(labels, v), x)
    want = numeric_gradient(lambda z: ref(labels, z), x)
    np.testing.assert_allclose(grad, want, atol=2e-3, rtol=1e-2)


# --------------------------------------------------------------------------- degenerate input

ALL_TRIPLET_LOSSES = [
    keras_dml.TripletLoss(),
    keras_dml.TripletLoss(negative_mining="all"),
    keras_dml.TripletLoss(negative_mining="all", soft_margin=True),
    keras_dml.TripletLoss(negative_mining="hard", positive_mining="hard", distance="cosine"),
    keras_dml.TripletSemiHardLoss(),
    keras_dml.TripletHardLoss(soft=True),
]


@pytest.mark.parametrize("loss", ALL_TRIPLET_LOSSES, ids=lambda loss: repr(loss.get_config()))
@pytest.mark.parametrize(
    "labels, x",
    [
        (np.array([0, 1, 2, 3]), np.eye(4, 3, dtype="float32")),  # no positive pair
        (np.zeros(4, "int32"), np.eye(4, 3, dtype="float32")),  # one class
        (np.array([1]), np.ones((1, 3), "float32")),  # B = 1
        (np.array([0, 0, 1, 1]), np.ones((4, 3), "float32")),  # all distances zero
    ],
    ids=["no-positive", "one-class", "single", "duplicates"],
)
def test_degenerate_batches_are_finite(loss, labels, x):
    value, grad = loss_gradient(lambda v: loss(labels, v), x)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad))


def test_no_positive_pair_gives_zero():
    labels = np.array([0, 1, 2, 3])
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    assert float(keras_dml.TripletSemiHardLoss()(labels, x)) == 0.0
    assert float(keras_dml.TripletLoss(negative_mining="all")(labels, x)) == 0.0


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_half_precision_inputs(policy):
    rng = np.random.default_rng(1)
    labels, x = batch(rng, n=10, classes=3)
    with mixed_precision(policy):
        half = keras.ops.cast(x, policy.split("_")[1])
        for loss in ALL_TRIPLET_LOSSES:
            value = float(loss(labels, half))
            assert np.isfinite(value)
            assert abs(value - float(loss(labels, x))) < 0.05 * max(1.0, abs(value))


# --------------------------------------------------------------------------- argument checks


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="negative_mining"):
        keras_dml.TripletLoss(negative_mining="hardest")
    with pytest.raises(ValueError, match="positive_mining"):
        keras_dml.TripletLoss(positive_mining="semi-hard")
    with pytest.raises(ValueError, match="distance"):
        keras_dml.TripletLoss(distance="manhattan")
    with pytest.raises(ValueError, match="distance_metric"):
        keras_dml.TripletSemiHardLoss(distance_metric="cosine")


# --------------------------------------------------------------------------- real addons numbers

GOLDEN = np.load(__import__("pathlib").Path(__file__).parent / "data" / "tfa_triplet_golden.npz")
GOLDEN_CASES = sorted({k.split("_")[0] for k in GOLDEN.files})


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_same_values_and_gradients_as_tensorflow_addons(case):
    """Values and gradients recorded from tensorflow-addons 0.23 (tests/data/make_tfa_golden.py)."""
    labels, x = GOLDEN[f"{case}_labels"], GOLDEN[f"{case}_x"]
    metric, margin = GOLDEN[f"{case}_meta"]
    margin = float(margin)
    losses = [
        keras_dml.TripletSemiHardLoss(margin=margin, distance_metric=str(metric)),
        keras_dml.TripletHardLoss(margin=margin, distance_metric=str(metric)),
        keras_dml.TripletHardLoss(soft=True, distance_metric=str(metric)),
    ]
    for loss, want_value, want_grad in zip(
        losses, GOLDEN[f"{case}_values"], GOLDEN[f"{case}_grads"], strict=True
    ):
        value, grad = loss_gradient(lambda v, loss=loss: loss(labels, v), x)
        np.testing.assert_allclose(value, want_value, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------ pytorch-metric-learning parity (TF only)


def _pml_euclidean(distances):
    """PML's L2 distance on the raw embeddings (its default normalises them first)."""
    return distances.LpDistance(normalize_embeddings=False)


@requires_pml
@pytest.mark.parametrize("margin", [0.2, 1.0])
def test_batch_all_matches_pytorch_metric_learning(margin):
    # TripletLoss(negative_mining="all") is PML's TripletMarginLoss without a miner (every
    # triplet) with its default AvgNonZeroReducer: the mean over triplets with a non-zero hinge.
    torch, pml = import_pml()
    from pytorch_metric_learning import distances, losses

    labels, x = m_per_class_batch(0)
    theirs = losses.TripletMarginLoss(margin=margin, distance=_pml_euclidean(distances))
    ours = keras_dml.TripletLoss(margin=margin, negative_mining="all", dtype="float64")
    want = pml_value_and_grads(lambda v: theirs(v, torch.tensor(labels)), x)
    assert_parity(keras_value_and_grads(lambda v: ours(labels, v), x), want)


@requires_pml
def test_batch_all_differs_from_pytorch_metric_learning_mean_reducer_by_nonzero_fraction():
    # With PML's MeanReducer the mean runs over *all* triplets, zeros included: PML's value is
    # ours times (non-zero triplets / all triplets). keras-dml has only the non-zero average.
    torch, pml = import_pml()
    from pytorch_metric_learning import distances, losses, reducers

    labels, x = m_per_class_batch(1)
    margin = 1.0
    theirs = losses.TripletMarginLoss(margin=margin, distance=_pml_euclidean(distances),
                                      reducer=reducers.MeanReducer())
    want = theirs(torch.tensor(x), torch.tensor(labels)).item()
    d = ref_distance_matrix(x, "L2")
    terms = [d[a, p] - d[a, n] + margin for a in range(len(labels)) for p in range(len(labels))
             for n in range(len(labels))
             if p != a and labels[p] == labels[a] and labels[n] != labels[a]]
    nonzero_fraction = np.mean(np.asarray(terms) > 0)
    assert 0 < nonzero_fraction < 1
    ours = float(keras_dml.TripletLoss(margin=margin, negative_mining="all",
                                       dtype="float64")(labels, x))
    np.testing.assert_allclose(ours * nonzero_fraction, want, rtol=1e-5)
    assert ours > want


@requires_pml
def test_soft_margin_batch_all_matches_pytorch_metric_learning_smooth_loss():
    # PML's smooth_loss is softplus(d_ap - d_an + margin); keras-dml's soft margin has no
    # margin, so PML runs with margin=0. Softplus is never 0: every triplet counts in both.
    torch, pml = import_pml()
    from pytorch_metric_learning import distances, losses

    labels, x = m_per_class_batch(2)
    theirs = losses.TripletMarginLoss(margin=0.0, smooth_loss=True,
                                      distance=_pml_euclidean(distances))
    ours = keras_dml.TripletLoss(negative_mining="all", soft_margin=True, dtype="float64")
    want = pml_value_and_grads(lambda v: theirs(v, torch.tensor(labels)), x)
    assert_parity(keras_value_and_grads(lambda v: ours(labels, v), x), want)


@requires_pml
@pytest.mark.parametrize("margin", [0.2, 1.0])
def test_batch_hard_matches_pytorch_metric_learning(margin):
    # PML's BatchHardMiner (hardest positive and negative per anchor) + TripletMarginLoss.
    # PML averages over the anchors with a non-zero hinge (AvgNonZeroReducer); keras-dml's
    # TripletHardLoss and TripletLoss("hard", "hard") over every anchor (tfa's convention):
    # they match PML with MeanReducer, and PML's default is ours * anchors / non-zero anchors.
    torch, pml = import_pml()
    from pytorch_metric_learning import distances, losses, miners, reducers

    labels, x = m_per_class_batch(3)
    y = torch.tensor(labels)
    miner = miners.BatchHardMiner(distance=_pml_euclidean(distances))

    def theirs(reducer):
        loss = losses.TripletMarginLoss(margin=margin, distance=_pml_euclidean(distances),
                                        reducer=reducer)
        return lambda v: loss(v, y, miner(v, y))

    want = pml_value_and_grads(theirs(reducers.MeanReducer()), x)
    general = keras_dml.TripletLoss(margin=margin, negative_mining="hard",
                                    positive_mining="hard", dtype="float64")
    tfa_style = keras_dml.TripletHardLoss(margin=margin, dtype="float64")
    for ours in (general, tfa_style):
        assert_parity(keras_value_and_grads(lambda v, ours=ours: ours(labels, v), x), want)

    d = ref_distance_matrix(x, "L2")
    same = labels[:, None] == labels[None, :]
    hinge = np.maximum(np.where(same, d, -np.inf).max(1) - np.where(same, np.inf, d).min(1)
                       + margin, 0)
    default = theirs(None)(torch.tensor(x)).item()
    np.testing.assert_allclose(default, want[0] * hinge.size / np.count_nonzero(hinge),
                               rtol=1e-5)


def ref_all_semi_hard(labels, d, margin):
    """PML's semi-hard triplets: every (a, p, n) with d_ap < d_an < d_ap + margin; their mean."""
    terms = [d[a, p] - d[a, n] + margin for a in range(len(labels)) for p in range(len(labels))
             for n in range(len(labels))
             if p != a and labels[p] == labels[a] and labels[n] != labels[a]
             and d[a, p] < d[a, n] < d[a, p] + margin]
    return float(np.mean(terms))


@requires_pml
def test_semi_hard_differs_from_pytorch_metric_learning_on_purpose():
    # keras-dml's semi-hard (FaceNet / tensorflow-addons) takes ONE negative per (anchor,
    # positive): the closest one farther than the positive, else the farthest negative, and
    # averages over all positive pairs. PML's TripletMarginMiner("semihard") keeps EVERY
    # negative with d_ap < d_an < d_ap + margin and TripletMarginLoss averages over them
    # (pairs without such a negative drop out). Both are checked against their own reference;
    # they are different numbers.
    torch, pml = import_pml()
    from pytorch_metric_learning import distances, losses, miners

    labels, x = m_per_class_batch(4)
    margin = 1.0
    miner = miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard",
                                      distance=_pml_euclidean(distances))
    loss = losses.TripletMarginLoss(margin=margin, distance=_pml_euclidean(distances))
    y, v = torch.tensor(labels), torch.tensor(x)
    theirs = loss(v, y, miner(v, y)).item()
    d = ref_distance_matrix(x, "L2")
    np.testing.assert_allclose(theirs, ref_all_semi_hard(labels, d, margin), rtol=1e-5)
    ours = float(keras_dml.TripletLoss(margin=margin, dtype="float64")(labels, x))
    np.testing.assert_allclose(
        ours, ref_triplet(labels, x, margin, "semi-hard", "all", False, "L2"), rtol=1e-5)
    assert abs(ours - theirs) > 1e-3
