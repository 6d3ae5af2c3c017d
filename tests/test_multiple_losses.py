"""MultipleLosses: the weighted sum of its losses, and PML 2.9's `MultipleLosses`."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from pml_parity import requires_pml

import keras_dml
from keras_dml import miners, reducers
from keras_dml.losses.multiple import MultipleLosses


def batch(seed=0, n=12, dim=5):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 3, n).astype("int32"), rng.normal(size=(n, dim))


def components():
    return [
        keras_dml.ContrastiveLoss(neg_margin=2.0, miner=miners.PairMarginMiner(1.0, 2.0),
                                  reducer=reducers.AvgNonZeroReducer()),
        keras_dml.TripletLoss(margin=0.2, negative_mining="all"),
        keras_dml.MultiSimilarityLoss(),
    ]


def test_is_the_weighted_sum_of_its_losses():
    labels, x = batch()
    weights = [1.0, 0.5, 2.0]
    total = MultipleLosses(components(), weights=weights)(labels, x.astype("float32"))
    want = sum(w * float(loss(labels, x.astype("float32")))
               for w, loss in zip(weights, components(), strict=True))
    np.testing.assert_allclose(float(total), want, rtol=1e-6)
    unweighted = MultipleLosses(components())(labels, x.astype("float32"))
    np.testing.assert_allclose(
        float(unweighted), sum(float(loss(labels, x.astype("float32"))) for loss in components()),
        rtol=1e-6)


def test_config_round_trip_keeps_the_nested_miner_and_reducer():
    loss = MultipleLosses(components(), weights=[1.0, 0.5, 2.0])
    config = loss.get_config()
    clone = MultipleLosses.from_config(config)
    assert clone.get_config() == config
    assert isinstance(clone.components[0].miner, miners.PairMarginMiner)
    assert isinstance(clone.components[0].reducer, reducers.AvgNonZeroReducer)
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    labels, x = batch(1)
    np.testing.assert_allclose(float(restored(labels, x)), float(loss(labels, x)), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"losses": []}, "losses"), ({"losses": [keras.losses.MeanSquaredError()]}, "metric loss"),
     ({"losses": [keras_dml.ContrastiveLoss()], "weights": [1.0, 2.0]}, "weights"),
     ({"losses": [keras_dml.ContrastiveLoss()], "weights": ["a"]}, "weights")],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultipleLosses(**kwargs)


def test_multi_label_only_when_every_loss_takes_it():
    both = MultipleLosses([keras_dml.ContrastiveLoss(), keras_dml.SupConLoss()])
    assert both.supports_multi_label
    mixed = MultipleLosses([keras_dml.ContrastiveLoss(), keras_dml.NCALoss()])
    assert not mixed.supports_multi_label
    labels, x = batch()
    with pytest.raises(ValueError, match="multi-hot"):
        mixed(np.eye(3, dtype="int32")[labels], x)


@requires_pml
def test_matches_pml_multiple_losses_with_miners_and_weights():
    import tensorflow as tf
    import torch
    from pytorch_metric_learning import distances, losses
    from pytorch_metric_learning import miners as pml_miners

    l2 = distances.LpDistance(normalize_embeddings=False)
    pml = losses.MultipleLosses(
        [losses.ContrastiveLoss(neg_margin=2.0, distance=l2),
         losses.TripletMarginLoss(margin=0.2, distance=l2),
         losses.MultiSimilarityLoss()],
        miners=[pml_miners.PairMarginMiner(1.0, 2.0, distance=l2), None,
                pml_miners.MultiSimilarityMiner(0.1)],
        weights=[1.0, 0.5, 2.0])
    parts = components()
    parts[2] = keras_dml.MultiSimilarityLoss(miner=miners.MultiSimilarityMiner(0.1))
    ours = MultipleLosses(parts, weights=[1.0, 0.5, 2.0], dtype="float64")
    for seed in range(3):
        labels, x = batch(seed)
        var = tf.Variable(x)
        with tf.GradientTape() as tape:
            value = ours(labels, var)
        grad = tape.gradient(value, var).numpy()
        emb = torch.tensor(x, requires_grad=True)
        want = pml(emb, torch.tensor(labels.astype("int64")))
        want.backward()
        np.testing.assert_allclose(float(value), want.item(), rtol=1e-5)
        np.testing.assert_allclose(grad, emb.grad.numpy(), rtol=1e-5, atol=1e-9)
