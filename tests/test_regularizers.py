"""Regularizers against NumPy loops and pytorch-metric-learning 2.9 (value and gradient)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_dml import losses, reducers, regularizers
from keras_dml.heads import ArcFace, SoftTriple

torch = pytest.importorskip("torch")
pml_regularizers = pytest.importorskip("pytorch_metric_learning.regularizers")
pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")

on_tf = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="PML parity runs under the TF backend"
)


def embeddings(seed=0, n=10, dim=4):
    return np.random.default_rng(seed).normal(size=(n, dim))


def ref_lp(x, p, power):
    return np.mean([sum(abs(v) ** p for v in row) ** (power / p) for row in x])


def ref_zero_mean(x):
    return np.mean([abs(sum(row)) for row in x])


def ref_spherical(x):
    norms = [np.sqrt(sum(v * v for v in row)) for row in x]
    mu = sum(norms) / len(norms)
    return sum((n - mu) ** 2 for n in norms) / len(norms)


def ref_regular_face(kernel):
    centers = kernel.T / np.linalg.norm(kernel.T, axis=1, keepdims=True)
    n = len(centers)
    return np.mean([max(float(centers[i] @ centers[j]) for j in range(n) if j != i)
                    for i in range(n)])


def ref_center_invariant(kernel):
    squared = [float(c @ c) for c in kernel.T]
    mean = sum(squared) / len(squared)
    return sum((s - mean) ** 2 / 4 for s in squared) / len(squared)


def ref_sparse_centers(kernel, num_classes, k):
    centers = kernel.T / np.linalg.norm(kernel.T, axis=1, keepdims=True)
    total, pairs = 0.0, 0
    for c in range(num_classes):
        for s in range(c * k, c * k + k):
            for t in range(s + 1, c * k + k):
                total += np.sqrt(max(2.0 - min(2.0 * float(centers[s] @ centers[t]), 2.0), 0.0))
                pairs += 1
    return total / (2 * pairs)


@pytest.mark.parametrize("p, power", [(2, 1), (2, 2), (1, 1), (3, 0.5)])
def test_lp_regularizer_matches_reference(p, power):
    x = embeddings()
    got = float(regularizers.LpRegularizer(p=p, power=power)(x))
    np.testing.assert_allclose(got, ref_lp(x, p, power), rtol=1e-5)


def test_embedding_regularizers_match_references():
    x = embeddings(1)
    np.testing.assert_allclose(float(regularizers.ZeroMeanRegularizer()(x)), ref_zero_mean(x),
                               rtol=1e-5)
    np.testing.assert_allclose(
        float(regularizers.SphericalEmbeddingRegularizer(weight=2.0)(x)), 2 * ref_spherical(x),
        rtol=1e-5,
    )


def test_centre_regularizers_match_references():
    kernel = embeddings(2, n=4, dim=6)  # (D, 6 centres)
    np.testing.assert_allclose(float(regularizers.RegularFaceRegularizer()(kernel)),
                               ref_regular_face(kernel), rtol=1e-5)
    np.testing.assert_allclose(float(regularizers.CenterInvariantRegularizer()(kernel)),
                               ref_center_invariant(kernel), rtol=1e-5)
    np.testing.assert_allclose(float(regularizers.SparseCentersRegularizer(2, 3)(kernel)),
                               ref_sparse_centers(kernel, 2, 3), rtol=1e-5)
    np.testing.assert_allclose(float(regularizers.SparseCentersRegularizer(3, 2)(kernel)),
                               ref_sparse_centers(kernel, 3, 2), rtol=1e-5)


def tf_value_and_grad(fn, x):
    import tensorflow as tf

    var = tf.Variable(x)
    with tf.GradientTape() as tape:
        value = fn(var)
    return float(value), tape.gradient(value, var).numpy()


def torch_value_and_grad(fn, x):
    var = torch.tensor(x, requires_grad=True)
    value = fn(var)
    value.backward()
    return float(value.detach()), var.grad.numpy()


@on_tf
@pytest.mark.parametrize(
    "ours, theirs, on_kernel",
    [
        (regularizers.LpRegularizer(), lambda: pml_regularizers.LpRegularizer(), False),
        (regularizers.LpRegularizer(p=1, power=2),
         lambda: pml_regularizers.LpRegularizer(p=1, power=2), False),
        (regularizers.ZeroMeanRegularizer(), lambda: pml_regularizers.ZeroMeanRegularizer(), False),
        (regularizers.RegularFaceRegularizer(),
         lambda: pml_regularizers.RegularFaceRegularizer(), True),
        (regularizers.CenterInvariantRegularizer(),
         lambda: pml_regularizers.CenterInvariantRegularizer(), True),
        (regularizers.SparseCentersRegularizer(2, 3),
         lambda: pml_regularizers.SparseCentersRegularizer(2, 3), True),
    ],
    ids=["lp", "lp-1-2", "zero-mean", "regular-face", "center-invariant", "sparse-centers"],
)
def test_regularizers_match_pml(ours, theirs, on_kernel):
    theirs = theirs()
    for seed in range(3):
        x = embeddings(seed, n=6, dim=5)  # as a kernel: 5-dim, 6 centres (columns)
        value, grad = tf_value_and_grad(ours, x.T if on_kernel else x)
        # PML takes the centres as rows.
        want, want_grad = torch_value_and_grad(theirs, x)
        np.testing.assert_allclose(value, want, rtol=1e-6)
        np.testing.assert_allclose(grad.T if on_kernel else grad, want_grad, rtol=1e-6,
                                   atol=1e-12)


@on_tf
def test_embedding_regularizer_in_a_loss_matches_pml():
    ours = losses.ContrastiveLoss(
        neg_margin=2.0, reducer=reducers.AvgNonZeroReducer(),
        embedding_regularizer=regularizers.LpRegularizer(weight=0.3), dtype="float64",
    )
    theirs = pml_losses.ContrastiveLoss(
        neg_margin=2.0, distance=pml_distances.LpDistance(normalize_embeddings=False),
        embedding_regularizer=pml_regularizers.LpRegularizer(), embedding_reg_weight=0.3,
    )
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, size=10)
    x = rng.normal(size=(10, 4))
    value, grad = tf_value_and_grad(lambda v: ours(labels, v), x)
    want, want_grad = torch_value_and_grad(lambda v: theirs(v, torch.tensor(labels)), x)
    np.testing.assert_allclose(value, want, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-12)


def test_every_loss_with_embedding_regularizer_adds_it():
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(4), 2)
    x = rng.normal(size=(8, 4)).astype("float32")
    reg = regularizers.ZeroMeanRegularizer(weight=0.5)
    for cls in (losses.TripletLoss, losses.ContrastiveLoss, losses.MultiSimilarityLoss,
                losses.CircleLoss):
        plain = float(cls()(labels, x))
        with_reg = float(cls(embedding_regularizer=reg)(labels, x))
        np.testing.assert_allclose(with_reg, plain + 0.5 * ref_zero_mean(x), rtol=1e-5)


def test_kernel_regularizer_on_heads_adds_a_model_loss_and_round_trips(tmp_path):
    head = ArcFace(num_classes=5, kernel_regularizer=regularizers.RegularFaceRegularizer(0.5))
    head(np.ones((2, 4), "float32"), np.array([0, 1]))
    kernel = keras.ops.convert_to_numpy(head.kernel)
    np.testing.assert_allclose(float(head.losses[0]), 0.5 * ref_regular_face(kernel), rtol=1e-5)
    clone = ArcFace.from_config(head.get_config())
    assert clone.get_config() == head.get_config()
    assert isinstance(clone.kernel_regularizer, regularizers.RegularFaceRegularizer)
    soft = SoftTriple(num_classes=3, centers_per_class=2,
                      kernel_regularizer=regularizers.SparseCentersRegularizer(3, 2))
    soft(np.ones((2, 4), "float32"), np.array([0, 1]))
    kernel = keras.ops.convert_to_numpy(soft.kernel)
    values = [float(v) for v in soft.losses]
    assert any(np.isclose(v, ref_sparse_centers(kernel, 3, 2), rtol=1e-5) for v in values)


ALL_REGULARIZERS = [
    regularizers.LpRegularizer(p=1, power=2, weight=0.1),
    regularizers.ZeroMeanRegularizer(0.2),
    regularizers.SphericalEmbeddingRegularizer(0.3),
    regularizers.RegularFaceRegularizer(),
    regularizers.CenterInvariantRegularizer(0.4),
    regularizers.SparseCentersRegularizer(3, 2),
]


@pytest.mark.parametrize("reg", ALL_REGULARIZERS, ids=lambda r: type(r).__name__)
def test_config_round_trip_and_gradient_finite(reg):
    config = reg.get_config()
    assert type(reg).from_config(config).get_config() == config
    restored = keras.regularizers.deserialize(keras.regularizers.serialize(reg))
    assert type(restored) is type(reg) and restored.get_config() == config
    x = embeddings(5, n=4, dim=6).astype("float32")
    assert np.isfinite(float(reg(x)))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="centers_per_class"):
        regularizers.SparseCentersRegularizer(3, 1)
    with pytest.raises(ValueError, match="weight"):
        regularizers.LpRegularizer(weight=-1.0)
    with pytest.raises(ValueError, match="rank-2"):
        regularizers.LpRegularizer()(np.ones(3, "float32"))
    with pytest.raises(ValueError, match="expected"):
        regularizers.SparseCentersRegularizer(3, 2)(np.ones((4, 5), "float32"))
    with pytest.raises(ValueError, match="embedding_regularizer"):
        losses.TripletLoss(embedding_regularizer="l2")
