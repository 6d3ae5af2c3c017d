"""DynamicSoftMarginLoss on every backend: value vs the NumPy reference, gradient, `fit`.

Small and fast, listed in tests/backend_agnostic.txt (the PML parity file is
not: it runs once, under TensorFlow).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import loss_gradient
from test_dynamic_soft_margin import ref_differences, ref_step, successive_batches

from keras_dml.losses import dynamic_soft_margin as dsm
from keras_dml.losses.dynamic_soft_margin import DynamicSoftMarginLoss


def test_running_value_matches_reference_and_gradient_is_finite():
    loss = DynamicSoftMarginLoss(momentum=0.2)
    histogram = [0.0] * 10
    for labels, x in successive_batches(2):
        want, histogram = ref_step(histogram, ref_differences(labels, x), momentum=0.2)
        np.testing.assert_allclose(float(loss(labels, x.astype("float32"))), want, rtol=1e-4,
                                   atol=1e-6)
    np.testing.assert_allclose(np.asarray(loss.histogram.value), histogram, rtol=1e-4, atol=1e-6)
    labels, x = successive_batches(1)[0]
    # momentum=1.0: under jax.grad the histogram cannot be kept (a traced value).
    _, grad = loss_gradient(lambda v: DynamicSoftMarginLoss(momentum=1.0)(labels, v),
                            x.astype("float32"))
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def _fit(loss):
    labels, x = successive_batches(1)[0]
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4)])
    model.compile(optimizer="sgd", loss=loss)
    return model.fit(x.astype("float32"), labels, batch_size=10, epochs=2, verbose=0)


def test_fit_with_a_per_batch_histogram():
    history = _fit(DynamicSoftMarginLoss(momentum=1.0))
    assert np.all(np.isfinite(history.history["loss"]))


def test_fit_keeps_the_running_histogram_or_raises_under_jax():
    loss = DynamicSoftMarginLoss(momentum=0.1)
    if keras.backend.backend() == "jax":
        with pytest.raises(Exception, match="momentum=1.0"):
            _fit(loss)
        return
    _fit(loss)
    histogram = np.asarray(loss.histogram.value)
    assert np.sum(histogram) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("chunk", [16, 4])
def test_sorted_form_equals_the_dense_form(monkeypatch, chunk):
    # chunk 4: each anchor's ~7-11 positives take several passes of the loops.
    monkeypatch.setattr(dsm, "POSITIVE_CHUNK", chunk)
    rng = np.random.default_rng(chunk)
    labels = rng.integers(0, 3, size=24).astype("int32")
    x = rng.normal(size=(24, 6)).astype("float32")
    histogram = np.linspace(1.0, 2.0, 10).astype("float32")
    got = {}
    for method in dsm.METHODS:

        def fn(v, method=method):
            return dsm.dynamic_soft_margin_loss(labels, v, momentum=0.5, histogram=histogram,
                                                method=method)

        got[method] = loss_gradient(fn, x)
    np.testing.assert_allclose(got["sorted"][0], got["dense"][0], rtol=1e-5)
    np.testing.assert_allclose(got["sorted"][1], got["dense"][1], rtol=1e-4, atol=1e-6)
    assert np.any(got["sorted"][1] != 0)


def test_docstring_examples():
    import doctest

    from keras_dml.losses import dynamic_soft_margin

    assert doctest.testmod(dynamic_soft_margin).failed == 0
