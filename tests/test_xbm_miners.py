"""Cross-batch memory with miners, against PML's `CrossBatchMemory(loss, miner=)`.

PML's wrapper mines the batch (queries) against the whole memory
(`miner(embeddings, labels, E_mem, L_mem)`), removes each query's pairs with
its own just-written copy and passes the tuples to the loss; keras-dml's miner
mines the memory's `References` (the self pair and the empty slots are never
pairs). Same values, gradients and memory over batches that wrap around it.
"""

from __future__ import annotations

import numpy as np
import pytest
from pml_parity import requires_pml
from test_loss_miners import euclid, pml_losses, pml_miners, pml_reducers, torch

import keras_dml
from keras_dml import miners, reducers
from keras_dml.layers import CrossBatchMemory

pytestmark = requires_pml

D, M = 6, 20  # batches of 8 wrap around the memory


def batches(n=5, size=8, classes=3, seed=1):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, classes, size).astype("int64"),
             rng.normal(size=(size, D)).astype("float32")) for _ in range(n)]


CASES = {
    "contrastive+pair-margin": (
        lambda: keras_dml.ContrastiveLoss(pos_margin=0.3, neg_margin=3.0,
                                          miner=miners.PairMarginMiner(2.0, 3.0),
                                          reducer=reducers.AvgNonZeroReducer()),
        lambda: pml_losses.ContrastiveLoss(pos_margin=0.3, neg_margin=3.0, distance=euclid()),
        lambda: pml_miners.PairMarginMiner(2.0, 3.0, distance=euclid())),
    "triplet+triplet-margin": (
        lambda: keras_dml.TripletLoss(margin=0.5,
                                      miner=miners.TripletMarginMiner(0.5, "semihard")),
        lambda: pml_losses.TripletMarginLoss(margin=0.5, distance=euclid()),
        lambda: pml_miners.TripletMarginMiner(0.5, "semihard", distance=euclid())),
    "multi-similarity+miner": (
        lambda: keras_dml.MultiSimilarityLoss(alpha=2.0, beta=10.0, base=0.5,
                                              miner=miners.MultiSimilarityMiner(0.3)),
        lambda: pml_losses.MultiSimilarityLoss(alpha=2.0, beta=10.0, base=0.5),
        lambda: pml_miners.MultiSimilarityMiner(0.3)),
    "generalized-lifted+pair-margin": (
        lambda: keras_dml.GeneralizedLiftedStructureLoss(miner=miners.PairMarginMiner(2.0, 3.0)),
        lambda: pml_losses.GeneralizedLiftedStructureLoss(distance=euclid()),
        lambda: pml_miners.PairMarginMiner(2.0, 3.0, distance=euclid())),
    "margin+batch-hard": (
        lambda: keras_dml.MarginLoss(beta=2.5, miner=miners.BatchHardMiner()),
        lambda: pml_losses.MarginLoss(beta=2.5, distance=euclid()),
        lambda: pml_miners.BatchHardMiner(distance=euclid())),
    "contrastive+reducer-threshold": (
        lambda: keras_dml.ContrastiveLoss(neg_margin=3.0, miner=miners.PairMarginMiner(2.0, 3.0),
                                          reducer=reducers.ThresholdReducer(low=0.5)),
        lambda: pml_losses.ContrastiveLoss(neg_margin=3.0, distance=euclid(),
                                           reducer=pml_reducers.ThresholdReducer(0.5)),
        lambda: pml_miners.PairMarginMiner(2.0, 3.0, distance=euclid())),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_pml_cross_batch_memory_with_a_miner(case):
    import tensorflow as tf

    ours_factory, pml_loss, pml_miner = CASES[case]
    ours = ours_factory()
    memory = CrossBatchMemory(M, D)
    pml_xbm = pml_losses.CrossBatchMemory(pml_loss(), embedding_size=D, memory_size=M,
                                          miner=pml_miner())
    nonzero = 0
    for step, (labels, emb) in enumerate(batches()):
        x = tf.Variable(emb)
        with tf.GradientTape() as tape:
            refs = memory.enqueue(labels, x)
            value = ours.compute(tf.constant(labels, "int32"), x, references=refs)
        grad = tape.gradient(value, x)
        grad = np.zeros_like(emb) if grad is None else grad.numpy()
        x_torch = torch.tensor(emb, requires_grad=True)
        expected = pml_xbm(x_torch, torch.tensor(labels))
        want_grad = np.zeros_like(emb)
        if expected.requires_grad:
            expected.backward()
            want_grad = x_torch.grad.numpy()
        np.testing.assert_allclose(float(value), float(expected.detach()), rtol=1e-5,
                                   atol=1e-7, err_msg=f"step {step}")
        np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6, err_msg=f"step {step}")
        np.testing.assert_allclose(memory.embeddings.numpy(), pml_xbm.embedding_memory.numpy())
        assert int(memory.pointer.numpy()) == pml_xbm.queue_idx
        nonzero += float(value) != 0
    assert nonzero >= 3

