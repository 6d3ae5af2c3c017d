"""ProxyNCA and ProxyAnchor heads and their losses against naive loops over samples and proxies.

Backend-agnostic: runs under TensorFlow and JAX.
"""

from __future__ import annotations

import doctest
import math

import keras
import numpy as np
import pytest
from conftest import loss_gradient, mixed_precision
from keras import ops
from pml_parity import head_parity, import_pml, m_per_class_batch, requires_pml

from keras_dml.heads import ArcFace, ProxyAnchor, ProxyAnchorLoss, ProxyNCA, ProxyNCALoss, proxy
from keras_dml.layers import MetricEmbedding
from keras_dml.models import MarginModel

B, D, C = 9, 4, 5


def np_(x):
    return np.asarray(ops.convert_to_numpy(x), dtype="float64")


def unit(v):
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


def ref_cosines(x, kernel):
    return np.array(
        [[float(np.dot(unit(x[i]), unit(kernel[:, j]))) for j in range(kernel.shape[1])]
         for i in range(x.shape[0])]
    )


def ref_proxy_nca_logits(x, kernel, temperature):
    out = np.zeros((x.shape[0], kernel.shape[1]))
    for i in range(x.shape[0]):
        for j in range(kernel.shape[1]):
            out[i, j] = -float(np.sum((unit(x[i]) - unit(kernel[:, j])) ** 2)) / temperature
    return out


def ref_proxy_nca_loss(logits, labels, exclude_positive):
    total = 0.0
    for i, row in enumerate(logits):
        others = [row[j] for j in range(len(row)) if j != labels[i] or not exclude_positive]
        total += -row[labels[i]] + math.log(sum(math.exp(v) for v in others))
    return total / len(labels)


def ref_proxy_anchor_loss(cos, labels, alpha, delta):
    """The paper's formula, proxy by proxy."""
    n, classes = cos.shape
    positive_part, with_positives, negative_part = 0.0, 0, 0.0
    for p in range(classes):
        members = [i for i in range(n) if labels[i] == p]
        others = [i for i in range(n) if labels[i] != p]
        if members:
            with_positives += 1
            pulls = sum(math.exp(-alpha * (cos[i, p] - delta)) for i in members)
            positive_part += math.log(1 + pulls)
        negative_part += math.log(1 + sum(math.exp(alpha * (cos[i, p] + delta)) for i in others))
    return positive_part / max(with_positives, 1) + negative_part / classes


def built(head, rng, dim=D):
    head.build((None, dim))
    kernel = rng.normal(size=tuple(head.kernel.shape)).astype("float32")
    head.kernel.assign(kernel)
    return head, kernel.astype("float64")


def make_batch(rng, n=B, classes=C):
    return rng.normal(size=(n, D)).astype("float32"), rng.integers(0, classes, size=n)


# -- ProxyNCA ---------------------------------------------------------------------------


@pytest.mark.parametrize("exclude_positive, temperature", [(False, 1 / 9), (True, 1.0)])
def test_proxy_nca_logits_and_loss_match_reference(exclude_positive, temperature):
    rng = np.random.default_rng(0)
    x, labels = make_batch(rng)
    head = ProxyNCA(C, temperature=temperature, exclude_positive=exclude_positive)
    head, kernel = built(head, rng)
    expected = ref_proxy_nca_logits(x.astype("float64"), kernel, temperature)
    logits = head(x, labels)
    np.testing.assert_allclose(np_(logits), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np_(head(x)), expected, rtol=1e-4, atol=1e-4)  # no margin
    loss = head.default_loss() or keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    np.testing.assert_allclose(
        float(np_(loss(labels, logits))),
        ref_proxy_nca_loss(expected, labels, exclude_positive),
        rtol=1e-4,
    )


def test_proxy_nca_default_is_bounded_and_original_is_not():
    # Every sample on its own proxy, proxies orthogonal: the best the model can do.
    head = ProxyNCA(3, temperature=0.05)
    head.build((None, 3))
    head.kernel.assign(np.eye(3, dtype="float32"))
    x, labels = np.eye(3, dtype="float32"), np.arange(3)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    bounded = float(np_(ce(labels, head(x, labels))))
    original = float(np_(ProxyNCALoss()(labels, head(x, labels))))
    assert 0.0 <= bounded < 1e-6
    # Original: -0 + log(2 exp(-2 / T)) = log 2 - 2 / T, below 0 and falling with T.
    assert original == pytest.approx(math.log(2) - 2 / 0.05, rel=1e-5)
    head.temperature = 0.01
    assert float(np_(ProxyNCALoss()(labels, head(x, labels)))) < original


# -- ProxyAnchor ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_proxy_anchor_logits_and_loss_match_reference(seed):
    rng = np.random.default_rng(seed)
    x, labels = make_batch(rng)
    head, kernel = built(ProxyAnchor(C), rng)
    cos = ref_cosines(x.astype("float64"), kernel)
    logits = head(x, labels)
    expected = np.array(
        [[32.0 * (cos[i, j] + (-0.1 if j == labels[i] else 0.1)) for j in range(C)]
         for i in range(B)]
    )
    np.testing.assert_allclose(np_(logits), expected, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np_(head(x)), 32.0 * cos, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(
        float(np_(head.default_loss()(labels, logits))),
        ref_proxy_anchor_loss(cos, labels, 32.0, 0.1),
        rtol=1e-4,
    )


def test_proxy_anchor_loss_degenerate_batches():
    loss = ProxyAnchorLoss()
    # One sample; all samples of one class; logits at the extremes of ±scale.
    for labels, logits in [
        (np.array([2]), np.array([[1.0, -3.0, 0.5]], "float32")),
        (np.zeros(4, "int32"), np.full((4, 3), 40.0, "float32")),
        (np.array([0, 1]), np.array([[-40.0, 40.0], [40.0, -40.0]], "float32")),
    ]:
        cos = logits.astype("float64")  # alpha = 1, delta = 0
        value = float(np_(loss(labels, logits)))
        assert np.isfinite(value)
        assert value == pytest.approx(ref_proxy_anchor_loss(cos, labels, 1.0, 0.0), rel=1e-5)


@pytest.mark.parametrize("make_head", [lambda: ProxyNCA(2), lambda: ProxyAnchor(2)])
def test_finite_gradients_at_cos_plus_minus_one(make_head):
    head = make_head()
    head.build((None, 3))
    kernel = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], "float32")
    head.kernel.assign(kernel)
    x = np.array([[2.0, 0.0, 0.0], [-3.0, 0.0, 0.0], [0.0, 0.0, 0.0]], "float32")  # cos 1, -1, 0
    labels = np.array([0, 1, 1])
    loss = head.default_loss() or keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def of_x(v):
        return loss(labels, head(v, labels))

    def of_kernel(w):
        logits, _ = head.stateless_call([w], [], x, labels)
        return loss(labels, logits)

    for fn, value in ((of_x, x), (of_kernel, kernel)):
        total, grad = loss_gradient(fn, value)
        assert np.isfinite(total) and np.all(np.isfinite(grad)) and np.any(grad != 0)


# -- MarginModel integration ----------------------------------------------------------------


def make_backbone():
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="relu"), MetricEmbedding(D, False)]
    )


def make_data(seed=0, n=30, classes=3):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    x = (rng.normal(size=(classes, 6))[labels] * 3 + rng.normal(size=(n, 6))).astype("float32")
    return x, labels


def test_margin_model_uses_the_head_loss_and_round_trips(tmp_path):
    x, y = make_data()
    model = MarginModel(make_backbone(), ProxyAnchor(3))
    model.compile(optimizer="adam", metrics=["accuracy"], centers_optimizer=1e-1)
    assert isinstance(model.loss, ProxyAnchorLoss)
    history = model.fit(x, y, epochs=3, batch_size=30, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    embeddings = model.embed(x)
    cos = ref_cosines(embeddings.astype("float64"), np_(model.head.kernel))
    result = model.evaluate(x, y, batch_size=30, verbose=0, return_dict=True)
    assert result["loss"] == pytest.approx(ref_proxy_anchor_loss(cos, y, 32.0, 0.1), rel=1e-4)
    assert result["accuracy"] == pytest.approx(np.mean(np.argmax(cos, axis=1) == y))

    model.save(tmp_path / "proxy_anchor.keras")
    reloaded = keras.saving.load_model(tmp_path / "proxy_anchor.keras")
    assert isinstance(reloaded.loss, ProxyAnchorLoss)
    assert reloaded.head.get_config() == model.head.get_config()
    np.testing.assert_allclose(
        reloaded.evaluate(x, y, batch_size=30, verbose=0)[0], result["loss"], rtol=1e-5
    )
    with pytest.raises(ValueError, match="own loss"):
        MarginModel(make_backbone(), ProxyAnchor(3)).compile(optimizer="adam", focal_gamma=2.0)


def test_no_nan_under_mixed_float16():
    x, y = make_data(1)
    rng = np.random.default_rng(0)
    with mixed_precision("mixed_float16"):
        for head in (ProxyAnchor(3), ProxyNCA(3, exclude_positive=True)):
            model = MarginModel(make_backbone(), head)
            assert head.compute_dtype == "float32"
            model.compile(optimizer="adam")
            assert isinstance(model.loss, (ProxyAnchorLoss, ProxyNCALoss))
            history = model.fit(x * 100.0, y, epochs=1, batch_size=15, verbose=0)
            assert np.all(np.isfinite(history.history["loss"]))
            big = (rng.normal(size=(4, D)) * 300).astype("float16")
            big[0] = 0.0
            assert np.all(np.isfinite(np_(head(big, np.array([0, 1, 2, 0])))))
    assert keras.config.dtype_policy().name == "float32"


@pytest.mark.parametrize(
    "make_head",
    [
        lambda: ProxyNCA(C, temperature=0.2, exclude_positive=True),
        lambda: ProxyAnchor(C, 16.0, 0.2),
    ],
)
def test_config_round_trip_and_functional_use(make_head):
    head = make_head()
    clone = type(head).from_config(head.get_config())
    assert clone.get_config() == head.get_config()
    assert type(clone.default_loss()) is type(head.default_loss())
    train = head(keras.Input((D,)), keras.Input((), dtype="int32"))
    assert tuple(train.shape) == (None, C) and tuple(head.kernel.shape) == (D, C)
    for loss in (ProxyNCALoss(), ProxyAnchorLoss()):
        restored = keras.losses.deserialize(keras.losses.serialize(loss))
        assert type(restored) is type(loss) and restored.get_config() == loss.get_config()


def test_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        ProxyNCA(3, temperature=0.0)
    with pytest.raises(ValueError, match="scale"):
        ProxyAnchor(3, scale=-1.0)
    with pytest.raises(ValueError, match="margin"):
        ProxyAnchor(3, margin=-0.1)
    with pytest.raises(ValueError, match="labels"):
        ProxyAnchor(3)(np.ones((2, 4), "float32"), np.array([0, 3]))
    assert ArcFace(3).default_loss() is None


def test_docstring_examples():
    assert doctest.testmod(proxy).failed == 0


# ------------------------------------------------------ pytorch-metric-learning parity (TF only)


def _proxy_batch(seed, classes=5, dim=8):
    labels, x = m_per_class_batch(seed, classes=classes, per_class=4, dim=dim)
    labels[labels == classes - 1] = 0  # the last proxy has no sample in the batch
    kernel = np.random.default_rng(seed + 100).normal(size=(dim, classes))
    return labels, x + 1.5 * (kernel / np.linalg.norm(kernel, axis=0))[:, labels].T, kernel


@requires_pml
@pytest.mark.parametrize("scale, margin", [(32.0, 0.1), (16.0, 0.3)])
def test_proxy_anchor_matches_pytorch_metric_learning(scale, margin):
    # PML's ProxyAnchorLoss(alpha, margin) holds `proxies` (C, D): keras-dml's kernel
    # transposed. Positive terms are averaged over the proxies with samples, negative terms
    # over all C, in both.
    torch, pml = import_pml()
    from pytorch_metric_learning import losses

    labels, x, kernel = _proxy_batch(80)
    theirs = losses.ProxyAnchorLoss(num_classes=5, embedding_size=8, alpha=scale, margin=margin)
    head = ProxyAnchor(5, scale=scale, margin=margin)
    head_parity(head, theirs, labels, x, kernel, loss=ProxyAnchorLoss(), proxies=True)


@requires_pml
@pytest.mark.parametrize("softmax_scale", [1.0, 9.0])
def test_proxy_nca_matches_pytorch_metric_learning(softmax_scale):
    # PML's ProxyNCALoss: softmax over -softmax_scale * ||x̂ - p̂||² with the positive kept
    # (keras-dml's default, exclude_positive=False), i.e. temperature = 1 / softmax_scale.
    # Defaults differ: PML's softmax_scale=1 is T = 1; keras-dml's T = 1/9 (ProxyNCA++).
    torch, pml = import_pml()
    from pytorch_metric_learning import losses

    labels, x, kernel = _proxy_batch(81)
    theirs = losses.ProxyNCALoss(num_classes=5, embedding_size=8, softmax_scale=softmax_scale)
    head = ProxyNCA(5, temperature=1.0 / softmax_scale)
    head_parity(head, theirs, labels, x, kernel, proxies=True)
