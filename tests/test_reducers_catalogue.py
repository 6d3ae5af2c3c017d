"""`reducer=` on the catalogue's losses (and `MarginLoss`) against PML 2.9's reducers.

Every case runs the loss with and without a miner through the helpers of
`test_catalogue_loss_miners` (pair losses) and `test_contrastive_loss_miners`
(`SupConLoss`, `NTXentLoss`): same unit-norm embeddings and labels, value and
gradient to rel 1e-5 in float64.

PML's reducers see each loss's terms with a reduction type: "triplet"
(`MarginLoss`), "pos_pair"/"neg_pair" (`LiftedStructureLoss`,
`TupletMarginLoss`, `AngularLoss`, `IntraPairVarianceLoss`,
`SignalToNoiseRatioContrastiveLoss`, `NTXentLoss`) or "element"
(`GeneralizedLiftedStructureLoss`, `SupConLoss`). Stated differences, each
tested here:

- PML's `PerAnchorReducer` refuses triplets (`NotImplementedError`); keras-dml's
  averages each anchor's triplet terms, then the anchors (`MarginLoss` against a
  NumPy loop).
- PML's `LiftedStructureLoss`, `TupletMarginLoss` and `AngularLoss` hand their
  reducer `(P, 1)` losses, not `(P,)` (`GeneralizedLiftedStructureLoss`:
  `(B, 1)`): PML's `PerAnchorReducer` then fails on the pair losses (a shape
  error) and its `ClassWeightedReducer` broadcasts `(P, 1) * (P,)` to
  `(P, P)`, i.e. `mean(losses) * mean(weights)`. keras-dml weights each term
  by its anchor's class; it equals PML's reducer fed the same losses as a
  vector (`FlatLosses`).
"""

from __future__ import annotations

import numpy as np
import pytest
from pml_parity import requires_pml
from test_catalogue_loss_miners import LOSSES, PAIR_MINERS, TRIPLET_MINER, check, theirs
from test_catalogue_loss_miners import batch as unit_batch
from test_contrastive_loss_miners import check as contrastive_check
from test_contrastive_loss_miners import views_batch
from test_loss_miners import euclid, ours, pml_losses, pml_reducers, torch

import keras_dml
from keras_dml import reducers

pytestmark = requires_pml

NO_MINER = (lambda: None, lambda: lambda embeddings, labels: None)
MINERS = {"none": NO_MINER, "PairMarginMiner": PAIR_MINERS["PairMarginMiner"],
          "TripletMarginMiner": TRIPLET_MINER}
WEIGHTS = [0.5, 2.0, 1.5]


def reducer_pair(kind, weights=WEIGHTS):
    """`(keras-dml reducer, PML reducer)` of one kind."""
    if kind == "per_anchor":
        return reducers.PerAnchorReducer(), pml_reducers.PerAnchorReducer()
    if kind == "class_weighted":
        return (reducers.ClassWeightedReducer(weights),
                pml_reducers.ClassWeightedReducer(torch.tensor(weights, dtype=torch.float64)))
    if kind == "threshold":
        return reducers.ThresholdReducer(low=0.05, high=0.6), pml_reducers.ThresholdReducer(
            low=0.05, high=0.6)
    if kind == "avg_non_zero":
        return reducers.AvgNonZeroReducer(), pml_reducers.AvgNonZeroReducer()
    return reducers.MeanReducer(), pml_reducers.MeanReducer()


class FlatLosses(torch.nn.Module):
    """A PML reducer fed each sub-loss's terms as a vector (see the module docstring)."""

    def __init__(self, reducer):
        super().__init__()
        self.reducer = reducer

    def forward(self, loss_dict, embeddings, labels):
        flat = {name: {**info, "losses": info["losses"].reshape(-1)}
                if torch.is_tensor(info["losses"]) else info for name, info in loss_dict.items()}
        return self.reducer(flat, embeddings, labels)


# -- 1. MarginLoss(reducer=...) -------------------------------------------------------


@pytest.mark.parametrize("miner", list(MINERS))
@pytest.mark.parametrize("kind", ["mean", "avg_non_zero", "threshold", "class_weighted"])
def test_margin_loss_reducer_matches_pml(kind, miner):
    check("Margin", *MINERS[miner], reducer_pair=reducer_pair(kind),
          dedupe=False)


def test_margin_loss_default_reducer_is_unchanged():
    labels, x = unit_batch(0)
    plain = float(keras_dml.MarginLoss()(labels, x))
    want, _ = theirs(pml_losses.MarginLoss(distance=euclid()), NO_MINER[1](), labels, x)
    np.testing.assert_allclose(plain, want, rtol=1e-5)
    # The divisor (number of non-zero pos/neg terms) is not the AvgNonZeroReducer's count
    # (number of triplets with a non-zero sum).
    non_zero = float(keras_dml.MarginLoss(reducer=reducers.AvgNonZeroReducer())(labels, x))
    assert not np.isclose(plain, non_zero, rtol=1e-3)


def margin_per_anchor_loops(labels, x, margin=0.2, beta=1.2):
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    per_anchor = []
    for a in range(len(labels)):
        terms = [max(d[a, p] - beta + margin, 0.0) + max(beta - d[a, n] + margin, 0.0)
                 for p in range(len(labels)) for n in range(len(labels))
                 if p != a and labels[p] == labels[a] and labels[n] != labels[a]]
        per_anchor.append(sum(terms) / len(terms) if terms else 0.0)
    return float(np.mean(per_anchor))


def test_margin_loss_per_anchor_reducer_extends_pml():
    # PML's PerAnchorReducer refuses MarginLoss's triplets; keras-dml averages per anchor.
    labels, x = unit_batch(1)
    with pytest.raises(NotImplementedError, match="Triplet"):
        theirs(pml_losses.MarginLoss(distance=euclid(), reducer=pml_reducers.PerAnchorReducer()),
               NO_MINER[1](), labels, x)
    value, grad = ours(keras_dml.MarginLoss(reducer=reducers.PerAnchorReducer()), labels, x)
    np.testing.assert_allclose(value, margin_per_anchor_loops(labels, x), rtol=1e-9)
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0


@pytest.mark.parametrize("kind", ["mean", "class_weighted"])
def test_margin_loss_learned_per_class_beta_with_a_reducer_matches_pml(kind):
    # With per-class β and nu > 0, PML reduces the regulariser's `nu * beta_a` per triplet
    # with the same reducer ("element" terms) and adds it.
    labels, x = unit_batch(2)
    betas = np.array([1.0, 1.1, 0.9])
    ours_reducer, pml_reducer = reducer_pair(kind)
    loss = keras_dml.MarginLoss(learn_beta=True, num_classes=3, nu=0.1, reducer=ours_reducer)
    with_beta = np.concatenate([x, np.tile(betas, (len(x), 1))], axis=1)
    value, grad = ours(loss, labels, with_beta)
    pml_loss = pml_losses.MarginLoss(learn_beta=True, num_classes=3, nu=0.1, distance=euclid(),
                                     reducer=pml_reducer)
    pml_loss.beta.data = torch.tensor(betas)
    want, want_grad = theirs(pml_loss, NO_MINER[1](), labels, x)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_allclose(grad[:, :-3], want_grad, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(grad[:, -3:].sum(axis=0), pml_loss.beta.grad.numpy(), rtol=1e-5)


# -- 2. PerAnchorReducer and ClassWeightedReducer on the catalogue losses ----------------

# PML hands these losses' terms to its reducer as (P, 1) or (B, 1): see the module docstring.
FLAT_IN_PML = {
    "LiftedStruct": ("per_anchor", "class_weighted"),
    "TupletMargin": ("per_anchor", "class_weighted"),
    "Angular": ("per_anchor", "class_weighted"),
    "GeneralizedLiftedStructure": ("class_weighted",),  # its PerAnchorReducer reads "element"
}
CATALOGUE = ("LiftedStruct", "GeneralizedLiftedStructure", "TupletMargin", "IntraPairVariance",
             "SNRContrastive", "Angular")


@pytest.mark.parametrize("miner", ["none", "PairMarginMiner"])
@pytest.mark.parametrize("kind", ["per_anchor", "class_weighted"])
@pytest.mark.parametrize("name", CATALOGUE)
def test_catalogue_losses_match_pml(name, kind, miner):
    # MarginLoss: ClassWeightedReducer above, PerAnchorReducer a stated difference.
    ours_reducer, pml_reducer = reducer_pair(kind)
    if kind in FLAT_IN_PML.get(name, ()):
        pml_reducer = FlatLosses(pml_reducer)
    check(name, *MINERS[miner], reducer_pair=(ours_reducer, pml_reducer))


@pytest.mark.parametrize("name", list(FLAT_IN_PML))
def test_pml_column_losses_break_its_per_anchor_and_class_weighted_reducers(name):
    labels, x = unit_batch(0)
    pml_factory = LOSSES[name][1]

    def pml_value(reducer):
        return theirs(pml_factory(reducer), NO_MINER[1](), labels, x,
                      normalize=name == "Angular")[0]

    if "per_anchor" in FLAT_IN_PML[name]:
        with pytest.raises(RuntimeError, match="shape mismatch"):
            pml_value(reducer_pair("per_anchor")[1])
    raw = pml_value(reducer_pair("class_weighted")[1])
    flat = pml_value(FlatLosses(reducer_pair("class_weighted")[1]))
    # PML's raw value is the mean loss times the mean weight of the terms' anchors (every
    # query for the per-query GeneralizedLiftedStructure, else each positive pair's anchor).
    anchors = range(len(labels)) if name == "GeneralizedLiftedStructure" else [
        a for a in range(len(labels)) for p in range(len(labels))
        if a != p and labels[a] == labels[p]]
    mean_weight = np.mean([WEIGHTS[labels[a]] for a in anchors])
    np.testing.assert_allclose(raw, pml_value(pml_reducers.MeanReducer()) * mean_weight,
                               rtol=1e-9)
    value, _ = ours(LOSSES[name][0](None, reducer_pair("class_weighted")[0]), labels, x)
    np.testing.assert_allclose(value, flat, rtol=1e-5)
    assert not np.isclose(raw, flat, rtol=1e-3)


SUPCON = (lambda r: keras_dml.SupConLoss(temperature=0.1, base_temperature=0.1, reducer=r),
          lambda r: pml_losses.SupConLoss(temperature=0.1, reducer=r))


@pytest.mark.parametrize("miner", ["none", "PairMarginMiner"])
@pytest.mark.parametrize("kind", ["per_anchor", "class_weighted"])
def test_supcon_matches_pml(kind, miner):
    ours_reducer, pml_reducer = reducer_pair(kind)
    ours_miner, pml_miner = MINERS[miner]
    loss = keras_dml.SupConLoss(temperature=0.1, base_temperature=0.1, miner=ours_miner(),
                                reducer=ours_reducer)
    contrastive_check(loss, pml_losses.SupConLoss(temperature=0.1, reducer=pml_reducer),
                      pml_miner, unit_batch)


@pytest.mark.parametrize("miner", ["none", "PairMarginMiner"])
@pytest.mark.parametrize("kind", ["per_anchor", "class_weighted"])
def test_ntxent_matches_pml(kind, miner):
    # NT-Xent's labels are the instance ids 0..5 of the stacked views: one weight per instance.
    ours_reducer, pml_reducer = reducer_pair(kind, weights=[0.5, 2.0, 1.5, 1.0, 0.25, 3.0])
    ours_miner, pml_miner = MINERS[miner]
    loss = keras_dml.NTXentLoss(temperature=0.2, miner=ours_miner(), reducer=ours_reducer)
    contrastive_check(loss, pml_losses.NTXentLoss(temperature=0.2, reducer=pml_reducer),
                      pml_miner, views_batch)
