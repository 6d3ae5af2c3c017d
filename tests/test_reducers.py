"""Reducers against NumPy loops, and inside losses against PML 2.9's reducers."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from pml_parity import keras_value_and_grads, pml_loss_fn, pml_value_and_grads

from keras_dml import losses, reducers

torch = pytest.importorskip("torch")
pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")


def ref_reduce(kind, losses_, mask, labels=None, low=None, high=None, weights=None):
    """Loops over the selected elements."""
    losses_, mask = np.asarray(losses_, np.float64), np.asarray(mask, bool)
    if kind == "per_anchor" and losses_.ndim == 1:
        kind = "mean"  # already one value per anchor: the inner reducer's mean over the mask
    if kind == "per_anchor":
        per_anchor = []
        for row, keep in zip(losses_.reshape(len(losses_), -1), mask.reshape(len(mask), -1),
                             strict=True):
            chosen = [v for v, k in zip(row, keep, strict=True) if k]
            per_anchor.append(sum(chosen) / len(chosen) if chosen else 0.0)
        return sum(per_anchor) / len(per_anchor)
    chosen = []
    for idx in np.ndindex(*losses_.shape):
        if not mask[idx]:
            continue
        value = losses_[idx]
        if kind == "threshold" and not (
            (low is None or value > low) and (high is None or value < high)
        ):
            continue
        if kind == "avg_non_zero" and not value > 0:
            continue
        if kind == "class_weighted":
            value = value * weights[labels[idx[0]]]
        chosen.append(value)
    return sum(chosen) / len(chosen) if chosen else 0.0


def random_case(seed, shape):
    rng = np.random.default_rng(seed)
    values = np.maximum(rng.normal(size=shape), 0.0)  # about half are exactly 0
    mask = rng.random(shape) < 0.7
    labels = rng.integers(0, 3, size=shape[0])
    return values.astype("float32"), mask, labels


@pytest.mark.parametrize("shape", [(6,), (5, 7), (4, 5, 5)])
def test_reducers_match_loops(shape):
    for seed in range(3):
        values, mask, labels = random_case(seed, shape)
        cases = [
            (reducers.MeanReducer(), {"kind": "mean"}),
            (reducers.AvgNonZeroReducer(), {"kind": "avg_non_zero"}),
            (reducers.ThresholdReducer(low=0.2, high=1.0),
             {"kind": "threshold", "low": 0.2, "high": 1.0}),
            (reducers.ThresholdReducer(high=0.5), {"kind": "threshold", "high": 0.5}),
            (reducers.PerAnchorReducer(), {"kind": "per_anchor"}),
            (reducers.ClassWeightedReducer([0.5, 2.0, 1.0]),
             {"kind": "class_weighted", "weights": [0.5, 2.0, 1.0]}),
        ]
        for reducer, ref in cases:
            got = float(reducer(values, mask, labels))
            np.testing.assert_allclose(got, ref_reduce(losses_=values, mask=mask, labels=labels,
                                                       **ref), rtol=1e-6, atol=1e-7)


def test_nothing_selected_gives_zero():
    values = np.zeros((3, 4), "float32")
    for reducer in (reducers.MeanReducer(), reducers.AvgNonZeroReducer(),
                    reducers.PerAnchorReducer(), reducers.ThresholdReducer(low=1.0)):
        assert float(reducer(values, np.zeros((3, 4), bool))) == 0.0


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="low"):
        reducers.ThresholdReducer()
    with pytest.raises(ValueError, match="weights"):
        reducers.ClassWeightedReducer([1.0, -1.0])
    with pytest.raises(ValueError, match="weights"):
        reducers.ClassWeightedReducer("abc")
    with pytest.raises(ValueError, match="labels"):
        reducers.ClassWeightedReducer([1.0])(np.ones(2, "float32"))
    with pytest.raises(ValueError, match="reducer"):
        reducers.get("mean")


ALL_REDUCERS = [
    reducers.MeanReducer(),
    reducers.AvgNonZeroReducer(),
    reducers.ThresholdReducer(low=0.1, high=2.0),
    reducers.PerAnchorReducer(reducers.AvgNonZeroReducer()),
    reducers.ClassWeightedReducer([1.0, 2.0]),
]


@pytest.mark.parametrize("reducer", ALL_REDUCERS, ids=lambda r: type(r).__name__)
def test_config_round_trip(reducer):
    config = reducer.get_config()
    assert type(reducer).from_config(config).get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(reducer))
    assert type(restored) is type(reducer) and restored.get_config() == config


# -- parity with PML inside losses ------------------------------------------------------


def batch(seed=0, n=12, dim=5, classes=3):
    rng = np.random.default_rng(seed)
    return rng.integers(0, classes, size=n).astype("int32"), rng.normal(size=(n, dim))


def value_and_grad(loss, labels, x):
    """`loss`, computed in float64, and its gradient w.r.t. `x` (TF)."""
    loss = type(loss).from_config({**loss.get_config(), "dtype": "float64"})
    value, (grad,) = keras_value_and_grads(lambda v: loss(labels, v), x)
    return value, grad


def pml_value_and_grad(loss, labels, x):
    value, (grad,) = pml_value_and_grads(pml_loss_fn(loss, labels.astype("int64")), x)
    return value, grad


def pml_reducer(reducer):
    name = type(reducer).__name__
    if name == "ClassWeightedReducer":
        return pml_reducers.ClassWeightedReducer(torch.tensor(reducer.weights, dtype=torch.float64))
    if name == "ThresholdReducer":
        return pml_reducers.ThresholdReducer(low=reducer.low, high=reducer.high)
    if name == "PerAnchorReducer":
        return pml_reducers.PerAnchorReducer(pml_reducer(reducer.reducer))
    return getattr(pml_reducers, name)()


PAIR_REDUCERS = [
    reducers.MeanReducer(),
    reducers.AvgNonZeroReducer(),
    reducers.ThresholdReducer(low=0.1, high=1.5),
    reducers.ThresholdReducer(high=0.8),
    reducers.PerAnchorReducer(),
    reducers.PerAnchorReducer(reducers.AvgNonZeroReducer()),
    reducers.ClassWeightedReducer([0.5, 2.0, 1.5]),
]


def assert_same_as_pml(ours, theirs):
    """Value and gradient of `ours` equal PML's `theirs` on three seeded batches."""
    for seed in range(3):
        labels, x = batch(seed)
        value, grad = value_and_grad(ours, labels, x)
        want, want_grad = pml_value_and_grad(theirs, labels, x)
        np.testing.assert_allclose(value, want, rtol=1e-6)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-12)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="PML parity runs under TF")
@pytest.mark.parametrize("reducer", PAIR_REDUCERS, ids=lambda r: repr(r)[:40])
def test_contrastive_loss_reducers_match_pml(reducer):
    ours = losses.ContrastiveLoss(pos_margin=0.5, neg_margin=2.5, reducer=reducer)
    theirs = pml_losses.ContrastiveLoss(
        pos_margin=0.5, neg_margin=2.5, reducer=pml_reducer(reducer),
        distance=pml_distances.LpDistance(normalize_embeddings=False),
    )
    assert_same_as_pml(ours, theirs)


TRIPLET_REDUCERS = [
    reducers.MeanReducer(),
    reducers.AvgNonZeroReducer(),
    reducers.ThresholdReducer(low=0.2, high=1.0),
    reducers.ClassWeightedReducer([0.5, 2.0, 1.5]),
]


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="PML parity runs under TF")
@pytest.mark.parametrize("reducer", TRIPLET_REDUCERS, ids=lambda r: repr(r)[:40])
def test_batch_all_triplet_loss_reducers_match_pml(reducer):
    ours = losses.TripletLoss(margin=0.5, negative_mining="all", reducer=reducer)
    theirs = pml_losses.TripletMarginLoss(
        margin=0.5, reducer=pml_reducer(reducer),
        distance=pml_distances.LpDistance(normalize_embeddings=False),
    )
    assert_same_as_pml(ours, theirs)


def test_per_anchor_reducer_on_triplets_extends_pml():
    # PML's PerAnchorReducer refuses triplets; here each anchor averages its (p, n) terms.
    labels, x = batch(4)
    loss = losses.TripletLoss(margin=0.5, negative_mining="all",
                              reducer=reducers.PerAnchorReducer())
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    per_anchor = []
    for a in range(len(labels)):
        terms = [max(d[a, p] - d[a, n] + 0.5, 0.0)
                 for p in range(len(labels)) for n in range(len(labels))
                 if p != a and labels[p] == labels[a] and labels[n] != labels[a]]
        per_anchor.append(sum(terms) / len(terms) if terms else 0.0)
    np.testing.assert_allclose(value_and_grad(loss, labels, x)[0], np.mean(per_anchor), rtol=1e-9)


def test_semi_hard_triplet_loss_with_a_reducer_reduces_per_positive_pair():
    labels, x = batch(5)
    plain = float(losses.TripletLoss(margin=0.5)(labels, x))
    non_zero = float(losses.TripletLoss(margin=0.5, reducer=reducers.AvgNonZeroReducer())(
        labels, x))
    assert non_zero >= plain > 0
