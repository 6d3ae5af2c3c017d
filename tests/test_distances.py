"""Pairwise distances against loop references; names; gradients at zero distance."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import loss_gradient
from keras import ops

from keras_dml import distances


def ref(x, y, name):
    out = np.zeros((len(x), len(y)))
    for i, a in enumerate(np.asarray(x, np.float64)):
        for j, b in enumerate(np.asarray(y, np.float64)):
            if name == "dot":
                out[i, j] = sum(a[k] * b[k] for k in range(len(a)))
            elif name == "cosine":
                out[i, j] = a @ b / (math.sqrt(a @ a) * math.sqrt(b @ b))
            elif name == "angular":
                out[i, j] = max(1.0 - a @ b / (math.sqrt(a @ a) * math.sqrt(b @ b)), 0.0)
            elif name == "euclidean":
                out[i, j] = math.sqrt(sum((a[k] - b[k]) ** 2 for k in range(len(a))))
            elif name == "squared_euclidean":
                out[i, j] = sum((a[k] - b[k]) ** 2 for k in range(len(a)))
    return out


NAMES = ["dot", "cosine", "angular", "euclidean", "squared_euclidean"]


@pytest.mark.parametrize("name", NAMES)
def test_matches_loop_reference(name):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 4)).astype("float32")
    y = rng.normal(size=(3, 4)).astype("float32")
    np.testing.assert_allclose(distances.pairwise(x, y, name), ref(x, y, name), atol=1e-5)
    np.testing.assert_allclose(distances.pairwise(x, None, name), ref(x, x, name), atol=1e-5)


@pytest.mark.parametrize(
    "alias, name",
    [("L2", "euclidean"), ("l2", "euclidean"), ("squared-L2", "squared_euclidean"),
     ("cos", "cosine"), ("dot_product", "dot"), ("COSINE", "cosine")],
)
def test_aliases(alias, name):
    assert distances.get(alias).name == name


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="euclidean"):
        distances.get("manhattan")
    with pytest.raises(ValueError, match="distance"):
        distances.get(3)


def test_similarity_and_distance_views():
    x = np.eye(3, dtype="float32")
    cosine = distances.get("cosine")
    np.testing.assert_allclose(cosine.distance(x), 1.0 - np.eye(3), atol=1e-6)
    euclid = distances.get("euclidean")
    np.testing.assert_allclose(euclid.similarity(x), -ref(x, x, "euclidean"), atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_zero_distance_has_finite_gradient(name):
    x = np.ones((3, 4), "float32")  # every pair at distance 0
    value, grad = loss_gradient(lambda v: ops.sum(distances.pairwise(v, None, name)), x)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad))


def test_zero_rows_do_not_give_nan():
    x = np.zeros((2, 3), "float32")
    assert np.all(np.isfinite(ops.convert_to_numpy(distances.cosine_similarity(x))))
    assert np.all(np.isfinite(ops.convert_to_numpy(distances.l2_normalize(x))))


def test_half_precision_is_computed_in_float32():
    x = np.random.default_rng(1).normal(size=(4, 3)).astype("float16")
    out = distances.euclidean_distance(x)
    assert "float32" in str(out.dtype)
    np.testing.assert_allclose(out, ref(x, x, "euclidean"), atol=1e-3)
