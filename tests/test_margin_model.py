"""MarginModel: compile/fit with nothing else, centres optimizer, .keras round trip.

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

from keras_dml.heads import AdaCos, ArcFace, CosFace, ProxyAnchor, SoftTriple, SubCenterArcFace
from keras_dml.layers import MetricEmbedding
from keras_dml.models import MarginModel, margin_model
from keras_dml.models.margin_model import MarginCrossentropy, inverse_frequency_weights

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
    np.testing.assert_allclose(bare.embed(x), np_(bare(x)), rtol=1e-6, atol=1e-6)


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


# -- focal loss, label smoothing, class weights ---------------------------------------------


def ref_margin_crossentropy(logits, labels, gamma=0.0, smoothing=0.0, class_weights=None):
    """Per sample: -Σ_j q_j (1 - p_j)^γ log p_j; weighted mean over the batch."""
    total, weight_sum = 0.0, 0.0
    for i, row in enumerate(logits):
        top = max(row)
        log_z = top + math.log(sum(math.exp(v - top) for v in row))
        loss = 0.0
        for j, v in enumerate(row):
            q = (1.0 - smoothing) * (j == labels[i]) + smoothing / len(row)
            log_p = v - log_z
            loss += -q * (1.0 - math.exp(log_p)) ** gamma * log_p
        w = 1.0 if class_weights is None else class_weights[labels[i]]
        total += w * loss
        weight_sum += w
    return total / weight_sum


@pytest.mark.parametrize(
    "gamma, smoothing, weights",
    [(0.0, 0.0, None), (2.0, 0.0, None), (0.0, 0.1, None), (1.5, 0.2, [0.5, 2.0, 1.0, 0.1])],
)
def test_margin_crossentropy_matches_reference(gamma, smoothing, weights):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(12, 4)) * 5).astype("float32")
    labels = rng.integers(0, 4, size=12)
    loss = MarginCrossentropy(gamma=gamma, label_smoothing=smoothing, class_weights=weights)
    expected = ref_margin_crossentropy(logits.astype("float64"), labels, gamma, smoothing, weights)
    assert float(np_(loss(labels, logits))) == pytest.approx(expected, rel=1e-5)
    if weights is None:  # Keras's own dense-label losses agree
        one_hot = np.eye(4, dtype="float32")[labels]
        keras_loss = keras.losses.CategoricalFocalCrossentropy(
            alpha=1.0, gamma=gamma, from_logits=True, label_smoothing=smoothing
        )
        assert float(np_(keras_loss(one_hot, logits))) == pytest.approx(expected, rel=1e-4)


def test_margin_crossentropy_gradients_finite_at_saturated_logits():
    labels = np.array([0, 1, 2])
    logits = np.array([[200.0, -200.0, 0.0], [0.0, 0.0, 0.0], [-200.0, 0.0, 200.0]], "float32")
    for loss in (MarginCrossentropy(gamma=0.5), MarginCrossentropy(2.0, 0.1, [1.0, 0.0, 3.0])):
        value, grad = loss_gradient(lambda v, f=loss: f(labels, v), logits)
        assert np.isfinite(value) and np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_compile_options_give_focal_smoothed_class_weighted_loss(tmp_path):
    x, y = make_data(8)
    weights = inverse_frequency_weights([10, 20, 40], power=0.5)
    head = ArcFace(C, scale=16.0, margin=0.2)
    model = MarginModel(make_backbone(), head)
    model.compile(optimizer="adam", focal_gamma=2.0, label_smoothing=0.1, class_weights=weights)
    assert isinstance(model.loss, MarginCrossentropy)
    history = model.fit(x, y, epochs=2, batch_size=20, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    loss = model.evaluate(x, y, batch_size=N, verbose=0)
    logits = np_(head(model.embed(x), y))  # margin-adjusted: the smoothing applies to them
    expected = ref_margin_crossentropy(logits, y, 2.0, 0.1, weights)
    assert loss == pytest.approx(expected, rel=1e-5)

    model.save(tmp_path / "focal.keras")
    reloaded = keras.saving.load_model(tmp_path / "focal.keras")
    assert isinstance(reloaded.loss, MarginCrossentropy)
    assert reloaded.loss.get_config() == model.loss.get_config()
    assert reloaded.evaluate(x, y, batch_size=N, verbose=0) == pytest.approx(loss, rel=1e-5)
    # No options: the plain sparse cross-entropy, as before.
    model.compile(optimizer="adam")
    assert isinstance(model.loss, keras.losses.SparseCategoricalCrossentropy)


def test_inverse_frequency_weights_and_option_errors():
    weights = inverse_frequency_weights([100, 10, 1], power=1.0)
    np.testing.assert_allclose(weights, np.array([0.01, 0.1, 1.0]) / np.mean([0.01, 0.1, 1.0]))
    assert inverse_frequency_weights([5, 50], power=0.0) == [1.0, 1.0]
    with pytest.raises(ValueError, match="class_counts"):
        inverse_frequency_weights([3, 0])
    model = MarginModel(make_backbone(), ArcFace(C))
    with pytest.raises(ValueError, match="class_weights"):
        model.compile(optimizer="adam", class_weights=[1.0, 2.0])  # C = 3 classes
    with pytest.raises(ValueError, match="class_weights"):
        model.compile(optimizer="adam", class_weights=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="`loss`"):
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", focal_gamma=2.0)
    with pytest.raises(ValueError, match="own loss"):
        MarginModel(make_backbone(), ProxyAnchor(C)).compile(optimizer="adam", label_smoothing=0.1)
    with pytest.raises(ValueError, match="gamma"):
        MarginCrossentropy(gamma=-1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        MarginCrossentropy(label_smoothing=1.0)
    loss = MarginCrossentropy(1.0, 0.1, [1, 2])
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert restored.get_config()["class_weights"] == [1.0, 2.0]


def test_focal_fit_under_mixed_float16_has_no_nan():
    x, y = make_data(9)
    with mixed_precision("mixed_float16"):
        model = MarginModel(make_backbone(), ArcFace(C))
        model.compile(
            optimizer="adam", focal_gamma=2.0, label_smoothing=0.1, class_weights=[1, 2, 3]
        )
        history = model.fit(x * 100.0, y, epochs=2, batch_size=20, verbose=0)
    assert keras.config.dtype_policy().name == "float32"
    assert np.all(np.isfinite(history.history["loss"]))


def test_docstring_example():
    from keras_dml.losses import margin_crossentropy

    assert doctest.testmod(margin_model).failed == 0
    # MarginCrossentropy and inverse_frequency_weights moved there (re-exported here).
    assert doctest.testmod(margin_crossentropy).failed == 0
