"""InstanceLoss against a NumPy loop reference and pytorch-metric-learning 2.9."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pml_parity import (
    BATCH_IDS,
    BATCHES,
    assert_same,
    keras_value_and_grads,
    pair_value,
    pml_loss_fn,
    pml_value_and_grads,
)

from keras_dml.losses.instance import InstanceLoss, label_ranks


def ref_instance(labels, x, gamma=64.0):
    """Row i: softmax over gamma * cos(x_i, x_j), all j; target = rank of i's label; mean."""
    distinct = sorted(set(int(v) for v in labels))
    losses = []
    for i in range(len(labels)):
        logits = [gamma * pair_value(x[i], x[j], "cosine") for j in range(len(labels))]
        top = max(logits)
        log_z = top + math.log(sum(math.exp(v - top) for v in logits))
        losses.append(log_z - logits[distinct.index(int(labels[i]))])
    return sum(losses) / len(losses)


def test_label_ranks_are_torch_unique_inverse():
    labels = np.array([7, 3, 3, 9, 7, 0], "int32")
    np.testing.assert_array_equal(np.asarray(label_ranks(labels)), [2, 1, 1, 3, 2, 0])


@pytest.mark.parametrize("case", BATCHES, ids=BATCH_IDS)
@pytest.mark.parametrize("gamma", [64.0, 4.0])
def test_matches_numpy_reference(case, gamma):
    _, labels, x = case
    assert_same(float(InstanceLoss(gamma=gamma, dtype="float64")(labels, x)),
                ref_instance(labels, x, gamma))


@pytest.mark.parametrize("case", BATCHES, ids=BATCH_IDS)
@pytest.mark.parametrize("gamma", [64.0, 4.0])
def test_matches_pml_value_and_gradient(case, gamma):
    from pytorch_metric_learning import losses as pml_losses

    _, labels, x = case
    want, (want_grad,) = pml_value_and_grads(
        pml_loss_fn(pml_losses.InstanceLoss(gamma=gamma), labels), x
    )
    loss = InstanceLoss(gamma=gamma, dtype="float64")
    got, (grad,) = keras_value_and_grads(lambda v: loss(labels, v), x)
    assert_same(got, want)
    assert_same(grad, want_grad)


def test_one_instance_per_sample_targets_itself():
    x = np.random.default_rng(5).normal(size=(6, 4))
    labels = np.arange(6)
    # Each row's target is its own column, the largest cosine (1): the loss falls as gamma grows.
    low = float(InstanceLoss(gamma=1.0, dtype="float64")(labels, x))
    high = float(InstanceLoss(gamma=64.0, dtype="float64")(labels, x))
    assert high < low


def test_bad_options():
    with pytest.raises(ValueError, match="gamma"):
        InstanceLoss(gamma=0.0)
