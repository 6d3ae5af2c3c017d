"""The issue-19 pair and tuple losses on every backend: value, gradient and one `fit` step.

Small and fast (listed in `backend_agnostic.txt`, run under TensorFlow, JAX
and torch); the PML parity tests live in each loss's own test file.
"""

from __future__ import annotations

import doctest
import importlib

import keras
import numpy as np
import pytest
from conftest import loss_gradient
from test_angular import ref_angular
from test_generalized_lifted_structure import ref_gls
from test_instance import ref_instance
from test_intra_pair_variance import ref_ipv
from test_margin import ref_margin
from test_nca import ref_nca
from test_ranked_list import ref_rll
from test_snr_contrastive import ref_snr_contrastive
from test_threshold_consistent_margin import ref_tcm
from test_tuplet_margin import ref_tuplet

import keras_dml
from keras_dml.losses.margin import MarginBeta

CASES = [
    (keras_dml.MarginLoss(), ref_margin),
    (keras_dml.NCALoss(), ref_nca),
    (keras_dml.TupletMarginLoss(scale=16.0), lambda y, x: ref_tuplet(y, x, scale=16.0)),
    (keras_dml.AngularLoss(), ref_angular),
    (keras_dml.GeneralizedLiftedStructureLoss(), ref_gls),
    (keras_dml.IntraPairVarianceLoss(), ref_ipv),
    (keras_dml.SignalToNoiseRatioContrastiveLoss(), ref_snr_contrastive),
    (keras_dml.RankedListLoss(), ref_rll),
    (keras_dml.InstanceLoss(gamma=8.0), lambda y, x: ref_instance(y, x, gamma=8.0)),
    (keras_dml.ThresholdConsistentMarginLoss(), ref_tcm),
]
IDS = [type(loss).__name__ for loss, _ in CASES]
MODULES = ["margin", "nca", "tuplet_margin", "angular", "generalized_lifted_structure",
           "intra_pair_variance", "snr_contrastive", "ranked_list", "instance",
           "threshold_consistent_margin"]


def batch():
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(4), 4).astype("int32")
    return labels, rng.normal(size=(16, 6)).astype("float32")


@pytest.mark.parametrize("loss,reference", CASES, ids=IDS)
def test_value_and_gradient(loss, reference):
    labels, x = batch()
    value, grad = loss_gradient(lambda v: loss(labels, v), x)
    np.testing.assert_allclose(float(value), reference(labels, x.astype("float64")),
                               rtol=1e-4, atol=1e-6)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


@pytest.mark.parametrize("loss,reference", CASES, ids=IDS)
def test_one_fit_step(loss, reference):
    labels, x = batch()
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(4), keras.layers.UnitNormalization()]
    )
    model.compile(optimizer="sgd", loss=loss)
    history = model.fit(x, labels, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_learned_beta_fit_step():
    labels, x = batch()
    embed = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(4), keras.layers.UnitNormalization()]
    )
    model = keras.Sequential([embed, MarginBeta(num_classes=4)])
    model.compile(optimizer=keras.optimizers.SGD(1.0),
                  loss=keras_dml.MarginLoss(learn_beta=True, num_classes=4))
    model.fit(x, labels, batch_size=16, epochs=1, verbose=0)
    beta = keras.ops.convert_to_numpy(model.layers[-1].beta)
    assert np.all(np.isfinite(beta)) and not np.allclose(beta, 1.2)


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
    loaded = importlib.import_module(f"keras_dml.losses.{module}")
    assert doctest.testmod(loaded).failed == 0
