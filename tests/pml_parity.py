"""Helpers of the pytorch-metric-learning (PML) parity tests and the pair-loss tests.

PML is the reference: the same embeddings, labels and hyperparameters must give
the same value and the same gradient with respect to the embeddings (and the
class weights of the heads). PML runs on torch, which does not depend on the
Keras backend, so these tests run once, under TensorFlow (`requires_pml` where
their file is also run under JAX and torch).

One family of helpers takes values and gradients: `keras_value_and_grads`
(TensorFlow, float64) and `pml_value_and_grads` (torch, float64), each
`(value, [gradient per array])`, compared by `assert_parity` or
`assert_same`; `pml_loss_fn` turns a PML loss object and labels (and
constant references) into the torch function it takes. The pair-loss helpers
add NumPy pair measures in plain float64 loops (obviously correct, slow) and
test batches; `head_parity` serves the heads.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from keras_dml.losses.base import References

requires_pml = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="PML parity compares with torch, independent of the Keras backend: run once, on TF",
)


def import_pml():
    """`(torch, pytorch_metric_learning)`, skipping the test when either is missing."""
    torch = pytest.importorskip("torch")
    pml = pytest.importorskip("pytorch_metric_learning")
    return torch, pml


def m_per_class_batch(seed: int, classes: int = 6, per_class: int = 4, dim: int = 8,
                      normalize: bool = False, scale: float = 1.0):
    """Shuffled labels with `per_class` samples of each class and float64 embeddings."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(classes), per_class))
    x = scale * rng.normal(size=(labels.size, dim))
    if normalize:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return labels.astype("int64"), x


def pml_value_and_grads(fn, *arrays):
    """`(value, [d value / d array, ...])` of a torch function of float64 tensors.

    A gradient is zeros where the value does not depend on that array (or on
    none: a PML loss that returns a constant 0 for a batch without pairs).
    """
    torch = pytest.importorskip("torch")

    tensors = [torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in arrays]
    value = fn(*tensors)
    if value.requires_grad:
        value.backward()
    return value.item(), [t.grad.numpy() if t.grad is not None else np.zeros(t.shape)
                          for t in tensors]


def pml_loss_fn(pml_loss, labels, ref_labels=None, ref_x=None, normalize=False):
    """`x -> pml_loss(x, labels[, ref_emb, ref_labels])` as a torch function of `x`.

    With `normalize=True` the embeddings (and the constant references) are
    L2-normalised first.
    """
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_metric_learning")
    kwargs = {}
    if ref_x is not None:
        ref = torch.tensor(np.asarray(ref_x, np.float64))
        kwargs = dict(ref_emb=torch.nn.functional.normalize(ref) if normalize else ref,
                      ref_labels=torch.tensor(ref_labels))

    def fn(x):
        inputs = torch.nn.functional.normalize(x) if normalize else x
        return pml_loss(inputs, torch.tensor(labels), **kwargs)

    return fn


def keras_value_and_grads(fn, *arrays, dtype: str = "float64"):
    """`(value, [d value / d array, ...])` of a Keras function of TF variables (TF only)."""
    import tensorflow as tf

    variables = [tf.Variable(np.asarray(a, dtype)) for a in arrays]
    with tf.GradientTape() as tape:
        value = fn(*variables)
    grads = tape.gradient(value, variables)
    return float(value), [np.zeros(v.shape, dtype) if g is None else
                          tf.convert_to_tensor(g).numpy() for g, v in zip(grads, variables,
                                                                           strict=True)]


def assert_parity(ours, theirs, rtol: float = 1e-5, grad_atol: float = 1e-9):
    """Value to `rtol`, each gradient to `rtol` (plus `grad_atol` for entries near 0)."""
    (value, grads), (want_value, want_grads) = ours, theirs
    np.testing.assert_allclose(value, want_value, rtol=rtol, err_msg="value")
    for i, (g, w) in enumerate(zip(grads, want_grads, strict=True)):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=grad_atol, err_msg=f"gradient {i}")


def head_parity(head, pml_loss, labels, x, kernel, loss=None, proxies: bool = False,
                rtol: float = 1e-5, grad_rtol: float = 1e-4, grad_atol: float = 1e-7):
    """Checks a keras-dml head + loss against a PML loss that holds the class weights.

    keras-dml's heads compute in float32, so the head runs in float32 on float32-rounded
    inputs and PML in float64 on the same rounded numbers: values agree to `rtol`, the
    gradients w.r.t. embeddings and class weights to `grad_rtol` (+ `grad_atol`).

    Args:
        head: an unbuilt keras-dml head; its `kernel` becomes `kernel`.
        pml_loss: the PML loss; its `W` (`fc` for SoftTripleLoss; with `proxies=True`, its
            `(C, D)` `proxies`, the transposed kernel) becomes `kernel`.
        labels: `(B,)` int labels.
        x: `(B, D)` embeddings.
        kernel: `(D, C * K)` class weights, class-major like keras-dml's kernel.
        loss: the Keras loss on `(labels, head logits)`; softmax cross-entropy by default.
    """
    import tensorflow as tf
    import torch

    x = np.asarray(x, "float32")
    kernel = np.asarray(kernel, "float32")
    head.build((None, x.shape[1]))
    head.kernel.assign(kernel)
    loss = loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x_var = tf.Variable(x)
    with tf.GradientTape() as tape:
        value = loss(labels, head(x_var, labels, training=True))
    grad_x, grad_kernel = tape.gradient(value, [x_var, head.kernel])

    weights = torch.tensor(kernel.T if proxies else kernel, dtype=torch.float64)
    parameter = pml_loss.proxies if proxies else getattr(pml_loss, "W", None)
    parameter = pml_loss.fc if parameter is None else parameter  # SoftTripleLoss
    parameter.data = weights
    x_torch = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    want = pml_loss(x_torch, torch.tensor(np.asarray(labels, "int64")))
    want.backward()
    want_kernel = parameter.grad.numpy()
    np.testing.assert_allclose(float(value), want.item(), rtol=rtol, err_msg="value")
    np.testing.assert_allclose(grad_x.numpy(), x_torch.grad.numpy(), rtol=grad_rtol,
                               atol=grad_atol, err_msg="gradient w.r.t. embeddings")
    np.testing.assert_allclose(tf.convert_to_tensor(grad_kernel).numpy(),
                               want_kernel.T if proxies else want_kernel, rtol=grad_rtol,
                               atol=grad_atol, err_msg="gradient w.r.t. class weights")


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
