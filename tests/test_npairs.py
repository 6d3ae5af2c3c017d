"""NPairsLoss and the tensorflow-addons-compatible npairs_loss_from_similarity, against loops."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from conftest import loss_gradient, mixed_precision

from keras_dml.losses.npairs import NPairsLoss, npairs_loss, npairs_loss_from_similarity

DISTANCES = ["dot", "cosine", "euclidean", "squared_euclidean"]


def ref_similarity(a, b, distance):
    """One pair, float64, as the loss sees it (a similarity: larger is closer)."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    if distance == "dot":
        return dot
    if distance == "cosine":
        norm_a = max(math.sqrt(sum(v * v for v in a)), 1e-6)
        norm_b = max(math.sqrt(sum(v * v for v in b)), 1e-6)
        return min(max(dot / (norm_a * norm_b), -1.0), 1.0)
    squared = sum((x - y) ** 2 for x, y in zip(a, b, strict=True))
    if distance == "squared_euclidean":
        return -squared
    if distance == "euclidean":
        return -math.sqrt(squared)
    raise ValueError(distance)


def ref_npairs(labels, x, l2_reg=0.001, distance="dot"):
    """Softmax over the other samples, uniform target on the positives, mean over anchors."""
    n = len(labels)
    losses = []
    for i in range(n):
        others = [k for k in range(n) if k != i]
        positives = [k for k in others if labels[k] == labels[i]]
        if not positives:
            continue
        logits = {k: ref_similarity(x[i], x[k], distance) for k in others}
        top = max(logits.values())
        log_denominator = top + math.log(sum(math.exp(logits[k] - top) for k in others))
        losses.append(-sum(logits[p] - log_denominator for p in positives) / len(positives))
    cross_entropy = sum(losses) / len(losses) if losses else 0.0
    squared_norms = [sum(float(v) ** 2 for v in row) for row in x]
    return cross_entropy + l2_reg * sum(squared_norms) / n


def ref_tfa_npairs(labels, similarity):
    """tfa's npairs_loss: row softmax over all columns, row-normalised label equality."""
    n = len(labels)
    total = 0.0
    for i in range(n):
        row = [float(v) for v in similarity[i]]
        top = max(row)
        log_denominator = top + math.log(sum(math.exp(v - top) for v in row))
        same = [j for j in range(n) if labels[j] == labels[i]]
        total += -sum(row[j] - log_denominator for j in same) / len(same)
    return total / n


def ref_sohn_npairs(anchors, positives):
    """Sohn's N-pair-mc loss on N pairs of N classes: log(1 + sum_j exp(f.f+_j - f.f+_i))."""
    n = len(anchors)
    total = 0.0
    for i in range(n):
        own = float(np.dot(anchors[i].astype(np.float64), positives[i]))
        others = [float(np.dot(anchors[i].astype(np.float64), positives[j])) for j in range(n)]
        total += math.log(1.0 + sum(math.exp(others[j] - own) for j in range(n) if j != i))
    return total / n


# Few distinct batch shapes: JAX compiles every eager op once per shape.
def batch(rng, n=12, dim=4, classes=3, scale=1.0):
    labels = rng.integers(0, classes, size=n)
    return labels, (scale * rng.normal(size=(n, dim))).astype("float32")


def run_compiled(fn, *arrays):
    """Runs `fn` as a compiled graph; on TensorFlow with the batch size unknown at trace time."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        specs = [tf.TensorSpec([None, *a.shape[1:]], a.dtype) for a in arrays]
        return np.asarray(tf.function(fn, input_signature=specs, autograph=False)(*arrays))
    if keras.backend.backend() == "jax":
        import jax

        return np.asarray(jax.jit(fn)(*arrays))
    return np.asarray(fn(*arrays))


def numeric_gradient(f, x, eps=1e-5):
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += eps
        down[idx] -= eps
        grad[idx] = (f(up) - f(down)) / (2 * eps)
    return grad


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("l2_reg", [0.0, 0.001, 0.1])
def test_matches_reference(distance, l2_reg):
    rng = np.random.default_rng(0)
    for n, classes, scale in ((8, 2, 1.0), (12, 3, 0.5), (12, 6, 3.0), (12, 12, 1.0), (5, 2, 1.0)):
        labels, x = batch(rng, n=n, classes=classes, scale=scale)
        loss = NPairsLoss(l2_reg=l2_reg, distance=distance)
        want = ref_npairs(labels, x, l2_reg, distance)
        np.testing.assert_allclose(float(loss(labels, x)), want, rtol=1e-5, atol=1e-6)


def test_function_equals_class_and_default_regulariser():
    labels, x = batch(np.random.default_rng(1))
    want = ref_npairs(labels, x, 0.001, "dot")
    np.testing.assert_allclose(float(npairs_loss(labels, x)), want, rtol=1e-5)
    np.testing.assert_allclose(float(NPairsLoss()(labels, x)), want, rtol=1e-5)


def test_compiled_with_unknown_batch_matches_eager():
    labels, x = batch(np.random.default_rng(11), n=8)
    labels = labels.astype("int32")
    got = run_compiled(lambda y, v: NPairsLoss()(y, v), labels, x)
    np.testing.assert_allclose(got, ref_npairs(labels, x), rtol=1e-5)
    similarity = x @ x.T
    got = run_compiled(lambda y, s: npairs_loss_from_similarity(y, s), labels, similarity)
    np.testing.assert_allclose(got, ref_tfa_npairs(labels, similarity), rtol=1e-5)


@pytest.mark.parametrize("distance", ["dot", "euclidean"])
def test_gradient_matches_finite_differences(distance):
    labels, x = batch(np.random.default_rng(2), n=8, classes=3)
    kwargs = dict(l2_reg=0.05, distance=distance)
    value, grad = loss_gradient(lambda v: npairs_loss(labels, v, **kwargs), x)
    np.testing.assert_allclose(value, ref_npairs(labels, x, **kwargs), rtol=1e-5)
    want = numeric_gradient(lambda z: ref_npairs(labels, z, **kwargs), x)
    np.testing.assert_allclose(grad, want, rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------- tfa compatibility


@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0])
def test_from_similarity_matches_tfa_definition(scale):
    rng = np.random.default_rng(3)
    for n, classes in ((8, 2), (12, 3), (12, 12), (5, 1)):
        labels = rng.integers(0, classes, size=n)
        similarity = (scale * rng.normal(size=(n, n))).astype("float32")
        want = ref_tfa_npairs(labels, similarity)
        got = npairs_loss_from_similarity(labels, similarity)
        np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-5)


def test_from_similarity_accepts_tfa_style_float_labels():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, size=8)
    similarity = rng.normal(size=(8, 8)).astype("float32")
    want = ref_tfa_npairs(labels, similarity)
    got = npairs_loss_from_similarity(labels.astype("float32"), similarity)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_from_similarity_reproduces_sohn_on_distinct_class_pairs():
    # For N (anchor, positive) pairs of N classes, tfa's definition is Sohn's N-pair-mc loss.
    rng = np.random.default_rng(5)
    anchors = rng.normal(size=(8, 4)).astype("float32")
    positives = (anchors + 0.5 * rng.normal(size=(8, 4))).astype("float32")
    similarity = anchors @ positives.T
    got = npairs_loss_from_similarity(np.arange(8), similarity)
    np.testing.assert_allclose(float(got), ref_sohn_npairs(anchors, positives), rtol=1e-5)


def test_from_similarity_gradient_matches_finite_differences():
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 3, size=5)
    similarity = rng.normal(size=(5, 5)).astype("float32")
    value, grad = loss_gradient(lambda s: npairs_loss_from_similarity(labels, s), similarity)
    np.testing.assert_allclose(value, ref_tfa_npairs(labels, similarity), rtol=1e-5)
    want = numeric_gradient(lambda s: ref_tfa_npairs(labels, s), similarity)
    np.testing.assert_allclose(grad, want, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(
    "labels, similarity, arg",
    [
        (np.zeros(4, "int32"), np.ones((4, 3), "float32"), "similarity"),
        (np.zeros(4, "int32"), np.ones((4,), "float32"), "similarity"),
        (np.zeros(3, "int32"), np.ones((4, 4), "float32"), "labels"),
        (np.zeros(2, "int32"), np.array([[np.nan, 1.0], [0.0, 1.0]], "float32"), "similarity"),
        (np.zeros(0, "int32"), np.ones((0, 0), "float32"), "similarity"),
    ],
    ids=["not-square", "rank", "batch-mismatch", "nan", "empty"],
)
def test_from_similarity_bad_inputs_raise(labels, similarity, arg):
    with pytest.raises(ValueError, match=arg):
        npairs_loss_from_similarity(labels, similarity)


# --------------------------------------------------------------------------- degenerate input

DEGENERATE = [
    (np.zeros(5, "int32"), np.eye(5, 4, dtype="float32")),
    (np.arange(5), np.eye(5, 4, dtype="float32")),
    (np.array([2]), np.ones((1, 4), "float32")),
    (np.array([0, 0, 1, 1]), np.ones((4, 4), "float32")),
    (np.array([0, 0, 1, 1, 2]), np.array([[1, 2, 0, 1]] * 3 + [[0, 0, 0, 0]] * 2, "float32")),
    (np.array([0, 0, 1]), np.array([[30, 0, 0, 0], [-30, 0, 0, 0], [0, 30, 0, 0]], "float32")),
]
DEGENERATE_IDS = [
    "one-class", "no-positive-pair", "single", "all-identical", "duplicates-and-zeros", "large",
]


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("labels, x", DEGENERATE, ids=DEGENERATE_IDS)
def test_degenerate_batches_are_finite_and_match_reference(labels, x, distance):
    loss = NPairsLoss(distance=distance)
    value, grad = loss_gradient(lambda v: loss(labels, v), x)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(value, ref_npairs(labels, x, 0.001, distance), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("labels", [np.arange(8), np.array([7])], ids=["all-distinct", "single"])
def test_no_positive_pair_leaves_only_the_regulariser(labels):
    x = np.random.default_rng(7).normal(size=(len(labels), 4)).astype("float32")
    value, grad = loss_gradient(lambda v: npairs_loss(labels, v, l2_reg=0.0), x)
    assert float(value) == 0.0
    assert np.all(grad == 0.0)
    value, grad = loss_gradient(lambda v: npairs_loss(labels, v, l2_reg=0.5), x)
    np.testing.assert_allclose(value, 0.5 * np.mean(np.sum(x**2, axis=1)), rtol=1e-5)
    np.testing.assert_allclose(grad, 0.5 * 2 * x / len(labels), rtol=1e-5)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_half_precision_inputs_and_model_outputs(policy):
    labels, x = batch(np.random.default_rng(8), n=8, classes=3)
    half = policy.split("_")[1]
    loss = NPairsLoss()
    exact = float(loss(labels, x))
    with mixed_precision(policy):
        direct = npairs_loss(labels, keras.ops.cast(x, half))
        assert keras.backend.standardize_dtype(direct.dtype) == "float32"
        np.testing.assert_allclose(float(direct), exact, rtol=0.05, atol=0.05)
        similarity = npairs_loss_from_similarity(labels, keras.ops.cast(x @ x.T, half))
        assert keras.backend.standardize_dtype(similarity.dtype) == "float32"
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4)])
        assert keras.backend.standardize_dtype(model(x).dtype) == half
        value, grad = loss_gradient(lambda v: loss(labels, model(v)), x)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad))
    assert keras.config.dtype_policy().name == "float32"


def test_half_precision_gradient_wrt_half_embeddings():
    labels, x = batch(np.random.default_rng(9), n=8, classes=2, scale=10.0)
    for half in ("float16", "bfloat16"):
        x_half = keras.ops.convert_to_numpy(keras.ops.cast(x, half))
        value, grad = loss_gradient(lambda v: npairs_loss(labels, v), x_half)
        assert np.isfinite(value)
        assert np.all(np.isfinite(np.asarray(grad, np.float32)))


# --------------------------------------------------------------------------- Keras integration


def test_config_round_trip():
    loss = NPairsLoss(l2_reg=0.01, distance="cosine", name="my_npairs")
    config = loss.get_config()
    assert config["l2_reg"] == 0.01
    assert config["distance"] == "cosine"
    assert config["name"] == "my_npairs"
    clone = NPairsLoss.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, NPairsLoss)
    assert restored.get_config() == config
    labels, x = batch(np.random.default_rng(10))
    np.testing.assert_allclose(float(restored(labels, x)), float(loss(labels, x)), rtol=1e-6)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="distance"):
        NPairsLoss(distance="manhattan")
    with pytest.raises(ValueError, match="l2_reg"):
        NPairsLoss(l2_reg=-1.0)


def test_from_similarity_as_a_compiled_loss_fits_saves_and_loads(tmp_path):
    # The tfa migration path: the model outputs the anchor-by-positive similarity matrix.
    rng = np.random.default_rng(12)
    labels = np.tile(np.arange(8), 4).astype("int32")
    anchors = (labels[:, None] + 0.3 * rng.normal(size=(32, 8))).astype("float32")
    positives = (labels[:, None] + 0.3 * rng.normal(size=(32, 8))).astype("float32")
    encoder = keras.layers.Dense(4)
    inputs = [keras.Input((8,)), keras.Input((8,))]
    scores = keras.ops.matmul(encoder(inputs[0]), keras.ops.transpose(encoder(inputs[1])))
    model = keras.Model(inputs, scores)
    model.compile(optimizer="adam", loss=npairs_loss_from_similarity)
    history = model.fit([anchors, positives], labels, batch_size=8, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    path = tmp_path / "npairs.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(
        restored.evaluate([anchors, positives], labels, batch_size=8, verbose=0),
        model.evaluate([anchors, positives], labels, batch_size=8, verbose=0),
        rtol=1e-5,
    )


# ------------------------------------------------- pairs="one_per_class" (PML's form, issue 21)


def ref_one_per_class(labels, x, l2_reg=0.0, distance="dot"):
    """First and second sample of each class with two; softmax over the positives."""
    firsts = {}
    pairs = []
    for i, label in enumerate(labels):
        if label in firsts and firsts[label] is not None:
            pairs.append((firsts[label], i))
            firsts[label] = None  # one pair per class
        elif label not in firsts:
            firsts[label] = i
    losses = []
    for a, _ in pairs:
        logits = [ref_similarity(x[a], x[p], distance) for _, p in pairs]
        top = max(logits)
        log_denominator = top + math.log(sum(math.exp(v - top) for v in logits))
        own = ref_similarity(x[a], x[dict(pairs)[a]], distance)
        losses.append(log_denominator - own)
    cross_entropy = sum(losses) / len(losses) if losses else 0.0
    squared_norms = [sum(float(v) ** 2 for v in row) for row in x]
    return cross_entropy + l2_reg * sum(squared_norms) / len(labels)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("l2_reg", [0.0, 0.01])
def test_one_per_class_matches_reference(distance, l2_reg):
    rng = np.random.default_rng(20)
    for n, classes in ((12, 3), (16, 8), (9, 9), (7, 2), (1, 1)):
        labels, x = batch(rng, n=n, classes=classes)
        loss = NPairsLoss(l2_reg=l2_reg, distance=distance, pairs="one_per_class")
        want = ref_one_per_class(labels, x, l2_reg, distance)
        np.testing.assert_allclose(float(loss(labels, x)), want, rtol=1e-5, atol=1e-6)


def test_one_per_class_gradient_and_compiled():
    labels, x = batch(np.random.default_rng(21), n=10, classes=4)
    kwargs = dict(l2_reg=0.05, pairs="one_per_class")
    value, grad = loss_gradient(lambda v: npairs_loss(labels, v, **kwargs), x)
    np.testing.assert_allclose(value, ref_one_per_class(labels, x, 0.05), rtol=1e-5)
    want = numeric_gradient(lambda z: ref_one_per_class(labels, z, 0.05), x)
    np.testing.assert_allclose(grad, want, rtol=1e-3, atol=1e-4)
    got = run_compiled(lambda y, v: NPairsLoss(**kwargs)(y, v), labels.astype("int32"), x)
    np.testing.assert_allclose(got, ref_one_per_class(labels, x, 0.05), rtol=1e-5)


@pytest.mark.parametrize("distance", ["dot", "cosine"])
def test_one_per_class_matches_pytorch_metric_learning(distance):
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import distances as pml_distances
    from pytorch_metric_learning import losses as pml_losses

    rng = np.random.default_rng(22)
    labels = rng.integers(0, 16, size=128)
    x = rng.normal(size=(128, 32)).astype("float32")
    # PML normalises embeddings by default, so its default `NPairsLoss()` is the cosine case.
    pml_distance = (pml_distances.DotProductSimilarity(normalize_embeddings=False)
                    if distance == "dot" else pml_distances.CosineSimilarity())
    x_torch = torch.tensor(x, requires_grad=True)
    expected = pml_losses.NPairsLoss(distance=pml_distance)(x_torch, torch.tensor(labels))
    expected.backward()
    loss = NPairsLoss(l2_reg=0.0, distance=distance, pairs="one_per_class")
    # `+ 0 * sum(v)`: TensorFlow returns the gathered rows' gradient as IndexedSlices
    # (fine for training); the dense term makes it a plain tensor for the comparison.
    value, grad = loss_gradient(lambda v: loss(labels, v) + 0.0 * keras.ops.sum(v), x)
    np.testing.assert_allclose(value, expected.item(), rtol=1e-5)
    np.testing.assert_allclose(grad, x_torch.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_one_per_class_config_and_bad_options():
    loss = NPairsLoss(pairs="one_per_class")
    config = loss.get_config()
    assert config["pairs"] == "one_per_class"
    assert NPairsLoss.from_config(config).get_config() == config
    default = NPairsLoss().get_config()
    assert default["pairs"] == "all" and NPairsLoss().pairs == "all"
    # Configs saved before the option existed load with the default.
    del default["pairs"]
    assert NPairsLoss.from_config(default).pairs == "all"
    with pytest.raises(ValueError, match="pairs"):
        NPairsLoss(pairs="first")
    labels, x = batch(np.random.default_rng(23))
    from keras_dml.losses.base import References

    with pytest.raises(ValueError, match="references"):
        npairs_loss(labels, x, pairs="one_per_class",
                    references=References.of_batch(labels.astype("int32"), x))


@pytest.mark.parametrize("classes", [3, 12, 40])  # C pairs fill B // 16, B // 4, B // 2 slots
def test_one_per_class_every_slot_size_matches_reference_and_pml(classes):
    """Pairs from segment minima over label ids, in `B // 16`, `B // 4` or `B // 2` slots."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import distances as pml_distances
    from pytorch_metric_learning import losses as pml_losses

    rng = np.random.default_rng(24 + classes)
    n = 96
    labels = rng.permutation(np.arange(n) % classes)
    if classes == 40:
        labels[rng.choice(n, 5, replace=False)] = 1000 + np.arange(5)  # singletons
    labels = (labels * 7919 - 5000).astype("int64")  # sparse, negative label values
    x = rng.normal(size=(n, 6)).astype("float32")
    loss = NPairsLoss(l2_reg=0.0, distance="dot", pairs="one_per_class")
    value, grad = loss_gradient(lambda v: loss(labels, v) + 0.0 * keras.ops.sum(v), x)
    np.testing.assert_allclose(value, ref_one_per_class(labels, x), rtol=1e-5)
    x_torch = torch.tensor(x, requires_grad=True)
    dot = pml_distances.DotProductSimilarity(normalize_embeddings=False)
    pml = pml_losses.NPairsLoss(distance=dot)
    expected = pml(x_torch, torch.tensor(labels))
    expected.backward()
    np.testing.assert_allclose(value, expected.item(), rtol=1e-5)
    np.testing.assert_allclose(grad, x_torch.grad.numpy(), rtol=1e-4, atol=1e-6)
    got = run_compiled(lambda y, v: loss(y, v), labels, x)  # TF: batch size unknown
    np.testing.assert_allclose(got, ref_one_per_class(labels, x), rtol=1e-5)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="XLA on TensorFlow")
def test_one_per_class_compiles_with_xla():
    import tensorflow as tf

    labels, x = batch(np.random.default_rng(25), n=32, classes=5)
    loss = NPairsLoss(l2_reg=0.01, pairs="one_per_class")
    got = tf.function(lambda y, v: loss(y, v), jit_compile=True)(labels.astype("int32"), x)
    np.testing.assert_allclose(float(got), ref_one_per_class(labels, x, 0.01), rtol=1e-5)
