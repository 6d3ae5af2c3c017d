"""GeM pooling and embedding layers against NumPy references. Backend-agnostic."""

from __future__ import annotations

import doctest

import keras
import numpy as np
import pytest
from conftest import loss_gradient, mixed_precision
from keras import ops

from keras_dml import layers
from keras_dml.layers import (
    GeneralizedMeanPooling1D,
    GeneralizedMeanPooling2D,
    L2Normalize,
    MetricEmbedding,
)


def np_(x):
    return np.asarray(ops.convert_to_numpy(x), dtype="float64")


def ref_gem(x, axes, p, eps=1e-6):
    """(mean over `axes` of max(x, eps)^p)^(1/p), by loops over the kept entries."""
    x = np.maximum(x.astype("float64"), eps)
    moved = np.moveaxis(x, axes, list(range(x.ndim - len(axes), x.ndim)))
    kept = moved.shape[: x.ndim - len(axes)]
    out = np.zeros(kept)
    for index in np.ndindex(*kept):
        values = moved[index].reshape(-1)
        out[index] = (sum(v**p for v in values) / len(values)) ** (1.0 / p)
    return out


@pytest.mark.parametrize("p", [1.0, 3.0, 6.5])
def test_gem_2d_matches_reference(p):
    x = np.random.default_rng(0).normal(size=(3, 4, 5, 6)).astype("float32")
    got = np_(GeneralizedMeanPooling2D(p=p)(x))
    np.testing.assert_allclose(got, ref_gem(x, [1, 2], p), rtol=1e-5)


def test_gem_2d_channels_first_and_keepdims():
    x = np.abs(np.random.default_rng(1).normal(size=(2, 6, 4, 5))).astype("float32")
    layer = GeneralizedMeanPooling2D(data_format="channels_first", keepdims=True)
    got = np_(layer(x))
    assert got.shape == (2, 6, 1, 1)
    assert layer.compute_output_shape((2, 6, 4, 5)) == (2, 6, 1, 1)
    np.testing.assert_allclose(got[:, :, 0, 0], ref_gem(x, [2, 3], 3.0), rtol=1e-5)


def test_gem_1d_matches_reference_and_limits():
    x = np.abs(np.random.default_rng(2).normal(size=(3, 7, 4))).astype("float32")
    np.testing.assert_allclose(
        np_(GeneralizedMeanPooling1D()(x)), ref_gem(x, [1], 3.0), rtol=1e-5
    )
    np.testing.assert_allclose(np_(GeneralizedMeanPooling1D(p=1.0)(x)), x.mean(axis=1), rtol=1e-5)
    # Large p approaches max pooling.
    np.testing.assert_allclose(
        np_(GeneralizedMeanPooling1D(p=200.0)(x)), x.max(axis=1), rtol=2e-2
    )
    channels_first = np.transpose(x, (0, 2, 1))
    got = np_(GeneralizedMeanPooling1D(data_format="channels_first")(channels_first))
    np.testing.assert_allclose(got, ref_gem(x, [1], 3.0), rtol=1e-5)


def test_gem_trainable_p_gets_a_finite_gradient():
    x = np.abs(np.random.default_rng(3).normal(size=(2, 3, 3, 4))).astype("float32")
    x[0, 0, 0, 0] = 0.0  # clamped at epsilon: log stays finite
    layer = GeneralizedMeanPooling2D(p=3.0, trainable_p=True)
    layer.build(x.shape)
    assert [w.name for w in layer.trainable_weights] == ["p"]

    def pooled_sum(p):
        out, _ = layer.stateless_call([p], [], x)
        return ops.sum(out)

    _, grad = loss_gradient(pooled_sum, np.array(3.0, "float32"))
    h = 1e-3
    numeric = (ref_gem(x, [1, 2], 3.0 + h).sum() - ref_gem(x, [1, 2], 3.0 - h).sum()) / (2 * h)
    np.testing.assert_allclose(float(grad), numeric, rtol=1e-2)


def test_gem_mixed_float16_has_no_overflow():
    x = np.full((1, 2, 2, 3), 100.0, "float16")  # 100^3 overflows float16
    with mixed_precision("mixed_float16"):
        out = GeneralizedMeanPooling2D()(x)
        assert ops.dtype(out) == "float16"
    np.testing.assert_allclose(np_(out), 100.0, rtol=1e-3)


def test_l2_normalize_layer():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], "float32")
    out = np_(L2Normalize()(x))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)
    with mixed_precision("mixed_float16"):
        half = L2Normalize()(x.astype("float16") * 1000)
        assert ops.dtype(half) == "float16"
    np.testing.assert_allclose(np_(half)[0], [0.6, 0.8], atol=1e-3)


def test_metric_embedding_is_dense_then_l2():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(5, 8)).astype("float32")
    layer = MetricEmbedding(3)
    out = np_(layer(x))
    kernel, bias = (np_(w) for w in layer.dense.weights)
    dense = x.astype("float64") @ kernel + bias
    # The layer computes in float32: a component near zero comes out of a sum of
    # eight O(1) products, so its error is absolute (~1e-8), not relative.
    want = dense / np.linalg.norm(dense, axis=1, keepdims=True)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    raw = MetricEmbedding(3, normalize=False, use_bias=False)
    assert len(raw(x).shape) == 2 and len(raw.weights) == 1


@pytest.mark.parametrize(
    "layer",
    [
        GeneralizedMeanPooling1D(p=2.0, trainable_p=True),
        GeneralizedMeanPooling2D(keepdims=True),
        L2Normalize(axis=-1),
        MetricEmbedding(4, kernel_regularizer="l2"),
    ],
)
def test_layer_config_round_trip_and_keras_save(layer, tmp_path):
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    shape = (3, 4) if isinstance(layer, GeneralizedMeanPooling1D) else (4, 4, 3)
    if isinstance(layer, (L2Normalize, MetricEmbedding)):
        shape = (6,)
    inputs = keras.Input(shape)
    model = keras.Model(inputs, layer(inputs))
    x = np.abs(np.random.default_rng(5).normal(size=(2, *shape))).astype("float32")
    path = tmp_path / "layer.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(np_(reloaded(x)), np_(model(x)), rtol=1e-6)


def test_bad_inputs_raise_value_errors():
    with pytest.raises(ValueError, match="`p`"):
        GeneralizedMeanPooling2D(p=0.0)
    with pytest.raises(ValueError, match="data_format"):
        GeneralizedMeanPooling2D(data_format="nhwc")
    with pytest.raises(ValueError, match="rank 4"):
        GeneralizedMeanPooling2D().build((2, 3, 4))
    with pytest.raises(ValueError, match="units"):
        MetricEmbedding(0)
    with pytest.raises(ValueError, match="axis"):
        L2Normalize(axis="last")


def test_docstring_examples():
    for module in (layers.pooling, layers.embedding):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__
