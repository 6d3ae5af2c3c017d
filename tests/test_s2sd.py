"""S2SD: the distillation term, its stop-gradient, the loss, fit, save/load, MirroredStrategy.

Backend-agnostic except the MirroredStrategy test (tf.distribute is TensorFlow's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import loss_gradient
from keras import ops
from sklearn.datasets import load_digits

import keras_dml
from keras_dml.models.s2sd import S2SD, similarity_distillation

D_IN = 12


def np_(x):
    return np.asarray(ops.convert_to_numpy(x), dtype="float64")


def reference_distillation(student, teacher, temperature):
    """Slow, obviously-correct loop: T² · mean_i KL(softmax(D_t[i]/T) || softmax(D_s[i]/T))."""
    student = np.asarray(student, "float64")
    teacher = np.asarray(teacher, "float64")
    n = len(student)

    def cosines(x):
        unit = [row / np.linalg.norm(row) for row in x]
        return [[float(np.dot(unit[i], unit[j])) for j in range(n)] for i in range(n)]

    def softmax(row):
        exps = [np.exp(v / temperature) for v in row]
        return [e / sum(exps) for e in exps]

    d_student, d_teacher = cosines(student), cosines(teacher)
    total = 0.0
    for i in range(n):
        p, q = softmax(d_teacher[i]), softmax(d_student[i])
        total += sum(p[j] * np.log(p[j] / q[j]) for j in range(n))
    return total / n * temperature**2


def make_backbone(features=16):
    return keras.Sequential(
        [keras.Input((D_IN,)), keras.layers.Dense(features, activation="relu")], name="backbone"
    )


def make_data(n=48, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = rng.normal(size=(classes, D_IN)) * 2.0
    x = (centres[labels] + rng.normal(size=(n, D_IN))).astype("float32")
    return x, labels.astype("int32")


def variable_gradients(model, fn):
    """Gradients of the scalar `fn()` w.r.t. `model.trainable_variables` (None where none flows)."""
    variables = model.trainable_variables
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            value = fn()
        grads = tape.gradient(value, [v.value for v in variables])
        return dict(zip([v.path for v in variables], grads, strict=True))
    if keras.backend.backend() == "jax":
        import jax

        def stateless(values):
            with keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True))):
                return fn()

        grads = jax.grad(stateless)([v.value for v in variables])
        return dict(zip([v.path for v in variables], grads, strict=True))
    if keras.backend.backend() == "torch":
        import torch

        tensors = [v.value for v in variables]
        grads = torch.autograd.grad(fn(), tensors, allow_unused=True)
        return dict(zip([v.path for v in variables], grads, strict=True))
    raise NotImplementedError(keras.backend.backend())


def gradient_norm(grads, prefix):
    norms = [
        0.0 if g is None else float(np.linalg.norm(np_(g)))
        for path, g in grads.items()
        if path.split("/")[0] == prefix or path.startswith(prefix + "/")
    ]
    assert norms, f"no variable under {prefix!r} in {list(grads)}"
    return sum(norms)


# -- the distillation term -------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.25, 3.0])
def test_distillation_matches_numpy_loop(rng, temperature):
    student = rng.normal(size=(7, 5)).astype("float32")
    teacher = rng.normal(size=(7, 11)).astype("float32")  # widths may differ
    value = float(similarity_distillation(student, teacher, temperature))
    assert value == pytest.approx(reference_distillation(student, teacher, temperature), rel=1e-4)
    assert value > 0


def test_distillation_is_zero_for_equal_similarities_and_positive_otherwise(rng):
    x = rng.normal(size=(6, 4)).astype("float32")
    rotation = np.linalg.qr(rng.normal(size=(4, 4)))[0].astype("float32")
    # Scaling and rotating keep every cosine, so nothing is left to distil.
    assert float(similarity_distillation(x, 2.5 * x @ rotation)) == pytest.approx(0.0, abs=1e-6)
    assert float(similarity_distillation(x, rng.normal(size=(6, 9)))) > 1e-3


def test_teacher_gets_no_gradient_and_student_gets_the_exact_one(rng):
    student = rng.normal(size=(5, 3)).astype("float32")
    teacher = rng.normal(size=(5, 8)).astype("float32")
    _, teacher_grad = loss_gradient(lambda t: similarity_distillation(student, t, 0.5), teacher)
    assert np.all(teacher_grad == 0.0)

    _, student_grad = loss_gradient(lambda s: similarity_distillation(s, teacher, 0.5), student)
    numeric = np.zeros_like(student, dtype="float64")
    eps = 1e-4
    for index in np.ndindex(*student.shape):
        plus, minus = student.astype("float64"), student.astype("float64")
        plus[index] += eps
        minus[index] -= eps
        numeric[index] = (
            reference_distillation(plus, teacher, 0.5) - reference_distillation(minus, teacher, 0.5)
        ) / (2 * eps)
    np.testing.assert_allclose(student_grad, numeric, rtol=2e-3, atol=1e-5)


def test_distillation_rejects_bad_inputs(rng):
    x = rng.normal(size=(4, 3)).astype("float32")
    with pytest.raises(ValueError, match="temperature"):
        similarity_distillation(x, x, temperature=0.0)
    with pytest.raises(ValueError, match="must match"):
        similarity_distillation(x, x[:3])
    with pytest.raises(ValueError, match="shape"):
        similarity_distillation(x[0], x)


# -- the model's loss -------------------------------------------------------------


def test_target_heads_get_no_gradient_from_distillation_but_f_and_backbone_do():
    keras.utils.set_random_seed(0)
    x, y = make_data(n=16)
    # The paper's routing; the default's is tested below.
    model = S2SD(make_backbone(), embedding_dim=4, target_dims=(8, 24),
                 distillation_into_backbone=True)
    model.compile(optimizer="sgd", loss=keras_dml.MultiSimilarityLoss())

    grads = variable_gradients(
        model, lambda: model.compute_loss_terms(x, y, training=True)["distillation"]
    )
    assert gradient_norm(grads, "target_8") == 0.0
    assert gradient_norm(grads, "target_24") == 0.0
    assert gradient_norm(grads, "embedding") > 0.0
    assert gradient_norm(grads, "backbone") > 0.0

    # The target heads are trained, by their own metric loss.
    grads = variable_gradients(
        model, lambda: model.compute_loss_terms(x, y, training=True)["target_24_loss"]
    )
    assert gradient_norm(grads, "target_24") > 0.0
    assert gradient_norm(grads, "target_8") == 0.0


@pytest.mark.parametrize("feature_distillation", [False, True])
def test_by_default_distillation_trains_f_but_not_the_backbone(feature_distillation):
    keras.utils.set_random_seed(0)
    x, y = make_data(n=16)
    model = S2SD(make_backbone(), embedding_dim=4, target_dims=(8, 24),
                 feature_distillation=feature_distillation)
    assert model.distillation_into_backbone is False
    model.compile(optimizer="sgd", loss=keras_dml.MultiSimilarityLoss())
    key = "feature_distillation" if feature_distillation else "distillation"
    grads = variable_gradients(model, lambda: model.compute_loss_terms(x, y, training=True)[key])
    assert gradient_norm(grads, "embedding") > 0.0
    assert gradient_norm(grads, "backbone") == 0.0
    assert gradient_norm(grads, "target_24") == 0.0
    # The metric losses still train the backbone.
    grads = variable_gradients(
        model, lambda: model.compute_loss_terms(x, y, training=True)["base_loss"]
    )
    assert gradient_norm(grads, "backbone") > 0.0
    # Same values under both routings: only the gradient differs.
    paper = S2SD.from_config({**model.get_config(), "distillation_into_backbone": True})
    paper.set_weights(model.get_weights())
    paper.compile(optimizer="sgd", loss=keras_dml.MultiSimilarityLoss())
    for name, value in model.compute_loss_terms(x, y).items():
        assert float(np_(paper.compute_loss_terms(x, y)[name])) == pytest.approx(
            float(np_(value)), rel=1e-5
        )


def test_configs_saved_before_the_routing_argument_load_with_the_papers_routing():
    model = S2SD(make_backbone(), embedding_dim=4, target_dims=(8,))
    config = model.get_config()
    assert config["distillation_into_backbone"] is False
    assert S2SD.from_config(config).distillation_into_backbone is False
    del config["distillation_into_backbone"]
    assert S2SD.from_config(config).distillation_into_backbone is True


def test_detached_targets_leave_only_fs_metric_loss_to_train_the_backbone():
    keras.utils.set_random_seed(0)
    x, y = make_data(n=16)
    model = S2SD(make_backbone(), embedding_dim=4, target_dims=(8, 24),
                 targets_into_backbone=False)
    model.compile(optimizer="sgd", loss=keras_dml.MultiSimilarityLoss())
    grads = variable_gradients(
        model, lambda: model.compute_loss_terms(x, y, training=True)["target_24_loss"]
    )
    assert gradient_norm(grads, "target_24") > 0.0  # the heads still learn
    assert gradient_norm(grads, "backbone") == 0.0
    # The whole loss sends the backbone ½ the gradient of f's metric loss, nothing else.
    total = variable_gradients(
        model, lambda: model.compute_loss(x, y, model(x, training=True), training=True)
    )
    base = variable_gradients(
        model, lambda: model.compute_loss_terms(x, y, training=True)["base_loss"]
    )
    for path, grad in total.items():
        if path.startswith("backbone/"):
            np.testing.assert_allclose(np_(grad), 0.5 * np_(base[path]), rtol=1e-4, atol=1e-7)
    # Same loss values as with the targets' gradient into the backbone.
    coupled = S2SD.from_config({**model.get_config(), "targets_into_backbone": True})
    coupled.set_weights(model.get_weights())
    coupled.compile(optimizer="sgd", loss=keras_dml.MultiSimilarityLoss())
    for name, value in model.compute_loss_terms(x, y).items():
        assert float(np_(coupled.compute_loss_terms(x, y)[name])) == pytest.approx(
            float(np_(value)), rel=1e-5
        )
    config = model.get_config()
    assert S2SD.from_config(config).targets_into_backbone is False
    del config["targets_into_backbone"]
    assert S2SD.from_config(config).targets_into_backbone is True


@pytest.mark.parametrize("features, into", [(24, True), (32, True), (16, False)])
def test_auto_routing_detaches_the_targets_only_when_phi_is_narrower(features, into):
    keras.utils.set_random_seed(0)
    x, y = make_data(n=16)
    model = S2SD(make_backbone(features), embedding_dim=4, target_dims=(8, 24))
    assert model.targets_into_backbone == "auto"
    model.compile(optimizer="sgd", loss=keras_dml.MultiSimilarityLoss())
    model(x[:2])
    assert model.targets_into_backbone_resolved is into
    grads = variable_gradients(
        model, lambda: model.compute_loss_terms(x, y, training=True)["target_24_loss"]
    )
    assert (gradient_norm(grads, "backbone") > 0.0) is into
    assert gradient_norm(grads, "target_24") > 0.0
    restored = S2SD.from_config(model.get_config())
    assert restored.targets_into_backbone == "auto"
    restored(x[:2])
    assert restored.targets_into_backbone_resolved is into


def test_targets_into_backbone_rejects_other_values():
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="targets_into_backbone"):
            S2SD(make_backbone(), target_dims=(8,), targets_into_backbone=bad)


def test_loss_is_half_the_metric_losses_plus_weighted_distillations():
    keras.utils.set_random_seed(0)
    x, y = make_data(n=16)
    model = S2SD(
        make_backbone(),
        embedding_dim=4,
        target_dims=(8, 24),
        temperature=0.5,
        distillation_weight=3.0,
        feature_distillation=True,
        feature_distillation_weight=7.0,
        feature_distillation_delay=2,
        distillation_warmup=0,  # γ at full weight from the first step: the formula below
    )
    loss_fn = keras_dml.TripletLoss(margin=0.2)
    model.compile(optimizer="sgd", loss=loss_fn)

    outputs = model(x, training=True)
    embeddings, features = np_(outputs["embeddings"]), np_(outputs["features"])
    targets = [np_(head(outputs["features"])) for head in model.target_heads]
    base = float(loss_fn(y, embeddings))
    target_losses = [float(loss_fn(y, t)) for t in targets]
    distillation = np.mean([reference_distillation(embeddings, t, 0.5) for t in targets])
    feature = reference_distillation(embeddings, features, 0.5)
    expected = 0.5 * (base + np.mean(target_losses)) + 3.0 * distillation

    terms = model.compute_loss_terms(x, y, training=True)
    assert float(np_(terms["base_loss"])) == pytest.approx(base, rel=1e-5)
    assert float(np_(terms["target_24_loss"])) == pytest.approx(target_losses[1], rel=1e-5)
    assert float(np_(terms["distillation"])) == pytest.approx(distillation, rel=1e-4)
    assert float(np_(terms["feature_distillation"])) == pytest.approx(feature, rel=1e-4)
    # Feature distillation waits `feature_distillation_delay` training steps.
    for step in range(3):
        loss = float(np_(model.compute_loss(x, y, outputs, training=True)))
        switched_on = step >= 2
        assert loss == pytest.approx(expected + 7.0 * feature * switched_on, rel=1e-4)
    assert int(np_(model.feature_distillation_step)) == 3


def test_distillation_warmup_ramps_gamma_linearly_then_holds_it():
    keras.utils.set_random_seed(0)
    x, y = make_data(n=16)
    model = S2SD(make_backbone(), embedding_dim=4, target_dims=(8,), distillation_weight=3.0,
                 distillation_warmup=4)
    loss_fn = keras_dml.TripletLoss(margin=0.2)
    model.compile(optimizer="sgd", loss=loss_fn)
    outputs = model(x, training=True)
    terms = model.compute_loss_terms(x, y, training=True)
    metric = 0.5 * (float(np_(terms["base_loss"])) + float(np_(terms["target_8_loss"])))
    distillation = float(np_(terms["distillation"]))
    assert distillation > 0
    for step in range(6):
        loss = float(np_(model.compute_loss(x, y, outputs, training=True)))
        ramp = min(1.0, (step + 1) / 4)
        assert loss == pytest.approx(metric + 3.0 * ramp * distillation, rel=1e-5)
    # Evaluation does not advance the warm-up.
    model.compute_loss(x, y, outputs, training=False)
    assert int(np_(model._training_step)) == 6
    # No warm-up and no feature distillation: no step variable, the weights of old models.
    plain = S2SD(make_backbone(), embedding_dim=4, target_dims=(8,), distillation_warmup=0)
    assert plain._training_step is None


def test_distillation_warmup_round_trips_and_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="distillation_warmup"):
        S2SD(make_backbone(), distillation_warmup=-1)
    with pytest.raises(ValueError, match="distillation_warmup"):
        S2SD(make_backbone(), distillation_warmup=2.5)
    x, y = make_data(n=16)
    model = S2SD(make_backbone(), embedding_dim=4, target_dims=(8,), distillation_warmup=10)
    model.compile(optimizer="adam", loss=keras_dml.MultiSimilarityLoss())
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert S2SD.from_config(model.get_config()).distillation_warmup == 10
    path = str(tmp_path / "s2sd.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.distillation_warmup == 10
    assert int(np_(loaded._training_step)) == 2
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-6)


# -- training, inference, serialisation --------------------------------------------


def digits_zero_to_four():
    digits = load_digits()
    keep = digits.target < 5
    return digits.data[keep].astype("float32") / 16.0, digits.target[keep].astype("int32")


def test_fit_on_digits_loss_falls_and_each_term_is_logged():
    keras.utils.set_random_seed(0)
    x, y = digits_zero_to_four()
    backbone = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu")])
    model = S2SD(backbone, embedding_dim=16, target_dims=(64, 128), feature_distillation=True,
                 feature_distillation_delay=0)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=keras_dml.MultiSimilarityLoss())
    history = model.fit(x, y, batch_size=64, epochs=10, verbose=0).history

    assert set(history) == {
        "loss", "base_loss", "target_64_loss", "target_128_loss", "distillation",
        "feature_distillation",
    }
    assert all(np.all(np.isfinite(values)) for values in history.values())
    # The distillation terms grow while the targets pull away from f, so the
    # total falls less, and less steadily, than the metric losses.
    assert history["loss"][-1] < 0.9 * history["loss"][0]
    assert history["base_loss"][-1] < 0.6 * history["base_loss"][0]
    assert history["target_128_loss"][-1] < 0.5 * history["target_128_loss"][0]
    # evaluate() reports the same terms, on the same scale.
    result = model.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    assert set(result) == set(history)
    assert result["base_loss"] < history["base_loss"][0]
    assert model.predict(x[:5], verbose=0).shape == (5, 16)


def small_signals(n=256, classes=4, length=32, seed=0):
    """Noisy sinusoids, one frequency per class, random phase: a small 1-D task."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    t = np.arange(length)
    frequencies = np.array([1.0, 2.0, 3.0, 5.0])[labels]
    phases = rng.uniform(0, 2 * np.pi, size=n)
    x = np.sin(2 * np.pi * frequencies[:, None] * t / length + phases[:, None])
    x = x + 0.5 * rng.normal(size=(n, length))
    return x[..., None].astype("float32"), labels.astype("int32")


def small_conv_backbone():
    return keras.Sequential(
        [
            keras.Input((32, 1)),
            keras.layers.Conv1D(16, 5, activation="relu"),
            keras.layers.Conv1D(32, 3, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling1D(),
        ],
        name="backbone",
    )


def test_default_distillation_does_not_stall_the_base_loss_on_a_small_backbone():
    # Issue 14: with the distillation's gradient reaching a small from-scratch
    # backbone (`distillation_into_backbone=True`, the paper's routing), the
    # backbone settles where f's and the targets' similarity matrices agree
    # and f's metric loss barely falls. The default must learn like the plain
    # model: f's loss falls by at least half as much in the same steps.
    x, y = small_signals()

    def base_loss_curve(model, key):
        model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=keras_dml.MultiSimilarityLoss())
        return model.fit(x, y, batch_size=64, epochs=8, verbose=0).history[key]

    keras.utils.set_random_seed(0)
    plain = keras.Sequential(
        [small_conv_backbone(), keras.layers.Dense(32), keras.layers.UnitNormalization()]
    )
    plain_curve = base_loss_curve(plain, "loss")
    keras.utils.set_random_seed(0)
    # Defaults except the widths, kept small for speed (4x and 8x f, as the paper's 4-16x).
    s2sd_curve = base_loss_curve(
        S2SD(small_conv_backbone(), embedding_dim=32, target_dims=(128, 256)), "base_loss"
    )
    plain_drop = plain_curve[0] - plain_curve[-1]
    s2sd_drop = s2sd_curve[0] - s2sd_curve[-1]
    assert plain_drop > 0.5  # the plain model does learn here
    assert s2sd_drop >= 0.5 * plain_drop, (plain_curve, s2sd_curve)


def test_inference_uses_backbone_and_f_only():
    keras.utils.set_random_seed(0)
    x, _ = make_data()
    model = S2SD(make_backbone(), embedding_dim=4, target_dims=(32, 64))
    embedding_model = model.embedding_model()
    # backbone 12x16+16, f 16x4+4: the target heads' 1k+5k weights are not there.
    assert embedding_model.count_params() == 12 * 16 + 16 + 16 * 4 + 4
    np.testing.assert_allclose(embedding_model.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(model.predict(x, verbose=0), axis=1), 1.0, rtol=1e-5)
    assert set(model(x, training=True)) == {"embeddings", "features"}


def test_keras_save_load_round_trip(tmp_path):
    keras.utils.set_random_seed(0)
    x, y = make_data()
    model = S2SD(make_backbone(), embedding_dim=4, target_dims=(8, 16), temperature=2.0,
                 distillation_weight=10.0, feature_distillation=True,
                 feature_distillation_delay=3)
    model.compile(optimizer="adam", loss=keras_dml.MultiSimilarityLoss(alpha=3.0))
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)

    path = tmp_path / "s2sd.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, S2SD)
    # JSON-normalised: a reloaded config holds lists where the original had tuples.
    assert json.dumps(loaded.get_config(), sort_keys=True) == json.dumps(
        model.get_config(), sort_keys=True
    )
    assert loaded.target_dims == (8, 16) and loaded.feature_distillation_delay == 3
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-6, atol=1e-6)
    for a, b in zip(loaded.weights, model.weights, strict=True):
        np.testing.assert_array_equal(np_(a), np_(b))
    assert int(np_(loaded.feature_distillation_step)) == 6  # 2 epochs x 3 steps
    # The compiled loss and optimizer come back: training goes on.
    assert loaded.loss.get_config()["alpha"] == 3.0
    history = loaded.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0])

    embedding_path = tmp_path / "embedding.keras"
    model.embedding_model().save(embedding_path)
    reloaded = keras.models.load_model(embedding_path)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-6, atol=1e-6)


def test_margin_head_on_every_branch(tmp_path):
    from keras_dml.heads import ArcFace

    keras.utils.set_random_seed(0)
    x, y = make_data()
    model = S2SD(make_backbone(), embedding_dim=4, target_dims=(8, 16),
                 base_head=ArcFace(4, scale=16.0, margin=0.2))
    # No loss given: sparse categorical cross-entropy on each head's logits.
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = model.fit(x, y, batch_size=16, epochs=4, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    assert [tuple(h.kernel.shape) for h in (model.base_head, *model.target_margin_heads)] == [
        (4, 4), (8, 4), (16, 4)
    ]
    terms = model.compute_loss_terms(x, y)
    logits = model.base_head(model.predict(x, verbose=0), y)
    ce = np.mean(np_(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)))
    assert float(np_(terms["base_loss"])) == pytest.approx(ce, rel=1e-4)

    path = tmp_path / "s2sd_arcface.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np_(loaded.target_margin_heads[1].kernel),
                                  np_(model.target_margin_heads[1].kernel))


def test_bad_arguments_raise_value_errors():
    backbone = make_backbone()
    with pytest.raises(ValueError, match="target_dims"):
        S2SD(backbone, target_dims=(64, 0))
    with pytest.raises(ValueError, match="repeat"):
        S2SD(backbone, target_dims=(64, 64))
    with pytest.raises(ValueError, match="temperature"):
        S2SD(backbone, temperature=-1.0)
    with pytest.raises(ValueError, match="distillation_weight"):
        S2SD(backbone, distillation_weight=float("nan"))
    with pytest.raises(ValueError, match="feature_distillation_delay"):
        S2SD(backbone, feature_distillation_delay=1.5)
    with pytest.raises(ValueError, match=r"\(batch, F\)"):
        S2SD(keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Conv2D(2, 3)]))
    model = S2SD(backbone, embedding_dim=4, target_dims=(8,))
    x, y = make_data(n=8)
    with pytest.raises(ValueError, match="integer class labels"):
        model.compute_loss_terms(x, y + 0.5)
    model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="needs a metric loss"):
        model.compute_loss_terms(x, y)


# -- tf.distribute -------------------------------------------------------------------

MIRRORED_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )
    import keras
    import keras_dml
    from keras_dml.models.s2sd import S2SD

    def build(cross_replica=True):
        backbone = keras.Sequential([keras.Input((12,)), keras.layers.Dense(16, "relu")])
        return S2SD(backbone, embedding_dim=4, target_dims=(8, 16), distillation_weight=5.0,
                    feature_distillation=True, feature_distillation_delay=0,
                    distillation_warmup=0, cross_replica=cross_replica)

    rng = np.random.default_rng(0)
    y = (np.arange(32) % 4).astype("int32")
    x = (rng.normal(size=(4, 12))[y] * 2 + rng.normal(size=(32, 12))).astype("float32")

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2

    def pair(cross_replica):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = build(cross_replica)
            model.compile(optimizer=keras.optimizers.SGD(0.1),
                          loss=keras_dml.MultiSimilarityLoss(cross_replica=cross_replica))
        reference = build(cross_replica)
        reference.compile(optimizer=keras.optimizers.SGD(0.1),
                          loss=keras_dml.MultiSimilarityLoss(cross_replica=cross_replica))
        reference.set_weights(model.get_weights())
        return model, reference

    # Per-replica S2SD: when both replicas see the same 16 samples, one step must
    # move the weights exactly like one single-device step on those 16 samples.
    model, reference = pair(cross_replica=False)
    x16, y16 = x[:16], y[:16]
    model.fit(np.concatenate([x16, x16]), np.concatenate([y16, y16]), batch_size=32,
              epochs=1, shuffle=False, verbose=0)
    reference.fit(x16, y16, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

    # Cross-replica S2SD (the default): a step on 2 x 16 samples equals one
    # single-device step on the global batch of 32.
    model, reference = pair(cross_replica=True)
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    reference.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert int(model.feature_distillation_step.numpy()) == 1

    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0).history
    for values in history.values():
        assert np.all(np.isfinite(values)), history
    for epoch in range(2):
        h = {k: v[epoch] for k, v in history.items()}
        combined = (0.5 * (h["base_loss"] + (h["target_8_loss"] + h["target_16_loss"]) / 2)
                    + 5.0 * h["distillation"] + 5.0 * h["feature_distillation"])
        assert abs(h["loss"] - combined) < 1e-4 * max(1.0, abs(combined)), (h, combined)
    print("MIRRORED_OK", history["loss"])
    """
)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="tf.distribute.MirroredStrategy is TensorFlow's"
)
def test_fit_under_mirrored_strategy_with_two_cpu_replicas():
    # Logical devices must be configured before TensorFlow initialises them,
    # which this test process has already done: run in a fresh interpreter.
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT], capture_output=True, text=True, env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "MIRRORED_OK" in result.stdout
