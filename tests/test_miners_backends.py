"""Miners, reducers and regularizers on every backend: compiled forward, NumPy values, a fit step.

Small and fast: this file runs again under JAX and torch (`tests/backend_agnostic.txt`);
the PML parity files (`test_miners.py`, `test_loss_miners.py`, `test_reducers.py`,
`test_regularizers.py`) run under TensorFlow only.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import loss_gradient

import keras_dml
from keras_dml import miners, reducers, regularizers

LABELS = np.repeat(np.arange(3), 3).astype("int32")
X = np.random.default_rng(0).normal(size=(9, 4)).astype("float32")


def compiled(fn, *arrays):
    """`fn` as the backend compiles it (tf.function / jax.jit); torch runs eagerly."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, autograph=False)(*arrays)
    if backend == "jax":
        import jax

        return jax.jit(fn)(*arrays)
    return fn(*arrays)


def np_distances(x):
    return np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))


def np_masks(labels):
    same = labels[:, None] == labels[None]
    return same & ~np.eye(len(labels), dtype=bool), ~same


def ref_pair_margin(labels, x, pos_margin, neg_margin):
    d = np_distances(x)
    pos, neg = np_masks(labels)
    return pos & (d > pos_margin), neg & (d < neg_margin)


def ref_triplet_margin(labels, x, margin):
    d = np_distances(x)
    pos, neg = np_masks(labels)
    return pos[:, :, None] & neg[:, None, :] & (d[:, None, :] - d[:, :, None] <= margin)


def ref_batch_hard(labels, x):
    d = np_distances(x)
    pos, neg = np_masks(labels)
    hard_p = np.argmax(np.where(pos, d, -np.inf), 1)
    hard_n = np.argmin(np.where(neg, d, np.inf), 1)
    out = np.zeros((len(x),) * 3, bool)
    out[np.arange(len(x)), hard_p, hard_n] = True
    return out


ALL_MINERS = [
    miners.TripletMarginMiner(0.5),
    miners.BatchHardMiner(),
    miners.BatchEasyHardMiner(),
    miners.MultiSimilarityMiner(0.1),
    miners.PairMarginMiner(1.0, 2.0),
    miners.HDCMiner(0.5),
    miners.AngularMiner(20),
    miners.DistanceWeightedMiner(seed=0),
    miners.UniformHistogramMiner(4, 2, 2, seed=0),
]


@pytest.mark.parametrize("miner", ALL_MINERS, ids=lambda m: type(m).__name__)
def test_miner_compiles_and_selects_valid_pairs(miner):
    positive, negative, triplets = (
        np.asarray(keras.ops.convert_to_numpy(m))
        for m in compiled(
            lambda labels, x: (*miner(labels, x).pairs(), miner(labels, x).triplet_mask()),
            LABELS,
            X,
        )
    )
    pos, neg = np_masks(LABELS)
    assert triplets.shape == (9, 9, 9)
    assert not (positive & ~pos).any() and not (negative & ~neg).any()
    assert not (triplets & ~(pos[:, :, None] & neg[:, None, :])).any()
    if isinstance(miner, miners.PairMarginMiner):
        want = ref_pair_margin(LABELS, X, 1.0, 2.0)
        np.testing.assert_array_equal(positive, want[0])
        np.testing.assert_array_equal(negative, want[1])
    elif isinstance(miner, miners.TripletMarginMiner):
        np.testing.assert_array_equal(triplets, ref_triplet_margin(LABELS, X, 0.5))
    elif isinstance(miner, miners.BatchHardMiner):
        np.testing.assert_array_equal(triplets, ref_batch_hard(LABELS, X))


def ref_triplet_loss(labels, x, margin, triplets):
    d = np_distances(x.astype("float64"))
    terms = [max(d[a, p] - d[a, n] + margin, 0.0) for a, p, n in np.argwhere(triplets)]
    terms = [t for t in terms if t > 0]
    return sum(terms) / len(terms) if terms else 0.0


def test_triplet_loss_with_miner_value_gradient_and_jit():
    miner = miners.TripletMarginMiner(0.5)
    loss = keras_dml.TripletLoss(margin=0.5, miner=miner)
    want = ref_triplet_loss(LABELS, X, 0.5, ref_triplet_margin(LABELS, X, 0.5))
    value, grad = loss_gradient(lambda v: loss(LABELS, v), X)
    np.testing.assert_allclose(float(value), want, rtol=1e-5)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)
    jitted = compiled(lambda labels, x: loss(labels, x), LABELS, X)
    np.testing.assert_allclose(float(keras.ops.convert_to_numpy(jitted)), want, rtol=1e-5)


def test_contrastive_loss_with_miner_and_reducer_matches_numpy():
    loss = keras_dml.ContrastiveLoss(
        neg_margin=2.0, miner=miners.PairMarginMiner(1.0, 2.0),
        reducer=reducers.AvgNonZeroReducer(),
    )
    pos, neg = ref_pair_margin(LABELS, X, 1.0, 2.0)
    d = np_distances(X.astype("float64"))
    pos_terms = d[pos][d[pos] > 0]
    neg_terms = np.maximum(2.0 - d[neg], 0)
    neg_terms = neg_terms[neg_terms > 0]
    want = (pos_terms.mean() if pos_terms.size else 0.0) + (
        neg_terms.mean() if neg_terms.size else 0.0)
    value, grad = loss_gradient(lambda v: loss(LABELS, v), X)
    np.testing.assert_allclose(float(value), want, rtol=1e-5)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize(
    "reducer, want",
    [
        (reducers.MeanReducer(), 1.0),
        (reducers.AvgNonZeroReducer(), 4.0 / 3.0),
        (reducers.ThresholdReducer(low=0.5, high=1.5), 1.0),
        (reducers.PerAnchorReducer(), 1.0),
        (reducers.ClassWeightedReducer([2.0, 1.0]), 1.5),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, float) else str(v),
)
def test_reducers_on_the_backend(reducer, want):
    losses = np.array([[0.0, 2.0], [1.0, 1.0]], "float32")
    labels = np.array([0, 1])
    got = compiled(lambda v, lab: reducer(v, None, lab), losses, labels)
    np.testing.assert_allclose(float(keras.ops.convert_to_numpy(got)), want, rtol=1e-6)


def unit_rows(m):
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def ref_regular_face(centres):
    cos = unit_rows(centres) @ unit_rows(centres).T
    np.fill_diagonal(cos, -2.0)
    return cos.max(axis=1).mean()


def ref_sparse_centres(centres, k):
    cos = unit_rows(centres) @ unit_rows(centres).T
    pairs = [(s, t) for s in range(len(centres)) for t in range(s + 1, len(centres))
             if s // k == t // k]
    return sum(np.sqrt(2.0 - min(2.0 * cos[s, t], 2.0)) for s, t in pairs) / (2 * len(pairs))


def ref_centre_invariant(centres):
    sq = (centres**2).sum(1)
    return ((sq - sq.mean()) ** 2 / 4).mean()


def ref_spherical(x):
    norms = np.linalg.norm(x, axis=1)
    return ((norms - norms.mean()) ** 2).mean()


@pytest.mark.parametrize(
    "reg, on_kernel, ref",
    [
        (regularizers.LpRegularizer(), False, lambda x: np.linalg.norm(x, axis=1).mean()),
        (regularizers.ZeroMeanRegularizer(), False, lambda x: np.abs(x.sum(1)).mean()),
        (regularizers.SphericalEmbeddingRegularizer(), False, ref_spherical),
        (regularizers.RegularFaceRegularizer(), True, ref_regular_face),
        (regularizers.CenterInvariantRegularizer(), True, ref_centre_invariant),
        (regularizers.SparseCentersRegularizer(3, 3), True, lambda c: ref_sparse_centres(c, 3)),
    ],
    ids=["lp", "zero-mean", "spherical", "regular-face", "center-invariant", "sparse-centers"],
)
def test_regularizers_value_and_gradient_on_the_backend(reg, on_kernel, ref):
    x = X.T.copy() if on_kernel else X  # a (4, 9) kernel: 9 centres, the columns
    value, grad = loss_gradient(lambda v: reg(v), x)
    np.testing.assert_allclose(float(value), ref(X.astype("float64")), rtol=1e-5)
    jitted = compiled(lambda v: reg(v), x)
    np.testing.assert_allclose(float(keras.ops.convert_to_numpy(jitted)), float(value), rtol=1e-5)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


@pytest.mark.parametrize(
    "loss",
    [
        keras_dml.TripletLoss(miner=miners.DistanceWeightedMiner(seed=1),
                              reducer=reducers.PerAnchorReducer()),
        keras_dml.CircleLoss(miner=miners.UniformHistogramMiner(5, 3, 3, seed=1),
                             embedding_regularizer=regularizers.LpRegularizer(weight=0.1)),
    ],
    ids=["triplet-distance-weighted", "circle-histogram"],
)
def test_fit_step_with_miner(loss):
    labels = np.repeat(np.arange(4), 4).astype("int32")
    x = np.random.default_rng(1).normal(size=(16, 6)).astype("float32")
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(4), keras.layers.UnitNormalization()]
    )
    model.compile(optimizer="adam", loss=loss)
    history = model.fit(x, labels, batch_size=16, epochs=1, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
