"""Helpers of the pair-loss tests: NumPy pair measures, test batches and PML parity checks.

The NumPy side is plain float64 loops (obviously correct, slow); the PML side
runs pytorch-metric-learning 2.9 on torch with autograd. Both are compared
with the Keras loss computed in float64 (`dtype="float64"`), its gradient
taken on the active backend (`conftest.loss_gradient`).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import loss_gradient

from keras_dml.losses.base import References


def unit(v):
    v = np.asarray(v, np.float64)
    return v / max(math.sqrt(float(np.dot(v, v))), 1e-6)


def pair_value(a, b, distance):
    """One pair's measure as the loss sees it: a similarity for cosine/dot, else a distance."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if distance == "cosine":
        return min(max(float(np.dot(unit(a), unit(b))), -1.0), 1.0)
    if distance == "dot":
        return float(np.dot(a, b))
    squared = float(np.sum((a - b) ** 2))
    if distance == "squared_euclidean":
        return squared
    if distance == "euclidean":
        return math.sqrt(squared)
    raise ValueError(distance)


def pairs(labels, ref_labels=None):
    """`(positives, negatives)`: for each query, the lists of reference indices.

    Without `ref_labels` the references are the queries and a query is never
    its own positive.
    """
    same_batch = ref_labels is None
    ref_labels = labels if same_batch else ref_labels
    positives, negatives = [], []
    for i, label in enumerate(labels):
        positives.append([j for j, r in enumerate(ref_labels)
                          if r == label and not (same_batch and j == i)])
        negatives.append([j for j, r in enumerate(ref_labels) if r != label])
    return positives, negatives


def batches():
    """A few small labelled batches (B <= 16, D = 6), float64, named for the test ids."""
    rng = np.random.default_rng(19)
    out = []
    labels = rng.integers(0, 4, size=12)
    out.append(("random", labels, rng.normal(size=(12, 6))))
    labels = rng.integers(0, 3, size=12)
    out.append(("clustered", labels, 3.0 * np.eye(6)[labels] + 0.3 * rng.normal(size=(12, 6))))
    labels = np.array([0, 0, 1, 2, 3, 4, 5, 5, 6, 7])  # most anchors have no positive
    out.append(("few_positives", labels, 0.5 * rng.normal(size=(10, 6))))
    return out


BATCHES = batches()
BATCH_IDS = [name for name, _, _ in BATCHES]


def keras_value_and_grad(fn, x):
    """`(value, gradient)` of `fn(x)` on the active backend, float64."""
    value, grad = loss_gradient(fn, np.asarray(x, np.float64))
    return float(value), np.asarray(grad, np.float64)


def pml_value_and_grad(pml_loss, labels, x, ref_labels=None, ref_x=None, normalize=False):
    """`(value, d value / d x)` of a PML loss, float64 (refs are constants)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_metric_learning")
    x_t = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    inputs = torch.nn.functional.normalize(x_t) if normalize else x_t
    kwargs = {}
    if ref_x is not None:
        ref = torch.tensor(np.asarray(ref_x, np.float64))
        kwargs = dict(ref_emb=torch.nn.functional.normalize(ref) if normalize else ref,
                      ref_labels=torch.tensor(ref_labels))
    value = pml_loss(inputs, torch.tensor(labels), **kwargs)
    if not value.requires_grad:
        return value.item(), np.zeros_like(np.asarray(x, np.float64))
    value.backward()
    return value.item(), x_t.grad.numpy()


def assert_same(got, want, rtol=1e-5, atol=1e-9):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def other_references(rng, num=8, dim=6, classes=4):
    """`(labels, embeddings, References)` of samples that are not the queries."""
    labels = rng.integers(0, classes, size=num)
    x = rng.normal(size=(num, dim))
    return labels, x, References(labels.astype("int32"), x)


def numeric_gradient(f, x, eps=1e-6):
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += eps
        down[idx] -= eps
        grad[idx] = (f(up) - f(down)) / (2 * eps)
    return grad
