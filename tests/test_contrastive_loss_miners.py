"""`miner=` and `reducer=` on `SupConLoss` and `NTXentLoss`, against PML 2.9.

PML's `SupConLoss` with `indices_tuple` is matrix-based: each anchor's
softmax runs over its mined positives and negatives, its loss is the mean
log-probability of its mined positives, and the default reducer is
`AvgNonZeroReducer` (keras-dml's default, the mean over anchors with a mined
positive, differs only for an anchor whose softmax holds its one positive
alone, loss 0: `test_supcon_default_reduction_counts_zero_loss_anchors`).
A mask counts a pair once however often a triplet miner repeats it, so a
triplet miner's tuple goes to PML as it is.

PML's `NTXentLoss` is pair-based: each mined positive pair `(a, p)` is
scored against the mined negatives `(a, n)` of its anchor. The keras-dml
`NTXentLoss` mines the stacked `2N` rows `concat([view_1, view_2])` with the
instance ids as labels, so PML gets the same rows and the labels
`[0..N-1, 0..N-1]`. keras-dml counts each mined pair once; PML repeats a
triplet miner's pairs once per triplet (both in the mean and among the
negatives of the softmax), so the triplet-miner case compares with PML fed
the de-duplicated pairs and `test_pml_ntxent_repeats_a_triplet_miners_pairs`
shows the difference.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import loss_gradient
from keras import ops
from pml_parity import requires_pml
from test_catalogue_loss_miners import batch as supcon_batch
from test_catalogue_loss_miners import theirs
from test_loss_miners import euclid, ours, pml_losses, pml_miners, pml_reducers

import keras_dml
from keras_dml import miners, reducers
from keras_dml.losses.base import References
from keras_dml.losses.ntxent import _nt_xent_from_stacked_views
from keras_dml.losses.supcon import supcon_loss

pytestmark = requires_pml

PAIR_MINERS = {
    "MultiSimilarityMiner": (lambda: miners.MultiSimilarityMiner(0.1),
                             lambda: pml_miners.MultiSimilarityMiner(0.1)),
    "PairMarginMiner": (lambda: miners.PairMarginMiner(0.9, 1.1),
                        lambda: pml_miners.PairMarginMiner(0.9, 1.1, distance=euclid())),
}
TRIPLET_MINER = (lambda: miners.TripletMarginMiner(0.3, "all"),
                 lambda: pml_miners.TripletMarginMiner(0.3, "all", distance=euclid()))
MINERS = {**PAIR_MINERS, "TripletMarginMiner": TRIPLET_MINER}


def views_batch(seed, n=6, dim=5, noise=0.6):
    """Two noisy views of `n` unit vectors, stacked, and their instance ids."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, dim))
    x = np.concatenate([base + noise * rng.normal(size=base.shape),
                        base + noise * rng.normal(size=base.shape)])
    ids = np.tile(np.arange(n), 2).astype("int32")
    return ids, x / np.linalg.norm(x, axis=1, keepdims=True)


def check(our_loss, pml_loss, pml_miner, make_batch, dedupe=False, seeds=range(4)):
    nonzero = 0
    for seed in seeds:
        labels, x = make_batch(seed)
        value, grad = ours(our_loss, labels, x)
        want, want_grad = theirs(pml_loss, pml_miner(), labels, x, dedupe)
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-9, err_msg=f"seed {seed}")
        np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-9, err_msg=f"seed {seed}")
        nonzero += value != 0
    assert nonzero >= 3  # the cases test something


@pytest.mark.parametrize("miner", list(MINERS))
def test_supcon_with_a_miner_matches_pml(miner):
    ours_miner, pml_miner = MINERS[miner]
    # PML's SupConLoss has no base temperature and reduces with AvgNonZeroReducer.
    loss = keras_dml.SupConLoss(temperature=0.1, base_temperature=0.1, miner=ours_miner(),
                                reducer=reducers.AvgNonZeroReducer())
    check(loss, pml_losses.SupConLoss(temperature=0.1), pml_miner, supcon_batch)


def test_supcon_with_a_miner_and_a_threshold_reducer_matches_pml():
    ours_miner, pml_miner = PAIR_MINERS["MultiSimilarityMiner"]
    loss = keras_dml.SupConLoss(temperature=0.1, base_temperature=0.1, miner=ours_miner(),
                                reducer=reducers.ThresholdReducer(low=1.0))
    pml_loss = pml_losses.SupConLoss(temperature=0.1, reducer=pml_reducers.ThresholdReducer(1.0))
    check(loss, pml_loss, pml_miner, supcon_batch)


def test_supcon_default_reduction_counts_zero_loss_anchors():
    # An anchor whose mined pairs are one positive and no negative has loss 0: PML's
    # AvgNonZeroReducer leaves it out, keras-dml's default mean over anchors with a
    # positive counts it.
    labels = np.array([0, 0, 1, 1, 1], "int32")
    x = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]])
    # PairMarginMiner(0.1, 0.5) on these unit vectors mines positives farther than 0.1 and
    # negatives closer than 0.5: anchor 0 gets the positive 1 and no negative.
    ours_miner = miners.PairMarginMiner(0.1, 0.5)
    pml_miner = pml_miners.PairMarginMiner(0.1, 0.5, distance=euclid())
    mean_value, _ = ours(keras_dml.SupConLoss(0.1, 0.1, miner=ours_miner), labels, x)
    nonzero_value, _ = ours(keras_dml.SupConLoss(0.1, 0.1, miner=ours_miner,
                                                 reducer=reducers.AvgNonZeroReducer()), labels, x)
    want, _ = theirs(pml_losses.SupConLoss(temperature=0.1), pml_miner, labels, x)
    np.testing.assert_allclose(nonzero_value, want, rtol=1e-5)
    # Every anchor has a mined positive; the zero-loss ones are those with one and no negative.
    pos, neg = (np.asarray(m) for m in ours_miner(labels, x.astype("float32")).pairs())
    has_positive = pos.any(axis=1)
    zero_anchors = has_positive & (pos.sum(axis=1) == 1) & ~neg.any(axis=1)
    assert zero_anchors.any() and has_positive.sum() > zero_anchors.sum()
    np.testing.assert_allclose(
        mean_value, want * (has_positive.sum() - zero_anchors.sum()) / has_positive.sum(),
        rtol=1e-5)


@pytest.mark.parametrize("miner", list(PAIR_MINERS))
def test_ntxent_with_a_pair_miner_matches_pml(miner):
    ours_miner, pml_miner = PAIR_MINERS[miner]
    loss = keras_dml.NTXentLoss(temperature=0.2, miner=ours_miner())
    check(loss, pml_losses.NTXentLoss(temperature=0.2), pml_miner, views_batch)


def test_ntxent_with_a_triplet_miner_matches_pml_fed_each_pair_once():
    loss = keras_dml.NTXentLoss(temperature=0.2, miner=TRIPLET_MINER[0]())
    check(loss, pml_losses.NTXentLoss(temperature=0.2), TRIPLET_MINER[1], views_batch,
          dedupe=True)


def test_ntxent_with_a_reducer_matches_pml():
    ours_miner, pml_miner = PAIR_MINERS["PairMarginMiner"]
    loss = keras_dml.NTXentLoss(temperature=0.2, miner=ours_miner(),
                                reducer=reducers.ThresholdReducer(low=1.0))
    pml_loss = pml_losses.NTXentLoss(temperature=0.2,
                                     reducer=pml_reducers.ThresholdReducer(1.0))
    check(loss, pml_loss, pml_miner, views_batch)


def test_pml_ntxent_repeats_a_triplet_miners_pairs():
    ids, x = views_batch(0)
    loss = pml_losses.NTXentLoss(temperature=0.2)
    raw, _ = theirs(loss, TRIPLET_MINER[1](), ids, x)
    once, _ = theirs(loss, TRIPLET_MINER[1](), ids, x, dedupe=True)
    assert not np.isclose(raw, once, rtol=1e-3)
    value, _ = ours(keras_dml.NTXentLoss(temperature=0.2, miner=TRIPLET_MINER[0]()), ids, x)
    np.testing.assert_allclose(value, once, rtol=1e-5)


@pytest.mark.parametrize("name", ["SupCon", "NTXent"])
def test_miner_and_reducer_round_trip_and_bad_options_raise(name):
    factory = {"SupCon": keras_dml.SupConLoss, "NTXent": keras_dml.NTXentLoss}[name]
    loss = factory(miner=miners.MultiSimilarityMiner(0.1), reducer=reducers.AvgNonZeroReducer())
    clone = type(loss).from_config(loss.get_config())
    assert clone.get_config() == loss.get_config()
    assert isinstance(clone.miner, miners.MultiSimilarityMiner)
    assert isinstance(clone.reducer, reducers.AvgNonZeroReducer)
    labels, x = views_batch(1)
    np.testing.assert_allclose(float(clone(labels, x)), float(loss(labels, x)), rtol=1e-6)
    with pytest.raises(ValueError, match="`miner` must be a keras_dml.miners.Miner"):
        factory(miner="semihard")
    with pytest.raises(ValueError, match="reducer"):
        factory(reducer="mean")


def test_supcon_multi_hot_labels_with_a_miner_raise():
    labels, x = supcon_batch(0)
    multi_hot = np.eye(3, dtype="int32")[labels]
    loss = keras_dml.SupConLoss(miner=miners.MultiSimilarityMiner(0.1))
    with pytest.raises(ValueError, match="multi-hot"):
        loss(multi_hot, x.astype("float32"))
    # Without a miner, multi-hot labels stay supported.
    assert np.isfinite(float(keras_dml.SupConLoss()(multi_hot, x.astype("float32"))))


@pytest.mark.parametrize("name", ["SupCon", "NTXent"])
def test_a_miner_through_explicit_references_gives_the_same_value_and_gradient(name):
    # The cross-replica code path with one replica (outside tf.distribute the collectives are
    # identities): the miner mines queries against the references, self-pairs found through
    # `query_offset`.
    fn = {"SupCon": lambda y, v, **kw: supcon_loss(y, v, temperature=0.2, **kw),
          "NTXent": lambda y, v, **kw: _nt_xent_from_stacked_views(y, v, temperature=0.2, **kw)}
    labels, x = (supcon_batch if name == "SupCon" else views_batch)(3)
    x = x.astype("float32")
    miner = miners.MultiSimilarityMiner(0.1)

    def with_references(v):
        references = References(ops.convert_to_tensor(labels), v, query_offset=0,
                                across_replicas=True)
        return fn[name](labels, v, miner=miner, references=references)

    value, grad = loss_gradient(lambda v: fn[name](labels, v, miner=miner), x)
    ref_value, ref_grad = loss_gradient(with_references, x)
    np.testing.assert_allclose(ref_value, value, rtol=1e-5)
    np.testing.assert_allclose(ref_grad, grad, rtol=1e-4, atol=1e-6)
    assert np.abs(grad).max() > 0


def numpy_mined(name, labels, x, positive, negative, temperature):
    """Loops over the mined masks: SupCon's per-anchor mean, NT-Xent's per-pair mean."""
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = z @ z.T / temperature
    terms = []
    for i in range(len(x)):
        pos = [j for j in range(len(x)) if positive[i, j]]
        neg = [k for k in range(len(x)) if negative[i, k]]
        if name == "SupCon" and pos:
            denominator = np.log(sum(np.exp(s[i, k]) for k in pos + neg))
            terms.append(-np.mean([s[i, j] - denominator for j in pos]))
        for j in pos if name == "NTXent" else ():
            others = sum(np.exp(s[i, k]) for k in neg)
            terms.append(-np.log(np.exp(s[i, j]) / (np.exp(s[i, j]) + others)))
    return np.mean(terms) if terms else 0.0


@pytest.mark.parametrize("miner", list(MINERS))
@pytest.mark.parametrize("name", ["SupCon", "NTXent"])
def test_a_miner_matches_a_numpy_reference(name, miner):
    labels, x = (supcon_batch if name == "SupCon" else views_batch)(5)
    our_miner = MINERS[miner][0]()
    positive, negative = (np.asarray(m) for m in our_miner(labels, x).pairs())
    assert positive.any() and negative.any()
    loss = (keras_dml.SupConLoss(0.2, 0.2, miner=our_miner) if name == "SupCon"
            else keras_dml.NTXentLoss(0.2, miner=our_miner))
    value, _ = ours(loss, labels, x)
    want = numpy_mined(name, labels, x, positive, negative, 0.2)
    np.testing.assert_allclose(value, want, rtol=1e-6)
