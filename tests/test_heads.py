"""Margin heads against naive NumPy references (loops), gradients and mixed precision.

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

from keras_dml import heads
from keras_dml.heads import (
    AdaCos,
    ArcFace,
    CosFace,
    SoftTriple,
    SubCenterArcFace,
    dynamic_margins,
)

B, D, C = 7, 5, 4


# -- naive references (float64, explicit loops) -------------------------------------


def unit(v):
    return v / np.linalg.norm(v)


def ref_cosines(x, kernel):
    """cos between sample i and centre column j, by loops."""
    out = np.zeros((x.shape[0], kernel.shape[1]))
    for i in range(x.shape[0]):
        for j in range(kernel.shape[1]):
            out[i, j] = np.dot(unit(x[i]), unit(kernel[:, j]))
    return np.clip(out, -1.0, 1.0)


def ref_cross_entropy(logits, labels):
    total = 0.0
    for i in range(logits.shape[0]):
        row = logits[i]
        top = row.max()
        total += top + math.log(sum(math.exp(v - top) for v in row)) - row[labels[i]]
    return total / logits.shape[0]


def ref_cosface(x, kernel, labels, scale, margins):
    cos = ref_cosines(x, kernel)
    logits = np.zeros_like(cos)
    for i in range(cos.shape[0]):
        for j in range(cos.shape[1]):
            logits[i, j] = scale * (cos[i, j] - (margins[j] if j == labels[i] else 0.0))
    return logits


def ref_arcface_target(cos, m, easy_margin):
    theta = math.acos(cos)
    if easy_margin:
        return math.cos(theta + m) if cos > 0 else cos
    if theta + m <= math.pi:
        return math.cos(theta + m)
    return cos - m * math.sin(m)


def ref_arcface(x, kernel, labels, scale, margins, easy_margin=False, k=1):
    cos_centres = ref_cosines(x, kernel)
    n_classes = kernel.shape[1] // k
    logits = np.zeros((x.shape[0], n_classes))
    for i in range(x.shape[0]):
        for c in range(n_classes):
            cos = max(cos_centres[i, c * k + kk] for kk in range(k))
            if c == labels[i]:
                cos = ref_arcface_target(cos, margins[c], easy_margin)
            logits[i, c] = scale * cos
    return logits


def ref_softtriple(x, kernel, labels, k, la, gamma, margin):
    cos = ref_cosines(x, kernel)
    n_classes = kernel.shape[1] // k
    logits = np.zeros((x.shape[0], n_classes))
    for i in range(x.shape[0]):
        for c in range(n_classes):
            sims = [cos[i, c * k + kk] for kk in range(k)]
            weights = [math.exp(s / gamma) for s in sims]
            total = sum(weights)
            s_ic = sum(w / total * s for w, s in zip(weights, sims, strict=True))
            logits[i, c] = la * (s_ic - (margin if labels is not None and c == labels[i] else 0.0))
    return logits


def ref_softtriple_regularizer(kernel, n_classes, k, tau):
    total = 0.0
    for c in range(n_classes):
        for t in range(k):
            for s in range(t + 1, k):
                wt, ws = unit(kernel[:, c * k + t]), unit(kernel[:, c * k + s])
                total += math.sqrt(2.0 + 1e-5 - 2.0 * np.dot(wt, ws))
    return tau * total / (n_classes * k * (k - 1))


# -- helpers ----------------------------------------------------------------------


def make_data(rng, batch=B, dim=D, classes=C):
    x = rng.normal(size=(batch, dim)).astype("float32")
    labels = rng.integers(0, classes, size=batch)
    return x, labels


def built_head(head, rng, dim=D):
    head.build((None, dim))
    kernel = rng.normal(size=tuple(head.kernel.shape)).astype("float32")
    head.kernel.assign(kernel)
    return head, kernel.astype("float64")


def np_(x):
    return np.asarray(ops.convert_to_numpy(x), dtype="float64")


def sparse_ce(labels, logits):
    return ops.mean(
        keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    )


def mean_ce(labels, logits) -> float:
    """`sparse_ce` as a Python float (detached from any autograd graph)."""
    return float(np_(sparse_ce(labels, logits)))


# -- CosFace ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_cosface_matches_reference(seed):
    rng = np.random.default_rng(seed)
    x, labels = make_data(rng)
    head, kernel = built_head(CosFace(C), rng)
    logits = np_(head(x, labels))
    expected = ref_cosface(x.astype("float64"), kernel, labels, 64.0, [0.35] * C)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(
        mean_ce(labels, head(x, labels)), ref_cross_entropy(expected, labels), rtol=1e-4
    )


def test_inference_logits_have_no_margin():
    rng = np.random.default_rng(3)
    x, labels = make_data(rng)
    for head in (CosFace(C, scale=10.0), ArcFace(C, scale=10.0), SubCenterArcFace(C, scale=10.0)):
        head, kernel = built_head(head, rng)
        k = head.centers_per_class
        expected = ref_arcface(x.astype("float64"), kernel, labels, 10.0, [0.0] * C, k=k)
        np.testing.assert_allclose(np_(head(x)), expected, rtol=1e-4, atol=1e-4)


def test_margin_only_on_target_logit():
    rng = np.random.default_rng(4)
    x, labels = make_data(rng)
    for head in (CosFace(C), ArcFace(C), SubCenterArcFace(C), SoftTriple(C, centers_per_class=3)):
        head, _ = built_head(head, rng)
        diff = np_(head(x, labels)) - np_(head(x))
        off_target = np.ones_like(diff, dtype=bool)
        off_target[np.arange(B), labels] = False
        assert np.all(diff[off_target] == 0.0), type(head).__name__
        assert np.all(diff[~off_target] < 0.0), type(head).__name__


# -- ArcFace / Sub-center ArcFace ---------------------------------------------------


@pytest.mark.parametrize("easy_margin", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_arcface_matches_reference(seed, easy_margin):
    rng = np.random.default_rng(seed)
    x, labels = make_data(rng, batch=16)
    head, kernel = built_head(ArcFace(C, easy_margin=easy_margin), rng)
    logits = np_(head(x, labels))
    expected = ref_arcface(x.astype("float64"), kernel, labels, 64.0, [0.5] * C, easy_margin)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=2e-3)
    np.testing.assert_allclose(
        mean_ce(labels, head(x, labels)), ref_cross_entropy(expected, labels), rtol=1e-4
    )


def test_arcface_fallback_branch_is_exercised():
    # Put targets on both sides of θ + m = π to cover the insightface fallback.
    m = 0.5
    kernel = np.array([[1.0, 0.0], [0.0, 1.0]], "float32")
    angles = np.array([0.3, 2.0, math.pi - m - 0.1, math.pi - m + 0.1, math.pi - 0.01])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype("float32")
    labels = np.zeros(len(angles), "int64")
    head = ArcFace(2, margin=m)
    head.build((None, 2))
    head.kernel.assign(kernel)
    got = np_(head(x, labels))[:, 0] / 64.0
    expected = [ref_arcface_target(math.cos(a), m, False) for a in angles]
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert got[3] < math.cos(math.pi - m + 0.1)  # fallback still penalises the target


@pytest.mark.parametrize("seed", [0, 1])
def test_subcenter_arcface_matches_reference(seed):
    rng = np.random.default_rng(seed)
    x, labels = make_data(rng, batch=12)
    head, kernel = built_head(SubCenterArcFace(C, centers_per_class=3, scale=32.0), rng)
    assert tuple(head.kernel.shape) == (D, C * 3)
    expected = ref_arcface(x.astype("float64"), kernel, labels, 32.0, [0.5] * C, k=3)
    np.testing.assert_allclose(np_(head(x, labels)), expected, rtol=1e-4, atol=2e-3)


def test_kernel_columns_are_class_major():
    # Column c*K + k is centre k of class c: put x on centre 1 of class 2.
    head = SubCenterArcFace(3, centers_per_class=2, scale=1.0)
    head.build((None, 6))
    head.kernel.assign(np.eye(6, dtype="float32"))
    logits = np_(head(np.eye(6, dtype="float32")[[2 * 2 + 1]]))
    np.testing.assert_allclose(logits, [[0.0, 0.0, 1.0]], atol=1e-6)


def arcface_loss_fn(head, labels):
    return lambda x: sparse_ce(labels, head(x, labels))


def test_arcface_gradient_near_theta_plus_m_equals_pi():
    """Finite differences of the float64 reference vs the head's gradient, both sides of π."""
    m, s = 0.5, 64.0
    kernel = np.array([[1.0, 0.0, -0.6], [0.0, 1.0, 0.8]], "float32")
    head = ArcFace(3, scale=s, margin=m)
    head.build((None, 2))
    head.kernel.assign(kernel)
    labels = np.zeros(2, "int64")
    for delta in (-0.05, -0.01, 0.01, 0.05):
        theta = math.pi - m + delta
        x = np.array([[math.cos(theta), math.sin(theta)], [0.9, 0.3]], "float32")

        def ref_loss(x64):
            ref = ref_arcface(x64, kernel.astype("float64"), labels, s, [m] * 3)
            return ref_cross_entropy(ref, labels)

        _, grad = loss_gradient(arcface_loss_fn(head, labels), x)
        numeric = np.zeros_like(x, dtype="float64")
        h = 1e-5
        for i in range(x.shape[0]):
            for j in range(x.shape[1]):
                up, down = x.astype("float64"), x.astype("float64")
                up[i, j] += h
                down[i, j] -= h
                numeric[i, j] = (ref_loss(up) - ref_loss(down)) / (2 * h)
        assert np.all(np.isfinite(grad))
        np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-3, err_msg=f"delta={delta}")


@pytest.mark.parametrize("head_cls", [ArcFace, SubCenterArcFace, CosFace])
def test_finite_gradients_at_cos_plus_minus_one(head_cls):
    head = head_cls(2, scale=64.0)
    head.build((None, 3))
    k = head.centers_per_class
    kernel = np.zeros((3, 2 * k), "float32")
    kernel[0, :k] = 1.0  # class 0 along +e0
    kernel[1, k:] = 1.0  # class 1 along +e1
    head.kernel.assign(kernel)
    x = np.array([[2.0, 0.0, 0.0], [-3.0, 0.0, 0.0], [0.0, 1.0, 0.0]], "float32")
    labels = np.array([0, 0, 0])  # cos θ_y = 1, -1 and 0
    value, grad = loss_gradient(arcface_loss_fn(head, labels), x)
    assert np.isfinite(value) and np.all(np.isfinite(grad))

    def loss_of_kernel(w):
        logits, _ = head.stateless_call([w], [], x, labels)
        return sparse_ce(labels, logits)

    value, grad = loss_gradient(loss_of_kernel, kernel)
    assert np.isfinite(value) and np.all(np.isfinite(grad))


# -- dynamic margins ----------------------------------------------------------------


def test_dynamic_margins_formula_and_range():
    counts = np.array([500, 50, 5, 1, 50])
    margins = np.array(dynamic_margins(counts, margin_min=0.05, margin_max=0.5, power=0.25))
    inverse = counts ** -0.25
    a = (0.5 - 0.05) / (inverse.max() - inverse.min())
    b = 0.5 - a * inverse.max()
    np.testing.assert_allclose(margins, a * inverse + b, atol=1e-12)
    assert margins.min() == pytest.approx(0.05) and margins.max() == pytest.approx(0.5)
    assert margins[0] < margins[1] < margins[2] < margins[3]
    assert dynamic_margins([3, 3, 3], 0.1, 0.4) == [0.4, 0.4, 0.4]


@pytest.mark.parametrize("head_cls", [ArcFace, CosFace])
def test_per_class_margins_match_reference(head_cls):
    rng = np.random.default_rng(5)
    x, labels = make_data(rng, batch=16)
    margins = dynamic_margins([100, 30, 10, 2])
    head, kernel = built_head(head_cls(C, scale=30.0, margin=margins), rng)
    if head_cls is ArcFace:
        expected = ref_arcface(x.astype("float64"), kernel, labels, 30.0, margins)
    else:
        expected = ref_cosface(x.astype("float64"), kernel, labels, 30.0, margins)
    np.testing.assert_allclose(np_(head(x, labels)), expected, rtol=1e-4, atol=2e-3)
    clone = head_cls.from_config(head.get_config())
    assert clone.margin == pytest.approx(margins)


# -- AdaCos -------------------------------------------------------------------------


def ref_adacos_scale(cos, labels, scale):
    b_total = 0.0
    for i in range(cos.shape[0]):
        for j in range(cos.shape[1]):
            if j != labels[i]:
                b_total += math.exp(scale * cos[i, j])
    b_avg = b_total / cos.shape[0]
    theta_med = np.median([math.acos(cos[i, labels[i]]) for i in range(cos.shape[0])])
    return math.log(b_avg) / math.cos(min(math.pi / 4, theta_med))


def test_adacos_fixed_scale():
    assert AdaCos(10).scale == pytest.approx(math.sqrt(2) * math.log(9))
    rng = np.random.default_rng(0)
    x, labels = make_data(rng)
    head, kernel = built_head(AdaCos(C, dynamic=False), rng)
    s = math.sqrt(2) * math.log(C - 1)
    expected = s * ref_cosines(x.astype("float64"), kernel)
    np.testing.assert_allclose(np_(head(x, labels, training=True)), expected, rtol=1e-4, atol=1e-4)
    assert float(np_(head.current_scale)) == pytest.approx(s)


def test_adacos_dynamic_scale_update_matches_formula():
    rng = np.random.default_rng(1)
    x, labels = make_data(rng, batch=9, classes=6)
    head, kernel = built_head(AdaCos(6), rng)
    cos = ref_cosines(x.astype("float64"), kernel)
    scale = math.sqrt(2) * math.log(5)
    for _ in range(3):  # each call starts from the previous scale
        scale = ref_adacos_scale(cos, labels, scale)
        logits = np_(head(x, labels, training=True))
        assert float(np_(head.current_scale)) == pytest.approx(scale, rel=1e-4)
        np.testing.assert_allclose(logits, scale * cos, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(
            mean_ce(labels, logits), ref_cross_entropy(scale * cos, labels), rtol=1e-4
        )
    # Inference and non-training calls leave the scale alone.
    head(x, labels, training=False)
    head(x)
    assert float(np_(head.current_scale)) == pytest.approx(scale, rel=1e-4)


def test_adacos_needs_three_classes_without_scale():
    with pytest.raises(ValueError, match="num_classes"):
        AdaCos(2)
    assert AdaCos(2, scale=8.0).scale == 8.0


# -- SoftTriple -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_softtriple_logits_loss_and_regularizer_match_reference(seed):
    rng = np.random.default_rng(seed)
    x, labels = make_data(rng, batch=10)
    head, kernel = built_head(SoftTriple(C, centers_per_class=3), rng)
    logits = head(x, labels)
    expected = ref_softtriple(x.astype("float64"), kernel, labels, 3, 20.0, 0.1, 0.01)
    np.testing.assert_allclose(np_(logits), expected, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(
        mean_ce(labels, logits), ref_cross_entropy(expected, labels), rtol=1e-4
    )
    assert len(head.losses) == 1
    np.testing.assert_allclose(
        float(np_(head.losses[0])), ref_softtriple_regularizer(kernel, C, 3, 0.2), rtol=1e-5
    )
    # Inference: no margin, no regulariser.
    inference = head(x)
    np.testing.assert_allclose(
        np_(inference), ref_softtriple(x.astype("float64"), kernel, None, 3, 20.0, 0.1, 0.01),
        rtol=1e-4, atol=1e-3,
    )
    assert len(head.losses) == 0


def test_softtriple_regularizer_is_zero_for_one_center_or_tau_zero():
    rng = np.random.default_rng(0)
    x, labels = make_data(rng)
    for head in (SoftTriple(C, centers_per_class=1), SoftTriple(C, centers_per_class=4, tau=0.0)):
        head, _ = built_head(head, rng)
        head(x, labels)
        assert head.losses == []


def test_softtriple_distinct_centers_per_class():
    k, dim = 4, 6
    head = SoftTriple(3, centers_per_class=k)
    head.build((None, dim))
    kernel = np.zeros((dim, 3 * k), "float32")
    kernel[0, 0:4] = [1.0, 2.0, 3.0, 0.5]  # class 0: four copies of one direction
    kernel[1, 4:6] = 1.0  # class 1: two groups of two
    kernel[2, 6:8] = 1.0
    kernel[3, 6] = 0.01  # a slightly different direction, within tolerance of its twin
    for t in range(4):  # class 2: four distinct directions
        kernel[t, 8 + t] = 1.0
    head.kernel.assign(kernel)
    assert head.distinct_centers_per_class().tolist() == [1, 2, 4]
    assert head.distinct_centers_per_class(tolerance=1e-6).tolist() == [1, 3, 4]


def test_softtriple_regularizer_gradient_merges_centers():
    rng = np.random.default_rng(0)
    head, kernel = built_head(SoftTriple(2, centers_per_class=3, tau=1.0), rng, dim=4)
    before = float(np_(head.center_regularization()))
    x, labels = make_data(rng, dim=4, classes=2)

    def regularizer_of_kernel(w):
        _, _, losses = head.stateless_call([w], [], x, labels, return_losses=True)
        return losses[0]

    value, grad = loss_gradient(regularizer_of_kernel, kernel.astype("float32"))
    assert float(value) == pytest.approx(before, rel=1e-6)
    assert np.all(np.isfinite(grad))
    head.kernel.assign((kernel - 0.1 * grad).astype("float32"))
    assert float(np_(head.center_regularization())) < before


# -- mixed precision, symbolic use, configs, bad inputs -----------------------------------


ALL_HEADS = [
    lambda: CosFace(C),
    lambda: ArcFace(C),
    lambda: ArcFace(C, easy_margin=True),
    lambda: SubCenterArcFace(C),
    lambda: AdaCos(C),
    lambda: SoftTriple(C, centers_per_class=3),
    lambda: ArcFace(C, margin=dynamic_margins([5, 10, 20, 40])),
    lambda: heads.NormalizedSoftmax(C),
    lambda: heads.LargeMarginSoftmax(C),
    lambda: heads.P2SGrad(C),
]


@pytest.mark.parametrize("make_head", ALL_HEADS)
def test_no_nan_under_mixed_float16(make_head):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(B, D)) * 300.0).astype("float16")
    labels = rng.integers(0, C, size=B)
    with_zero_row = x.copy()
    with_zero_row[0] = 0.0  # degenerate embedding: logits must stay finite
    with mixed_precision("mixed_float16"):
        head = make_head()
        assert head.compute_dtype == "float32"
        logits = head(with_zero_row, labels, training=True)
        assert ops.dtype(logits) == "float32"
        value, grad = loss_gradient(lambda v: sparse_ce(labels, head(v, labels)), x)
    assert keras.config.dtype_policy().name == "float32"
    assert np.all(np.isfinite(np_(logits)))
    assert np.isfinite(value) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("make_head", ALL_HEADS)
def test_config_round_trip_and_functional_use(make_head):
    head = make_head()
    clone = type(head).from_config(head.get_config())
    assert clone.get_config() == head.get_config()
    embeddings = keras.Input((D,))
    labels = keras.Input((), dtype="int32")
    train_logits = head(embeddings, labels)
    assert tuple(train_logits.shape) == (None, C)
    assert tuple(head(embeddings).shape) == (None, C)
    assert tuple(head.kernel.shape) == (D, C * head.centers_per_class)


def test_bad_inputs_raise_value_errors_naming_the_argument():
    with pytest.raises(ValueError, match="num_classes"):
        CosFace(1)
    with pytest.raises(ValueError, match="num_classes"):
        ArcFace(3.5)
    with pytest.raises(ValueError, match="scale"):
        CosFace(3, scale=0.0)
    with pytest.raises(ValueError, match="margin"):
        ArcFace(3, margin=-0.1)
    with pytest.raises(ValueError, match="margin"):
        ArcFace(3, margin=[0.1, 0.2])
    with pytest.raises(ValueError, match="centers_per_class"):
        SoftTriple(3, centers_per_class=0)
    with pytest.raises(ValueError, match="gamma"):
        SoftTriple(3, gamma=0.0)
    head = CosFace(3)
    x = np.ones((4, 2), "float32")
    with pytest.raises(ValueError, match="embeddings"):
        head(np.ones((4, 2, 2), "float32"))
    with pytest.raises(ValueError, match="labels"):
        head(x, np.array([0.5, 1.0, 2.0, 0.0], "float32"))
    with pytest.raises(ValueError, match="labels"):
        head(x, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="labels"):
        head(x, np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="labels"):
        head(x, np.zeros((4, 2), "int32"))


def test_docstring_examples():
    for module in (
        heads.base,
        heads.cosface,
        heads.arcface,
        heads.adacos,
        heads.softtriple,
        heads.dynamic_margin,
    ):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__


# ------------------------------------------------------ pytorch-metric-learning parity (TF only)


def _head_batch(seed, classes=5, centers=1, dim=8, per_class=4):
    labels, x = m_per_class_batch(seed, classes=classes, per_class=per_class, dim=dim)
    kernel = np.random.default_rng(seed + 100).normal(size=(dim, classes * centers))
    # Pull each sample towards its class's first centre so the targets are not all
    # far (> 90°) from it: both branches of the margins get exercised.
    x = x + 1.5 * kernel[:, labels * centers].T / np.linalg.norm(kernel, axis=0)[labels * centers,
                                                                               None]
    return labels, x, kernel


@requires_pml
@pytest.mark.parametrize("margin", [0.5, 0.2])
def test_arcface_matches_pytorch_metric_learning(margin):
    # PML's ArcFaceLoss takes the margin in degrees (default 28.6° ≈ 0.4992 rad); keras-dml
    # in radians (default 0.5). Same fallback cos θ - m sin m where θ + m > π.
    torch, pml = import_pml()
    from pytorch_metric_learning import losses

    labels, x, kernel = _head_batch(70)
    # One sample almost opposite its class centre (θ > π - m): the fallback branch.
    centre = kernel[:, labels[0]] / np.linalg.norm(kernel[:, labels[0]])
    x[0] = 0.1 * x[0] - 3.0 * centre
    cosine = x[0] @ centre / np.linalg.norm(x[0])
    assert np.arccos(cosine) > math.pi - margin
    theirs = losses.ArcFaceLoss(num_classes=5, embedding_size=8, margin=math.degrees(margin),
                                scale=64)
    head_parity(ArcFace(5, scale=64.0, margin=margin), theirs, labels, x, kernel)


@requires_pml
def test_cosface_matches_pytorch_metric_learning():
    torch, pml = import_pml()
    from pytorch_metric_learning import losses

    labels, x, kernel = _head_batch(71)
    theirs = losses.CosFaceLoss(num_classes=5, embedding_size=8, margin=0.35, scale=64)
    head_parity(CosFace(5, scale=64.0, margin=0.35), theirs, labels, x, kernel)


@requires_pml
def test_subcenter_arcface_matches_pytorch_metric_learning():
    # PML's W is (D, C * K) viewed as (C, K): column c * K + k, keras-dml's class-major order.
    torch, pml = import_pml()
    from pytorch_metric_learning import losses

    labels, x, kernel = _head_batch(72, centers=3)
    theirs = losses.SubCenterArcFaceLoss(num_classes=5, embedding_size=8, sub_centers=3,
                                         margin=math.degrees(0.5), scale=64)
    head = SubCenterArcFace(5, centers_per_class=3, scale=64.0, margin=0.5)
    head_parity(head, theirs, labels, x, kernel)


@requires_pml
@pytest.mark.parametrize("la, gamma, margin", [(20.0, 0.1, 0.01), (10.0, 0.5, 0.2)])
def test_softtriple_matches_pytorch_metric_learning(la, gamma, margin):
    # Same logits and loss; keras-dml's head also adds the paper's centre-merging regulariser
    # (tau = 0.2 by default) with add_loss, which PML's SoftTripleLoss does not have: the
    # comparison uses tau=0. Both take gamma as the paper's γ (PML stores 1/γ).
    torch, pml = import_pml()
    from pytorch_metric_learning import losses

    labels, x, kernel = _head_batch(73, centers=4)
    theirs = losses.SoftTripleLoss(num_classes=5, embedding_size=8, centers_per_class=4,
                                   la=la, gamma=gamma, margin=margin)
    head = SoftTriple(5, centers_per_class=4, la=la, gamma=gamma, margin=margin, tau=0.0)
    head_parity(head, theirs, labels, x, kernel)
