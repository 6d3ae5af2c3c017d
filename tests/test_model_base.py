"""Every model class serves its inference model the same way: `embedding_model()`."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_dml.heads import ArcFace, CosFace
from keras_dml.models import S2SD, LoCo, MarginModel, PartialFCModel, SiameseModel
from keras_dml.models.base import BackboneModel
from keras_dml.models.xbm import XBMModel

D_IN, D_EMB = 6, 4


def backbone():
    return keras.Sequential([keras.Input((D_IN,)), keras.layers.Dense(D_EMB)])


def bare_backbone():
    """A backbone without `keras.Input`: the model learns its input shape when built."""
    return keras.layers.Dense(D_EMB)


MODELS = {
    "margin": lambda: MarginModel(backbone(), ArcFace(3)),
    "margin_bare": lambda: MarginModel(bare_backbone(), ArcFace(3)),
    "partial_fc": lambda: PartialFCModel(backbone(), CosFace(3)),
    "s2sd": lambda: S2SD(backbone(), embedding_dim=3, target_dims=(8,)),
    "s2sd_bare": lambda: S2SD(bare_backbone(), embedding_dim=3, target_dims=(8,)),
    "siamese": lambda: SiameseModel(backbone()),
    "siamese_bare": lambda: SiameseModel(bare_backbone()),
    "loco": lambda: LoCo([keras.layers.Dense(5), keras.layers.Dense(D_EMB)], projection_dim=3),
    "xbm": lambda: XBMModel(backbone(), memory_size=16),
    "xbm_bare": lambda: XBMModel(bare_backbone(), memory_size=16),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_serves_embedding_model(name):
    x = np.random.default_rng(0).normal(size=(7, D_IN)).astype("float32")
    model = MODELS[name]()
    assert isinstance(model, BackboneModel)
    if isinstance(model, SiameseModel):
        model((x, x))  # builds it; predict gives pair distances, not embeddings
        expected = keras.ops.convert_to_numpy(model.backbone(x))
    else:
        model(x)
        expected = model.predict(x, verbose=0)
    embedder = model.embedding_model()
    assert isinstance(embedder, keras.Model)
    assert not isinstance(embedder, BackboneModel)  # no training-only parts
    np.testing.assert_allclose(embedder.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.embed(x), expected, rtol=1e-5, atol=1e-6)


def test_unbuilt_model_says_to_build_it():
    with pytest.raises(ValueError, match="Build the model"):
        MarginModel(bare_backbone(), ArcFace(3)).embedding_model()


def test_loco_encoder_is_an_alias_of_embedding_model():
    model = MODELS["loco"]()
    x = np.random.default_rng(1).normal(size=(3, D_IN)).astype("float32")
    model(x)
    np.testing.assert_allclose(model.encoder().predict(x, verbose=0),
                               model.embedding_model().predict(x, verbose=0), atol=1e-6)
