"""Miners against NumPy loops and against pytorch-metric-learning 2.9: the same mined sets.

Masks are converted to sets of index tuples: (a, p) and (a, n) pairs for a
pair miner, (a, p, n) triplets for a triplet miner. Embeddings are float64
so that no threshold comparison flips between the two libraries.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from keras_dml import miners
from keras_dml.losses.base import References

torch = pytest.importorskip("torch")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")


def batch(seed=0, n=12, dim=4, classes=3, scale=1.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n).astype("int32")
    return labels, (scale * rng.normal(size=(n, dim))).astype("float64")


def pml_distance(name):
    if name == "euclidean":
        return pml_distances.LpDistance(normalize_embeddings=False)
    if name == "cosine":
        return pml_distances.CosineSimilarity()
    if name == "dot":
        return pml_distances.DotProductSimilarity(normalize_embeddings=False)
    raise ValueError(name)


def np_matrix(x, name):
    """Loops: the measure as PML computes it (a similarity for cosine and dot)."""
    n = len(x)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if name == "euclidean":
                out[i, j] = math.sqrt(sum((x[i] - x[j]) ** 2))
            elif name == "cosine":
                out[i, j] = float(x[i] @ x[j]) / (np.linalg.norm(x[i]) * np.linalg.norm(x[j]))
            else:
                out[i, j] = float(x[i] @ x[j])
    return out


def pairs_of(mask):
    return {tuple(int(v) for v in idx) for idx in np.argwhere(np.asarray(mask))}


def our_pairs(mined):
    positive, negative = mined.pairs()
    return pairs_of(positive), pairs_of(negative)


def our_triplets(mined):
    return pairs_of(mined.triplet_mask())


def pml_mine(miner, labels, x):
    out = miner(torch.tensor(x), torch.tensor(labels.astype("int64")))
    out = [o.numpy() for o in out]
    if len(out) == 3:
        return set(zip(*[o.tolist() for o in out], strict=True))
    return (
        set(zip(out[0].tolist(), out[1].tolist(), strict=True)),
        set(zip(out[2].tolist(), out[3].tolist(), strict=True)),
    )


def all_pairs(labels):
    n = len(labels)
    pos = {(i, j) for i in range(n) for j in range(n) if i != j and labels[i] == labels[j]}
    neg = {(i, j) for i in range(n) for j in range(n) if labels[i] != labels[j]}
    return pos, neg


SEEDS_AND_SHAPES = [(0, 12, 3, 1.0), (1, 16, 4, 0.5), (2, 9, 2, 2.0), (3, 8, 8, 1.0)]


# -- TripletMarginMiner ---------------------------------------------------------------


def ref_triplet_margin(labels, x, margin, kind, name):
    m = np_matrix(x, name)
    similarity = name != "euclidean"
    pos, neg = all_pairs(labels)
    out = set()
    for a, p in pos:
        for a2, n in neg:
            if a2 != a:
                continue
            value = m[a, p] - m[a, n] if similarity else m[a, n] - m[a, p]
            if kind == "easy":
                keep = value > margin
            else:
                keep = value <= margin
                if kind == "hard":
                    keep = keep and value <= 0
                elif kind == "semihard":
                    keep = keep and value > 0
            if keep:
                out.add((a, p, n))
    return out


@pytest.mark.parametrize("kind", ["all", "hard", "semihard", "easy"])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_triplet_margin_miner_matches_reference_and_pml(kind, distance):
    for seed, n, classes, scale in SEEDS_AND_SHAPES:
        labels, x = batch(seed, n, 4, classes, scale)
        margin = 0.3 if distance == "euclidean" else 0.1
        ours = our_triplets(miners.TripletMarginMiner(margin, kind, distance)(labels, x))
        assert ours == ref_triplet_margin(labels, x, margin, kind, distance)
        pml = pml_miners.TripletMarginMiner(
            margin=margin, type_of_triplets=kind, distance=pml_distance(distance)
        )
        assert ours == pml_mine(pml, labels, x)


# -- pair miners ----------------------------------------------------------------------


def ref_pair_margin(labels, x, pos_margin, neg_margin, name):
    m = np_matrix(x, name)
    sim = name != "euclidean"
    pos, neg = all_pairs(labels)
    keep_pos = {(a, p) for a, p in pos if (m[a, p] < pos_margin if sim else m[a, p] > pos_margin)}
    keep_neg = {(a, n) for a, n in neg if (m[a, n] > neg_margin if sim else m[a, n] < neg_margin)}
    return keep_pos, keep_neg


@pytest.mark.parametrize("distance", ["euclidean", "cosine", "dot"])
def test_pair_margin_miner_matches_reference_and_pml(distance):
    margins = {"euclidean": (1.0, 2.0), "cosine": (0.5, 0.0), "dot": (0.5, 0.0)}[distance]
    for seed, n, classes, scale in SEEDS_AND_SHAPES:
        labels, x = batch(seed, n, 4, classes, scale)
        ours = our_pairs(miners.PairMarginMiner(*margins, distance=distance)(labels, x))
        assert ours == ref_pair_margin(labels, x, *margins, distance)
        pml = pml_miners.PairMarginMiner(*margins, distance=pml_distance(distance))
        assert ours == pml_mine(pml, labels, x)


def ref_multi_similarity(labels, x, epsilon, name):
    m = np_matrix(x, name)
    s = m if name != "euclidean" else -m  # as a similarity
    pos, neg = all_pairs(labels)
    keep_pos, keep_neg = set(), set()
    for a in range(len(labels)):
        negatives = [s[a, n] for b, n in neg if b == a]
        positives = [s[a, p] for b, p in pos if b == a]
        for b, p in pos:
            if b == a and negatives and s[a, p] - epsilon < max(negatives):
                keep_pos.add((a, p))
        for b, n in neg:
            if b == a and positives and s[a, n] + epsilon > min(positives):
                keep_neg.add((a, n))
    return keep_pos, keep_neg


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("epsilon", [0.1, 0.5])
def test_multi_similarity_miner_matches_reference_and_pml(distance, epsilon):
    for seed, n, classes, scale in SEEDS_AND_SHAPES:
        labels, x = batch(seed, n, 4, classes, scale)
        ours = our_pairs(miners.MultiSimilarityMiner(epsilon, distance=distance)(labels, x))
        assert ours == ref_multi_similarity(labels, x, epsilon, distance)
        pml = pml_miners.MultiSimilarityMiner(epsilon, distance=pml_distance(distance))
        assert ours == pml_mine(pml, labels, x)


def ref_hdc(labels, x, fraction, name):
    m = np_matrix(x, name)
    d = m if name == "euclidean" else -m
    pos, neg = all_pairs(labels)
    pos, neg = sorted(pos, key=lambda t: -d[t]), sorted(neg, key=lambda t: d[t])
    return (
        set(pos[: math.ceil(fraction * len(pos))]),
        set(neg[: math.ceil(fraction * len(neg))]),
    )


def selected_values(pairs, matrix):
    return sorted(float(matrix[t]) for t in pairs)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("fraction", [0.3, 0.5, 1.0])
def test_hdc_miner_matches_reference_and_pml(distance, fraction):
    # Within a batch d(a, b) = d(b, a): at the cut the two libraries may keep a different
    # twin of a tied pair, so the batch compares the kept values; separate references
    # (no ties) compare the pairs themselves.
    for seed, n, classes, scale in SEEDS_AND_SHAPES:
        labels, x = batch(seed, n, 4, classes, scale)
        m = np_matrix(x, distance)
        ours = our_pairs(miners.HDCMiner(fraction, distance=distance)(labels, x))
        pml = pml_miners.HDCMiner(filter_percentage=fraction, distance=pml_distance(distance))
        for want in (ref_hdc(labels, x, fraction, distance), pml_mine(pml, labels, x)):
            for mine, other in zip(ours, want, strict=True):
                assert len(mine) == len(other)
                np.testing.assert_allclose(selected_values(mine, m), selected_values(other, m))
        ref_labels, refs = batch(seed + 100, n + 3, 4, classes, scale)
        ours = our_pairs(miners.HDCMiner(fraction, distance=distance)(
            labels, x, references=References(ref_labels, refs)))
        out = pml(torch.tensor(x), torch.tensor(labels.astype("int64")), torch.tensor(refs),
                  torch.tensor(ref_labels.astype("int64")))
        out = [o.tolist() for o in out]
        want = (set(zip(out[0], out[1], strict=True)), set(zip(out[2], out[3], strict=True)))
        assert ours == want


STRATEGIES = [
    ("hard", "hard", None, None),
    ("easy", "semihard", None, None),
    ("semihard", "hard", None, None),
    ("easy", "easy", None, None),
    ("hard", "semihard", None, None),
    ("all", "hard", None, None),
    ("easy", "all", None, None),
    ("all", "all", None, None),
    ("hard", "hard", (0.5, 2.5), (0.5, 3.0)),
]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: f"{s[0]}-{s[1]}-{s[2]}")
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_batch_easy_hard_miner_matches_pml(strategy, distance):
    pos_strategy, neg_strategy, pos_range, neg_range = strategy
    if distance == "cosine" and pos_range is not None:
        pos_range, neg_range = (0.0, 0.9), (-0.5, 0.5)
    for seed, n, classes, scale in SEEDS_AND_SHAPES:
        labels, x = batch(seed, n, 4, classes, scale)
        ours = miners.BatchEasyHardMiner(
            pos_strategy, neg_strategy, pos_range, neg_range, distance=distance
        )(labels, x)
        pml = pml_miners.BatchEasyHardMiner(
            pos_strategy=pos_strategy,
            neg_strategy=neg_strategy,
            allowed_pos_range=pos_range,
            allowed_neg_range=neg_range,
            distance=pml_distance(distance),
        )
        assert our_pairs(ours) == pml_mine(pml, labels, x)


def ref_batch_hard(labels, x):
    m = np_matrix(x, "euclidean")
    out = set()
    for a in range(len(labels)):
        pos = [p for p in range(len(labels)) if p != a and labels[p] == labels[a]]
        neg = [n for n in range(len(labels)) if labels[n] != labels[a]]
        if pos and neg:
            out.add((a, max(pos, key=lambda p: m[a, p]), min(neg, key=lambda n: m[a, n])))
    return out


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_batch_hard_miner_matches_reference_and_pml(distance):
    for seed, n, classes, scale in SEEDS_AND_SHAPES:
        labels, x = batch(seed, n, 4, classes, scale)
        ours = our_triplets(miners.BatchHardMiner(distance=distance)(labels, x))
        if distance == "euclidean":
            assert ours == ref_batch_hard(labels, x)
        pml = pml_miners.BatchHardMiner(distance=pml_distance(distance))
        assert ours == pml_mine(pml, labels, x)


def test_batch_easy_hard_rejects_what_pml_rejects():
    with pytest.raises(ValueError, match="semihard"):
        miners.BatchEasyHardMiner("semihard", "semihard")
    with pytest.raises(ValueError, match="all"):
        miners.BatchEasyHardMiner("all", "semihard")
    with pytest.raises(ValueError, match="pos_strategy"):
        miners.BatchEasyHardMiner("hardest", "hard")
    with pytest.raises(ValueError, match="allowed_pos_range"):
        miners.BatchEasyHardMiner("hard", "hard", allowed_pos_range=(2.0, 1.0))


# -- AngularMiner ---------------------------------------------------------------------


def ref_angular(labels, x, angle):
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    pos, neg = all_pairs(labels)
    out = set()
    for a, p in pos:
        for a2, n in neg:
            if a2 != a:
                continue
            center = (unit[a] + unit[p]) / 2
            ap = np.linalg.norm(unit[a] - unit[p])
            nc = np.linalg.norm(unit[n] - center)
            if math.atan(ap / (2 * nc)) > math.radians(angle):
                out.add((a, p, n))
    return out


@pytest.mark.parametrize("angle", [10, 20, 40])
def test_angular_miner_matches_reference_and_pml(angle):
    for seed, n, classes, scale in SEEDS_AND_SHAPES:
        labels, x = batch(seed, n, 4, classes, scale)
        ours = our_triplets(miners.AngularMiner(angle)(labels, x))
        assert ours == ref_angular(labels, x, angle)
        # PML computes the angle on the raw embeddings: the same on unit-norm ones.
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        assert ours == our_triplets(miners.AngularMiner(angle)(labels, unit))
        assert ours == pml_mine(pml_miners.AngularMiner(angle=angle), labels, unit)


# -- random miners: DistanceWeightedMiner, UniformHistogramMiner -------------------------


def ref_distance_weights(labels, x, cutoff=0.5, nonzero_loss_cutoff=1.4):
    """Loops: each anchor's probability of drawing each reference as its negative."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    n, dim = x.shape
    weights = np.zeros((n, n))
    for a in range(n):
        for j in range(n):
            d = max(np.linalg.norm(unit[a] - unit[j]), cutoff)
            if labels[j] == labels[a] or d >= nonzero_loss_cutoff or 1 - d * d / 4 <= 0:
                continue
            weights[a, j] = d ** (2 - dim) * (1 - d * d / 4) ** (-(dim - 3) / 2)
    totals = weights.sum(axis=1, keepdims=True)
    return np.divide(weights, totals, out=np.zeros_like(weights), where=totals > 0)


def test_distance_weighted_miner_draws_from_the_inverse_density():
    labels, x = batch(4, n=8, dim=3, classes=2)
    want = ref_distance_weights(labels, x)
    miner = miners.DistanceWeightedMiner(seed=3)
    counts = np.zeros((8, 8))
    for _ in range(200):
        triplets = np.asarray(miner(labels, x).triplets)
        pos, _ = all_pairs(labels)
        # Exactly one negative per (anchor, positive) of an anchor that has eligible negatives.
        for a, p in pos:
            assert triplets[a, p].sum() == (1 if want[a].sum() > 0 else 0)
        counts += triplets.sum(axis=1)
    has_positive = np.array([any(p != a and labels[p] == labels[a] for p in range(8))
                             for a in range(8)])
    assert has_positive.sum() >= 6
    freq = (counts / np.maximum(counts.sum(axis=1, keepdims=True), 1))[has_positive]
    want = want[has_positive]
    np.testing.assert_array_equal(freq > 0, want > 0.02)  # same support (no tiny weights here)
    np.testing.assert_allclose(freq, want, atol=0.06)


def test_distance_weighted_miner_support_matches_pml():
    labels, x = batch(5, n=8, dim=3, classes=2)
    pml = pml_miners.DistanceWeightedMiner()
    torch.manual_seed(0)
    pml_negatives, our_negatives = set(), set()
    miner = miners.DistanceWeightedMiner(seed=0)
    for _ in range(100):
        pml_negatives |= {(a, n) for a, _, n in pml_mine(pml, labels, x)}
        our_negatives |= {(a, n) for a, _, n in our_triplets(miner(labels, x))}
    assert our_negatives == pml_negatives


def test_distance_weighted_miner_seed_repeats_and_config():
    labels, x = batch(6)
    first = np.asarray(miners.DistanceWeightedMiner(seed=7)(labels, x).triplets)
    again = np.asarray(miners.DistanceWeightedMiner(seed=7)(labels, x).triplets)
    np.testing.assert_array_equal(first, again)
    config = miners.DistanceWeightedMiner(cutoff=0.3, seed=7).get_config()
    assert config == {"cutoff": 0.3, "nonzero_loss_cutoff": 1.4, "seed": 7}


def ref_histogram_bins(values, num_bins):
    low, high = values.min(), values.max()
    edges = np.linspace(low, high, num_bins + 1)
    return np.clip(np.searchsorted(edges, values, side="right") - 1, 0, num_bins - 1)


@pytest.mark.parametrize("per_bin", [1, 3])
def test_uniform_histogram_miner_takes_per_bin_pairs_of_each_bin(per_bin):
    labels, x = batch(7, n=16, classes=3)
    num_bins = 5
    m = np_matrix(x, "euclidean")
    miner = miners.UniformHistogramMiner(num_bins, per_bin, per_bin + 1, seed=0)
    mined = our_pairs(miner(labels, x))
    for kind, (chosen, candidates, cap) in enumerate(
        zip(mined, all_pairs(labels), (per_bin, per_bin + 1), strict=True)
    ):
        candidates = sorted(candidates)
        assert chosen <= set(candidates), kind
        values = np.array([m[t] for t in candidates])
        bins = ref_histogram_bins(values, num_bins)
        for b in range(num_bins):
            in_bin = {t for t, k in zip(candidates, bins, strict=True) if k == b}
            # Bin edges can differ by rounding: compare away from them.
            edge_free = {t for t in in_bin if not np.isclose(m[t], np.linspace(
                values.min(), values.max(), num_bins + 1)).any()}
            if edge_free == in_bin:
                assert len(chosen & in_bin) == min(cap, len(in_bin)), (kind, b)


def test_uniform_histogram_miner_pml_keeps_the_same_bins():
    # PML draws per bin with replacement: its distinct pairs per bin are at most ours.
    labels, x = batch(8, n=16, classes=3)
    ours = our_pairs(miners.UniformHistogramMiner(4, 2, 2, seed=1)(labels, x))
    torch.manual_seed(0)
    pml = pml_mine(pml_miners.UniformHistogramMiner(4, 2, 2), labels, x)
    for mine, theirs in zip(ours, pml, strict=True):
        assert len(theirs) <= len(mine)


# -- shared behaviour -----------------------------------------------------------------


ALL_MINERS = [
    miners.TripletMarginMiner(0.2, "semihard"),
    miners.BatchHardMiner(),
    miners.BatchEasyHardMiner("easy", "semihard", allowed_neg_range=(0.0, 5.0)),
    miners.MultiSimilarityMiner(0.2),
    miners.PairMarginMiner(0.1, 1.0, distance="cosine"),
    miners.HDCMiner(0.4),
    miners.AngularMiner(25),
    miners.DistanceWeightedMiner(seed=1),
    miners.UniformHistogramMiner(10, 2, 3, seed=2),
]
MINER_IDS = [type(m).__name__ for m in ALL_MINERS]


def test_every_miner_is_covered():
    bases = ("Miner", "DistanceMiner", "RandomMiner")
    public = {n for n in miners.__all__ if n.endswith("Miner") and n not in bases}
    assert public == set(MINER_IDS)


@pytest.mark.parametrize("miner", ALL_MINERS, ids=MINER_IDS)
def test_config_round_trip(miner):
    config = miner.get_config()
    clone = type(miner).from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(miner))
    assert type(restored) is type(miner) and restored.get_config() == config
    assert miners.get(keras.saving.serialize_keras_object(miner)).get_config() == config


@pytest.mark.parametrize("miner", ALL_MINERS, ids=MINER_IDS)
def test_masks_select_only_valid_pairs_and_static_shapes(miner):
    labels, x = batch(9, n=10)
    mined = miner(labels, x.astype("float32"))
    positive, negative = (np.asarray(m) for m in mined.pairs())
    assert positive.shape == negative.shape == (10, 10)
    assert np.asarray(mined.triplet_mask()).shape == (10, 10, 10)
    pos, neg = all_pairs(labels)
    assert pairs_of(positive) <= pos and pairs_of(negative) <= neg


@pytest.mark.parametrize("miner", ALL_MINERS, ids=MINER_IDS)
def test_bad_inputs_raise_and_no_positive_batch_mines_nothing(miner):
    labels, x = batch(10, n=6)
    with pytest.raises(ValueError, match="embeddings"):
        miner(labels, x[:, :, None])
    with pytest.raises(ValueError, match="labels"):
        miner(labels[:-1], x)
    with pytest.raises(ValueError, match="embeddings"):
        miner(labels[:0], x[:0])
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="embeddings"):
        miner(labels, bad)
    # Every label distinct: no positive pair, so no triplet.
    mined = miner(np.arange(6), x)
    assert not np.asarray(mined.triplet_mask()).any()
    assert not np.asarray(mined.pairs()[0]).any()


def test_references_other_than_the_batch():
    # Queries mine from a separate memory: no self-pairs are removed.
    labels, x = batch(11, n=6)
    ref_labels, refs = batch(12, n=10)
    references = References(ref_labels, refs)
    mined = miners.PairMarginMiner(0.0, 100.0)(labels, x, references=references)
    positive, negative = (np.asarray(m) for m in mined.pairs())
    same = labels[:, None] == ref_labels[None, :]
    np.testing.assert_array_equal(positive, same)
    np.testing.assert_array_equal(negative, ~same)
    pml = pml_miners.PairMarginMiner(0.0, 100.0, distance=pml_distance("euclidean"))
    out = pml(torch.tensor(x), torch.tensor(labels.astype("int64")), torch.tensor(refs),
              torch.tensor(ref_labels.astype("int64")))
    assert pairs_of(positive) == set(zip(out[0].tolist(), out[1].tolist(), strict=True))


def test_unknown_arguments_raise():
    with pytest.raises(ValueError, match="type_of_triplets"):
        miners.TripletMarginMiner(type_of_triplets="medium")
    with pytest.raises(ValueError, match="distance"):
        miners.PairMarginMiner(distance="manhattan")
    with pytest.raises(ValueError, match="filter_percentage"):
        miners.HDCMiner(0.0)
    with pytest.raises(ValueError, match="miner"):
        miners.get("batch-hard")
