"""`NCALoss(miner=...)`: queries weighed by how often the miner picks them, as PML 2.9.

PML's `NCALoss` given an `indices_tuple` multiplies each query's loss by
`lmu.convert_to_weights`: how many times its index appears in the tuple's
arrays, over the largest such count (0 for a query never mentioned; 1 for
every query when nothing is mined). keras-dml computes the same counts from
the miner's masks (`miners.mined_query_weights`): a pair miner's masks are
PML's 4-tuple, a triplet miner's mask its 3-tuple, so the counts are PML's.
Stated difference: keras-dml's `BatchHardMiner` is a pair miner (one positive
and one negative per anchor) where PML's returns triplets, so an anchor counts
twice here, once in PML (tested: equal to PML fed `convert_to_pairs` of its
triplets).
"""

from __future__ import annotations

import numpy as np
import pytest
from keras import ops
from pml_parity import (
    assert_same,
    keras_value_and_grads,
    other_references,
    pml_value_and_grads,
    requires_pml,
)
from test_catalogue_loss_miners import batch as unit_batch
from test_catalogue_loss_miners import theirs
from test_contrastive_loss_miners import check
from test_loss_miners import euclid, ours, pml_distances, pml_losses, pml_miners, torch
from test_nca import ref_mined_weights, ref_nca

from keras_dml import miners
from keras_dml.losses.base import References
from keras_dml.losses.nca import NCALoss, nca_loss


def pml_nca():
    return pml_losses.NCALoss(distance=pml_distances.LpDistance(power=2,
                                                                normalize_embeddings=False))


def pml_miner_of(name):
    return {
        "PairMarginMiner": lambda: pml_miners.PairMarginMiner(0.9, 1.1, distance=euclid()),
        "MultiSimilarityMiner": lambda: pml_miners.MultiSimilarityMiner(0.1),
        "TripletMarginMiner": lambda: pml_miners.TripletMarginMiner(0.3, "all",
                                                                    distance=euclid()),
        "BatchHardMiner": lambda: pml_miners.BatchHardMiner(distance=euclid()),
    }[name]


OUR_MINERS = {
    "PairMarginMiner": lambda: miners.PairMarginMiner(0.9, 1.1),
    "MultiSimilarityMiner": lambda: miners.MultiSimilarityMiner(0.1),
    "TripletMarginMiner": lambda: miners.TripletMarginMiner(0.3, "all"),
    "BatchHardMiner": miners.BatchHardMiner,
}


@pytest.mark.parametrize("name", list(OUR_MINERS))
def test_miner_weights_match_numpy_loops(name):
    labels, x = unit_batch(0)
    miner = OUR_MINERS[name]()
    weights = ref_mined_weights(miner(labels, x.astype("float32")))
    assert 0.0 < min(weights) < 1.0 or 0.0 in weights  # the weights are not all 1
    loss = NCALoss(miner=miner, dtype="float64")
    assert_same(float(loss(labels, x)), ref_nca(labels, x, weights=weights))


@requires_pml
@pytest.mark.parametrize("name", ["PairMarginMiner", "MultiSimilarityMiner", "TripletMarginMiner"])
def test_miner_matches_pml(name):
    check(NCALoss(miner=OUR_MINERS[name]()), pml_nca(), pml_miner_of(name), unit_batch)


@requires_pml
def test_batch_hard_miner_weighs_anchors_as_pml_weighs_its_pairs():
    # keras-dml's BatchHardMiner returns pairs (its one positive and one negative per
    # anchor), so an anchor counts twice, as in PML's 4-tuple `convert_to_pairs(triplets)`;
    # PML's BatchHardMiner returns triplets, where the anchor counts once.
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
    labels, x = unit_batch(1)
    as_pairs = lambda: lambda emb, lab: lmu.convert_to_pairs(  # noqa: E731
        pml_miner_of("BatchHardMiner")()(emb, lab), lab)
    value, grad = ours(NCALoss(miner=miners.BatchHardMiner()), labels, x)
    want, want_grad = theirs(pml_nca(), as_pairs(), labels, x)
    assert_same(value, want)
    assert_same(grad, want_grad)
    raw, _ = theirs(pml_nca(), pml_miner_of("BatchHardMiner")(), labels, x)
    assert not np.isclose(raw, value, rtol=1e-3)


@requires_pml
def test_nothing_mined_weighs_every_query_1_as_pml():
    labels, x = unit_batch(2)
    miner = miners.PairMarginMiner(pos_margin=5.0, neg_margin=0.0)  # picks no pair
    plain = float(NCALoss(dtype="float64")(labels, x))
    assert_same(float(NCALoss(miner=miner, dtype="float64")(labels, x)), plain)
    want, _ = theirs(pml_nca(), pml_miners.PairMarginMiner(5.0, 0.0), labels, x)
    assert_same(plain, want)


@requires_pml
def test_miner_against_other_references_counts_anchors_only_as_pml():
    labels, x = unit_batch(3)
    ref_labels, ref_x, references = other_references(np.random.default_rng(4), dim=5, classes=3)
    miner = miners.MultiSimilarityMiner(0.1)
    got, (grad,) = keras_value_and_grads(
        lambda v: nca_loss(labels, v, miner=miner, references=references), x)
    mined = miner.mine(labels, x, references)
    assert_same(got, ref_nca(labels, x, ref_labels=ref_labels, ref_x=ref_x,
                             weights=ref_mined_weights(mined, in_batch=False)))
    pml_miner = pml_miners.MultiSimilarityMiner(0.1)
    ref_lab = torch.tensor(ref_labels)
    pml_loss = pml_nca()

    def fn(v):
        indices = pml_miner(v, torch.tensor(labels.astype("int64")), torch.tensor(ref_x), ref_lab)
        return pml_loss(v, torch.tensor(labels.astype("int64")), indices, torch.tensor(ref_x),
                        ref_lab)

    want, (want_grad,) = pml_value_and_grads(fn, x)
    assert_same(got, want)
    assert_same(grad, want_grad)


def test_miner_through_replica_references_equals_the_batch():
    # The cross-replica path with one replica (outside tf.distribute the collectives are
    # identities): the counts as references and the largest count are the batch's.
    labels, x = unit_batch(4)
    miner = miners.TripletMarginMiner(0.3, "all")

    def with_references(v):
        references = References(ops.convert_to_tensor(labels), v, query_offset=0,
                                across_replicas=True)
        return nca_loss(labels, v, miner=miner, references=references)

    got, (grad,) = keras_value_and_grads(with_references, x)
    want, (want_grad,) = keras_value_and_grads(lambda v: nca_loss(labels, v, miner=miner), x)
    assert_same(got, want)
    assert_same(grad, want_grad)


def test_miner_round_trip_and_bad_miners():
    loss = NCALoss(miner=miners.PairMarginMiner(0.9, 1.1))
    clone = NCALoss.from_config(loss.get_config())
    assert isinstance(clone.miner, miners.PairMarginMiner)
    labels, x = unit_batch(5)
    assert_same(float(clone(labels, x)), float(loss(labels, x)))
    with pytest.raises(ValueError, match="`miner` must be a keras_dml.miners.Miner"):
        NCALoss(miner="hard")
    with pytest.raises(ValueError, match="multi-hot"):
        loss(np.eye(3, dtype="int32")[labels], x.astype("float32"))
