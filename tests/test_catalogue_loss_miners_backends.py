"""`miner=` / `reducer=` on the catalogue's losses, on every backend (small and fast).

A miner that selects every pair gives the loss without a miner (value and
gradient), a `fit` step with a miner and a reducer runs, `NCALoss` with a
miner equals its NumPy loops. The PML parity is in
tests/test_catalogue_loss_miners.py (TensorFlow only).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import loss_gradient
from test_nca import ref_mined_weights, ref_nca

import keras_dml
from keras_dml import miners, reducers

LOSSES = {
    "GeneralizedLiftedStructure": keras_dml.GeneralizedLiftedStructureLoss,
    "LiftedStruct": keras_dml.LiftedStructLoss,
    "TupletMargin": keras_dml.TupletMarginLoss,
    "IntraPairVariance": keras_dml.IntraPairVarianceLoss,
    "SNRContrastive": keras_dml.SignalToNoiseRatioContrastiveLoss,
    "Angular": keras_dml.AngularLoss,
    "Margin": keras_dml.MarginLoss,
    "DynamicSoftMargin": lambda **kw: keras_dml.DynamicSoftMarginLoss(momentum=1.0, **kw),
    "SupCon": lambda **kw: keras_dml.SupConLoss(temperature=0.2, **kw),
    # y_pred = concat([view_1, view_2]) of 6 inputs; the miner sees the instance ids.
    "NTXent": lambda **kw: keras_dml.NTXentLoss(temperature=0.2, **kw),
    # Every pair mined: every query is counted as often, so every weight is 1.
    "NCA": keras_dml.NCALoss,
}


def batch(n=12, dim=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    return (np.arange(n) % 3).astype("int32"), (x / np.linalg.norm(x, axis=1,
                                                                  keepdims=True)).astype("float32")


@pytest.mark.parametrize("name", list(LOSSES))
def test_a_miner_of_every_pair_gives_the_loss_without_miner(name):
    labels, x = batch()
    # Unit vectors: every positive is farther than -1, every negative closer than 10.
    every_pair = miners.PairMarginMiner(pos_margin=-1.0, neg_margin=10.0)
    mined, mined_grad = loss_gradient(lambda v: LOSSES[name](miner=every_pair)(labels, v), x)
    plain, plain_grad = loss_gradient(lambda v: LOSSES[name]()(labels, v), x)
    np.testing.assert_allclose(float(mined), float(plain), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mined_grad, plain_grad, rtol=1e-4, atol=1e-6)
    assert np.all(np.isfinite(mined_grad)) and np.any(mined_grad != 0)


@pytest.mark.parametrize("name", list(LOSSES))
def test_fit_with_a_miner_and_a_reducer(name):
    options = {"miner": miners.MultiSimilarityMiner(0.1)}
    if name not in ("DynamicSoftMargin", "NCA"):
        options["reducer"] = reducers.AvgNonZeroReducer()
    labels, x = batch(n=24)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4),
                              keras.layers.UnitNormalization()])
    model.compile(optimizer="sgd", loss=LOSSES[name](**options))
    history = model.fit(x, labels, batch_size=12, epochs=1, verbose=0, shuffle=False)
    assert np.all(np.isfinite(history.history["loss"]))


@pytest.mark.parametrize("miner", [miners.MultiSimilarityMiner(0.1),
                                   miners.TripletMarginMiner(0.3, "all")],
                         ids=["pairs", "triplets"])
def test_nca_with_a_miner_matches_numpy(miner):
    labels, x = batch(seed=1)
    value, grad = loss_gradient(lambda v: keras_dml.NCALoss(miner=miner)(labels, v), x)
    weights = ref_mined_weights(miner(labels, x))
    assert min(weights) < 1.0
    np.testing.assert_allclose(float(value), ref_nca(labels, x.astype("float64"), weights=weights),
                               rtol=1e-4, atol=1e-6)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_multiple_losses_is_the_weighted_sum_and_trains():
    labels, x = batch()
    parts = [keras_dml.ContrastiveLoss(miner=miners.PairMarginMiner(0.5, 1.5)),
             keras_dml.MarginLoss()]
    total, grad = loss_gradient(
        lambda v: keras_dml.MultipleLosses(parts, weights=[1.0, 0.5])(labels, v), x)
    want = float(parts[0](labels, x)) + 0.5 * float(parts[1](labels, x))
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_docstring_examples():
    import doctest

    from keras_dml.losses import multiple

    assert doctest.testmod(multiple).failed == 0
