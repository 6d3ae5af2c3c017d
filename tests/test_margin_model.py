"""MarginModel: compile/fit with nothing else, centres optimizer, .keras round trip.

Backend-agnostic: runs under TensorFlow and JAX.
"""

from __future__ import annotations

import doctest

import keras
import numpy as np
import pytest
from conftest import mixed_precision
from keras import ops

from keras_dml.heads import AdaCos, ArcFace, CosFace, SoftTriple, SubCenterArcFace
from keras_dml.layers import MetricEmbedding
from keras_dml.models import MarginModel, margin_model

N, D_IN, D_EMB, C = 60, 8, 4, 3


def np_(x):
    return np.asarray(ops.convert_to_numpy(x), dtype="float64")


def make_data(seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(N) % C
    centres = rng.normal(size=(C, D_IN)) * 3.0
    x = (centres[labels] + rng.normal(size=(N, D_IN))).astype("float32")
    return x, labels


def make_backbone(with_input=True):
    body = [keras.layers.Dense(16, activation="relu"), MetricEmbedding(D_EMB, normalize=False)]
    if with_input:
        return keras.Sequential([keras.Input((D_IN,)), *body])
    return keras.Sequential(body)


def sparse_ce(labels, logits):
    return float(
        np.mean(
            np_(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
        )
    )


def test_fit_with_compile_and_metrics_only():
    keras.utils.set_random_seed(0)
    x, y = make_data()
    model = MarginModel(make_backbone(), ArcFace(C, scale=16.0, margin=0.2))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), metrics=["accuracy"])
    history = model.fit(x, y, epochs=8, batch_size=20, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    # Metrics see the head's inference logits, updated once per batch.
    result = model.evaluate(x, y, batch_size=N, verbose=0, return_dict=True)
    embeddings = model.embed(x)
    predicted = np.argmax(np_(model.head(embeddings)), axis=1)
    assert result["accuracy"] == pytest.approx(np.mean(predicted == y))
    assert result["accuracy"] > 0.9
    assert model.predict(x, verbose=0).shape == (N, D_EMB)


def test_loss_is_cross_entropy_on_margin_logits_plus_head_losses():
    x, y = make_data(1)
    head = SoftTriple(C, centers_per_class=3, tau=0.5)
    model = MarginModel(make_backbone(), head)
    model.compile(optimizer="sgd")
    loss = model.evaluate(x, y, batch_size=N, verbose=0)
    embeddings = model.embed(x)
    expected = sparse_ce(y, head(embeddings, y)) + float(np_(head.center_regularization()))
    assert float(np_(head.center_regularization())) > 0
    assert loss == pytest.approx(expected, rel=1e-5)


def test_centers_optimizer_gives_the_head_its_own_learning_rate():
    x, y = make_data(2)
    model = MarginModel(make_backbone(), CosFace(C, scale=8.0))
    backbone_before = [np_(w) for w in model.backbone.weights]
    kernel_before = np_(model.head.kernel)
    model.compile(optimizer=keras.optimizers.SGD(0.0), centers_optimizer=0.5)
    model.fit(x, y, epochs=1, batch_size=N, verbose=0)
    for before, after in zip(backbone_before, model.backbone.weights, strict=True):
        np.testing.assert_array_equal(before, np_(after))
    assert np.abs(np_(model.head.kernel) - kernel_before).max() > 1e-3
    rates = sorted(
        (o.name.startswith("centers_"), float(np_(o.learning_rate)))
        for o in model.optimizer.optimizers
    )
    assert rates == [(False, 0.0), (True, 0.5)]

    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        centers_optimizer=keras.optimizers.SGD(0.0, name="frozen_centres"),
    )
    kernel_before = np_(model.head.kernel)
    model.fit(x, y, epochs=1, batch_size=N, verbose=0)
    np.testing.assert_array_equal(kernel_before, np_(model.head.kernel))


def test_adacos_scale_adapts_during_fit_only():
    x, y = make_data(3)
    head = AdaCos(C + 2)
    model = MarginModel(make_backbone(), head)
    model.compile(optimizer="adam")
    model.fit(x, y, epochs=1, batch_size=20, verbose=0)
    adapted = float(np_(head.current_scale))
    assert adapted != pytest.approx(head.scale)
    model.evaluate(x, y, verbose=0)
    model.predict(x, verbose=0)
    assert float(np_(head.current_scale)) == adapted


@pytest.mark.parametrize(
    "make_head, centers_optimizer, with_input",
    [
        (lambda: ArcFace(C, scale=16.0), 1e-2, True),
        (lambda: AdaCos(C + 1), None, True),
        (lambda: SoftTriple(C, centers_per_class=2), "adam", False),  # head built lazily
        (lambda: SubCenterArcFace(C, centers_per_class=2, scale=16.0), None, False),
    ],
)
def test_keras_save_load_round_trip(make_head, centers_optimizer, with_input, tmp_path):
    x, y = make_data(4)
    model = MarginModel(make_backbone(with_input), make_head())
    model.compile(optimizer="adam", metrics=["accuracy"], centers_optimizer=centers_optimizer)
    model.fit(x, y, epochs=1, batch_size=20, verbose=0)
    path = tmp_path / "margin_model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)

    assert isinstance(reloaded, MarginModel)
    assert type(reloaded.head) is type(model.head)
    assert reloaded.head.get_config() == model.head.get_config()
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), model.predict(x, verbose=0))
    np.testing.assert_allclose(reloaded.embed(x), model.embed(x))
    embeddings = model.embed(x)
    np.testing.assert_allclose(np_(reloaded.head(embeddings)), np_(model.head(embeddings)))
    states = zip(
        model.head.non_trainable_weights, reloaded.head.non_trainable_weights, strict=True
    )
    for a, b in states:
        np.testing.assert_allclose(np_(a), np_(b))
    assert type(reloaded.optimizer) is type(model.optimizer)
    assert int(np_(reloaded.optimizer.iterations)) == int(np_(model.optimizer.iterations))
    history = reloaded.fit(x, y, epochs=1, batch_size=20, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_embedding_model_is_the_backbone_only():
    x, _ = make_data(5)
    model = MarginModel(make_backbone(), ArcFace(C))
    embedding_model = model.embedding_model()
    assert embedding_model is model.backbone
    head_ids = {id(w) for w in model.head.weights}
    assert not head_ids & {id(w) for w in embedding_model.weights}
    np.testing.assert_allclose(model.embed(x), embedding_model.predict(x, verbose=0))

    bare = MarginModel(keras.layers.Dense(D_EMB), CosFace(C))
    bare.build((None, D_IN))
    wrapped = bare.embedding_model()
    assert isinstance(wrapped, keras.Model) and len(wrapped.weights) == 2
    np.testing.assert_allclose(bare.embed(x), np_(bare(x)), rtol=1e-6)


def test_fit_under_mixed_float16_has_no_nan():
    x, y = make_data(6)
    with mixed_precision("mixed_float16"):
        model = MarginModel(make_backbone(), ArcFace(C))
        model.compile(optimizer="adam", metrics=["accuracy"], centers_optimizer=1e-2)
        history = model.fit(x * 100.0, y, epochs=2, batch_size=20, verbose=0)
        assert model.head.compute_dtype == "float32"
    assert keras.config.dtype_policy().name == "float32"
    assert np.all(np.isfinite(history.history["loss"]))
    assert np.all(np.isfinite(np_(model.head.kernel)))


def test_bad_inputs_raise_value_errors():
    x, y = make_data(7)
    sequence_backbone = keras.Sequential([keras.Input((5, D_IN)), keras.layers.Dense(4)])
    with pytest.raises(ValueError, match="backbone"):
        MarginModel(sequence_backbone, ArcFace(C))
    with pytest.raises(ValueError, match="head"):
        MarginModel(make_backbone(), "arcface")
    model = MarginModel(make_backbone(), ArcFace(C))
    with pytest.raises(ValueError, match="centers_optimizer"):
        model.compile(optimizer="adam", centers_optimizer=-1.0)
    model.compile(optimizer="adam")
    with pytest.raises(ValueError, match="integer class labels"):
        model.fit(x, (y + 0.5).astype("float32"), epochs=1, verbose=0)
    with pytest.raises(ValueError, match="`y`"):
        model.fit(x, epochs=1, verbose=0)


def test_docstring_example():
    assert doctest.testmod(margin_model).failed == 0
