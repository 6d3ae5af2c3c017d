"""`miner=` and `reducer=` on the catalogue's pair and triplet losses, against PML 2.9.

Each case runs PML's miner and loss (torch, float64, autograd) and ours
(TensorFlow, float64, GradientTape) on the same unit-norm embeddings and labels:
same value, same gradient.

Miners of the other kind are converted as PML converts them, with one stated
difference: a pair loss reads a triplet miner's (a, p) and (a, n) pairs once
each (`Mined.pairs()`), where PML's pair-based losses (LiftedStructure,
TupletMargin, IntraPairVariance, SNR contrastive, Angular) repeat a pair once
per triplet it comes from. Those cases compare with PML fed the de-duplicated
pairs, and one test shows that the repeated pairs change PML's value. A pair
miner given to `MarginLoss` (a triplet loss) forms every mined positive with
every mined negative of its anchor, as PML's `convert_to_triplets`.
"""

from __future__ import annotations

import numpy as np
import pytest
from pml_parity import requires_pml
from test_loss_miners import euclid, ours, pml_losses, pml_miners, pml_reducers, torch

import keras_dml
from keras_dml import miners, reducers

pytestmark = requires_pml


def batch(seed, n=12, dim=5, classes=3):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n).astype("int32")
    x = rng.normal(size=(n, dim))
    return labels, x / np.linalg.norm(x, axis=1, keepdims=True)


# name: (keras-dml loss factory(miner, reducer), PML loss factory(reducer), pair-based in PML,
#        takes a reducer)
LOSSES = {
    "GeneralizedLiftedStructure": (
        lambda m, r: keras_dml.GeneralizedLiftedStructureLoss(miner=m, reducer=r),
        lambda r: pml_losses.GeneralizedLiftedStructureLoss(distance=euclid(), reducer=r),
        False, True),
    "LiftedStruct": (
        lambda m, r: keras_dml.LiftedStructLoss(miner=m, reducer=r),
        lambda r: pml_losses.LiftedStructureLoss(neg_margin=1.0, distance=euclid(), reducer=r),
        True, True),
    "TupletMargin": (
        lambda m, r: keras_dml.TupletMarginLoss(scale=16.0, miner=m, reducer=r),
        lambda r: pml_losses.TupletMarginLoss(scale=16.0, reducer=r), True, True),
    "IntraPairVariance": (
        lambda m, r: keras_dml.IntraPairVarianceLoss(miner=m, reducer=r),
        lambda r: pml_losses.IntraPairVarianceLoss(reducer=r), True, True),
    "SNRContrastive": (
        lambda m, r: keras_dml.SignalToNoiseRatioContrastiveLoss(neg_margin=1.5, miner=m,
                                                                 reducer=r),
        lambda r: pml_losses.SignalToNoiseRatioContrastiveLoss(neg_margin=1.5, reducer=r),
        True, True),
    "Angular": (
        lambda m, r: keras_dml.AngularLoss(miner=m, reducer=r),
        lambda r: pml_losses.AngularLoss(reducer=r), True, True),
    "Margin": (
        lambda m, r: keras_dml.MarginLoss(miner=m, reducer=r),
        lambda r: pml_losses.MarginLoss(distance=euclid(), reducer=r), False, True),
}

PAIR_MINERS = {
    "PairMarginMiner": (lambda: miners.PairMarginMiner(0.9, 1.1),
                        lambda: pml_miners.PairMarginMiner(0.9, 1.1, distance=euclid())),
    "MultiSimilarityMiner": (lambda: miners.MultiSimilarityMiner(0.1),
                             lambda: pml_miners.MultiSimilarityMiner(0.1)),
}
TRIPLET_MINER = (lambda: miners.TripletMarginMiner(0.3, "semihard"),
                 lambda: pml_miners.TripletMarginMiner(0.3, "semihard", distance=euclid()))


def unique_pairs(triplets):
    """A triplet tuple as PML's 4-tuple of pairs, each (a, p) and (a, n) once."""
    a, p, n = (t.numpy() for t in triplets)
    pos = sorted(set(zip(a.tolist(), p.tolist(), strict=True)))
    neg = sorted(set(zip(a.tolist(), n.tolist(), strict=True)))
    as_tensor = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    return (as_tensor([i for i, _ in pos]), as_tensor([j for _, j in pos]),
            as_tensor([i for i, _ in neg]), as_tensor([j for _, j in neg]))


def theirs(loss, miner, labels, x, dedupe=False, normalize=False):
    emb = torch.tensor(x, requires_grad=True)
    lab = torch.tensor(labels.astype("int64"))
    indices = miner(emb, lab)
    if dedupe:
        indices = unique_pairs(indices)
    # keras-dml's AngularLoss normalises every embedding (PML: anchors and positives only),
    # so PML gets the normalisation in front (tests/test_angular.py does the same).
    value = loss(torch.nn.functional.normalize(emb) if normalize else emb, lab, indices)
    if not value.requires_grad:
        return float(value), np.zeros_like(x)
    value.backward()
    return float(value.detach()), emb.grad.numpy()


def check(name, our_miner, pml_miner, reducer_pair=(None, None), dedupe=False):
    our_factory, pml_factory, _, _ = LOSSES[name]
    nonzero = 0
    for seed in range(4):
        labels, x = batch(seed)
        value, grad = ours(our_factory(our_miner(), reducer_pair[0]), labels, x)
        want, want_grad = theirs(pml_factory(reducer_pair[1]), pml_miner(), labels, x, dedupe,
                                 normalize=name == "Angular")
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-9, err_msg=f"seed {seed}")
        np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-9, err_msg=f"seed {seed}")
        nonzero += value != 0
    assert nonzero >= 2  # the cases test something


@pytest.mark.parametrize("miner", list(PAIR_MINERS))
@pytest.mark.parametrize("name", list(LOSSES))
def test_pair_miner_matches_pml(name, miner):
    check(name, *PAIR_MINERS[miner])


@pytest.mark.parametrize("name", list(LOSSES))
def test_triplet_miner_matches_pml(name):
    # Mat-based (GeneralizedLiftedStructure) and triplet (Margin) losses: PML's own way.
    # Pair-based ones: PML fed each mined pair once (see the module docstring).
    check(name, *TRIPLET_MINER, dedupe=LOSSES[name][2])


def test_pml_pair_based_losses_repeat_a_triplet_miners_pairs():
    # The stated difference: PML's LiftedStructure with the raw triplets differs from PML
    # with each pair once, which is what keras-dml computes.
    labels, x = batch(0)
    loss = pml_losses.LiftedStructureLoss(neg_margin=1.0, distance=euclid())
    raw, _ = theirs(loss, TRIPLET_MINER[1](), labels, x)
    once, _ = theirs(loss, TRIPLET_MINER[1](), labels, x, dedupe=True)
    assert not np.isclose(raw, once, rtol=1e-3)
    ours_value, _ = ours(keras_dml.LiftedStructLoss(miner=TRIPLET_MINER[0]()), labels, x)
    np.testing.assert_allclose(ours_value, once, rtol=1e-5)


@pytest.mark.parametrize("name", [n for n in LOSSES if LOSSES[n][3]])
@pytest.mark.parametrize("reducer", ["avg_non_zero", "threshold"])
def test_reducer_with_a_miner_matches_pml(name, reducer):
    pair = {
        "avg_non_zero": (reducers.AvgNonZeroReducer(), pml_reducers.AvgNonZeroReducer()),
        "threshold": (reducers.ThresholdReducer(low=0.01), pml_reducers.ThresholdReducer(0.01)),
    }[reducer]
    check(name, *PAIR_MINERS["PairMarginMiner"], reducer_pair=pair)


@pytest.mark.parametrize("name", list(LOSSES))
def test_miner_and_reducer_round_trip_and_bad_miners_raise(name):
    factory, _, _, takes_reducer = LOSSES[name]
    loss = factory(miners.PairMarginMiner(0.9, 1.1),
                   reducers.AvgNonZeroReducer() if takes_reducer else None)
    clone = type(loss).from_config(loss.get_config())
    assert clone.get_config() == loss.get_config()
    assert isinstance(clone.miner, miners.PairMarginMiner)
    labels, x = batch(1)
    np.testing.assert_allclose(float(clone(labels, x)), float(loss(labels, x)), rtol=1e-6)
    with pytest.raises(ValueError, match="`miner` must be a keras_dml.miners.Miner"):
        factory("semihard", None)
    if takes_reducer:
        with pytest.raises(ValueError, match="reducer"):
            factory(None, "mean")


def test_margin_loss_with_a_learned_beta_and_a_miner_matches_pml():
    # β as a model weight (MarginBeta's columns) with nu > 0: PML's MarginLoss(learn_beta=True).
    labels, x = batch(2)
    beta = 1.0
    ours_loss = keras_dml.MarginLoss(learn_beta=True, nu=0.1, miner=TRIPLET_MINER[0](),
                                     dtype="float64")
    with_beta = np.concatenate([x, np.full((len(x), 1), beta)], axis=1)
    value, grad = ours(ours_loss, labels, with_beta)
    pml_loss = pml_losses.MarginLoss(learn_beta=True, nu=0.1, beta=beta, distance=euclid())
    want, want_grad = theirs(pml_loss, TRIPLET_MINER[1](), labels, x)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_allclose(grad[:, :-1], want_grad, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(grad[:, -1].sum(), pml_loss.beta.grad.numpy().sum(), rtol=1e-5)


@pytest.mark.parametrize("name", list(LOSSES))
def test_multi_hot_labels_with_a_miner_raise(name):
    loss = LOSSES[name][0](miners.PairMarginMiner(0.9, 1.1), None)
    labels, x = batch(0)
    multi_hot = np.eye(3, dtype="int32")[labels]
    with pytest.raises(ValueError):
        loss(multi_hot, x.astype("float32"))
