"""The ranking, histogram, self-supervised losses and the PML softmax heads on every backend.

Small and fast (listed in `tests/backend_agnostic.txt`): per class, the
forward value against the loop reference of its own test file, a finite
gradient, and one `fit` step. The PML parity tests live in the per-module
files and run under TensorFlow only.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import loss_gradient
from test_fast_ap import ref_fast_ap
from test_histogram import ref_histogram
from test_large_margin_softmax import ref_logits as ref_large_margin_logits
from test_manifold import ref_manifold_loss
from test_normalized_softmax import ref_logits as ref_normalized_logits
from test_p2sgrad import ref_loss as ref_p2sgrad
from test_pnp import ref_pnp
from test_smooth_ap import ref_smooth_ap
from test_vicreg import ref_vicreg

from keras_dml import heads
from keras_dml.losses import FastAPLoss, HistogramLoss, PNPLoss, SmoothAPLoss, VICRegLoss
from keras_dml.models import MarginModel

B, D, C = 12, 5, 4


def labelled_batch():
    rng = np.random.default_rng(0)
    return np.repeat(np.arange(C), B // C), rng.normal(size=(B, D)).astype("float32")


def _vicreg_reference(labels, x):
    del labels
    return ref_vicreg(x[: B // 2], x[B // 2 :])


LOSSES = {
    "FastAPLoss": (lambda: FastAPLoss(), lambda y, x: ref_fast_ap(y, x)),
    "SmoothAPLoss": (lambda: SmoothAPLoss(temperature=0.1), lambda y, x: ref_smooth_ap(y, x, 0.1)),
    "PNPLoss": (lambda: PNPLoss(variant="Ds", anneal=0.1),
                lambda y, x: ref_pnp(y, x, anneal=0.1, variant="Ds")),
    "HistogramLoss": (lambda: HistogramLoss(num_bins=20), lambda y, x: ref_histogram(y, x, 20)),
    "VICRegLoss": (lambda: VICRegLoss(), _vicreg_reference),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_value_gradient_and_fit_step(name):
    make_loss, reference = LOSSES[name]
    labels, x = labelled_batch()
    loss = make_loss()
    value, grad = loss_gradient(lambda v: loss(labels, v), x)
    assert float(value) == pytest.approx(reference(labels, x.astype("float64")), rel=1e-4, abs=1e-6)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0.0)
    model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(4)])
    model.compile(optimizer="sgd", loss=loss)
    history = model.fit(x, labels, batch_size=B, epochs=1, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"][0])


def _head(cls, kernel, **kwargs):
    head = cls(C, **kwargs)
    head.build((None, kernel.shape[0]))
    head.kernel.assign(kernel.astype("float32"))
    return head


HEADS = {
    "NormalizedSoftmax": (
        lambda k: _head(heads.NormalizedSoftmax, k, temperature=0.5),
        lambda x, k, y: ref_normalized_logits(x, k, 0.5),
    ),
    "LargeMarginSoftmax": (
        lambda k: _head(heads.LargeMarginSoftmax, k, margin=2),
        lambda x, k, y: ref_large_margin_logits(x, k, y, 2, 1.0),
    ),
    "P2SGrad": (lambda k: _head(heads.P2SGrad, k), None),
}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_value_gradient_and_fit_step(name):
    make_head, reference = HEADS[name]
    labels, x = labelled_batch()
    kernel = np.random.default_rng(1).normal(size=(D, C))
    head = make_head(kernel)
    loss = head.default_loss() or keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if reference is None:  # P2SGrad: the reference is the loss itself
        expected = ref_p2sgrad(x.astype("float64"), kernel, labels)
        value = keras.ops.convert_to_numpy(loss(labels, head(x, labels)))
        assert float(value) == pytest.approx(expected, rel=1e-4)
    else:
        np.testing.assert_allclose(
            np.asarray(keras.ops.convert_to_numpy(head(x, labels))),
            reference(x.astype("float64"), kernel, labels),
            rtol=1e-4,
            atol=1e-5,
        )
    value, grad = loss_gradient(lambda v: loss(labels, head(v, labels)), x)
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad)) and np.any(grad != 0.0)
    backbone = keras.Sequential([keras.Input((D,)), keras.layers.Dense(6)])
    model = MarginModel(backbone, make_head(np.random.default_rng(2).normal(size=(6, C))))
    model.compile(optimizer="sgd")
    history = model.fit(x, labels, batch_size=B, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_manifold_value_gradient_and_fit_step():
    labels, x = labelled_batch()
    proxies = np.random.default_rng(1).normal(size=(C, D))
    head = _head(heads.Manifold, proxies.T)
    loss = head.default_loss()
    value, grad = loss_gradient(lambda v: loss(labels, head(v, labels)), x)
    expected = ref_manifold_loss(x.astype("float64"), proxies, labels)
    assert float(value) == pytest.approx(expected, rel=1e-4)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0.0)
    backbone = keras.Sequential([keras.Input((D,)), keras.layers.Dense(6)])
    model = MarginModel(backbone, heads.Manifold(C))
    model.compile(optimizer="sgd")
    history = model.fit(x, labels, batch_size=B, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
