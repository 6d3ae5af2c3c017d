"""LoCo: gradient isolation between units, the unit-by-unit train step, saving, a digits run.

The train step is TensorFlow-only (see the LoCo docstring), so this file is
not in tests/backend_agnostic.txt.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_dml.data.augment import SimCLRAugmentation
from keras_dml.losses.ntxent import nt_xent_loss
from keras_dml.losses.supcon import supcon_loss
from keras_dml.models.loco import LoCo, LoCoDecoder

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="LoCo's train step needs TensorFlow"
)


def dense_stages(n=4, width=8):
    return [
        keras.Sequential([keras.layers.Dense(width, activation="tanh")], name=f"stage_{i}")
        for i in range(n)
    ]


def conv_stages():
    """Three small stages for 8x8x1 images: 8x8, 4x4, then 2x2 pooled."""
    def conv(filters, strides):
        return [keras.layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False),
                keras.layers.BatchNormalization(momentum=0.9), keras.layers.ReLU()]

    return [
        keras.Sequential(conv(8, 1), name="stage_0"),
        keras.Sequential(conv(16, 2), name="stage_1"),
        keras.Sequential(conv(32, 2) + [keras.layers.GlobalAveragePooling2D()], name="stage_2"),
    ]


def dense_model(**kwargs):
    keras.utils.set_random_seed(0)
    model = LoCo(dense_stages(), augment=keras.layers.GaussianNoise(0.1, seed=0),
                 projection_dim=4, **kwargs)
    model.build((None, 6))
    return model


def gradient_norms(model, x, y=None):
    """`norms[k][s]`: norm of unit k's loss gradient w.r.t. stage s (0 where none flows)."""
    with tf.GradientTape(persistent=True) as tape:
        losses = model.compute_unit_losses(x, y, training=True)
    norms = []
    for loss in losses:
        row = []
        for stage in [*model.stages, *model.decoders]:
            grads = tape.gradient(loss, stage.trainable_variables)
            row.append(sum(float(tf.norm(g)) for g in grads if g is not None))
        norms.append(row)
    del tape
    return np.array(norms)


@pytest.fixture
def x(rng):
    return rng.normal(size=(16, 6)).astype("float32")


def test_loco_units_overlap_by_one_stage():
    assert dense_model().unit_stages == ((0, 1), (1, 2), (2, 3))
    assert dense_model(overlap=0).unit_stages == ((0,), (1,), (2,), (3,))
    assert dense_model(overlap=2).unit_stages == ((0, 1, 2), (1, 2, 3))
    assert dense_model(end_to_end=True).unit_stages == ((0, 1, 2, 3),)


@pytest.mark.parametrize("overlap", [0, 1])
def test_a_unit_loss_reaches_exactly_its_own_stages_and_decoder(overlap, x):
    model = dense_model(overlap=overlap)
    norms = gradient_norms(model, x)
    n_stages = len(model.stages)
    for k, unit in enumerate(model.unit_stages):
        for s in range(n_stages):
            if s in unit:
                assert norms[k, s] > 0, f"unit {k} must train stage {s}"
            else:
                assert norms[k, s] == 0, f"unit {k} leaked a gradient into stage {s}"
        decoders = norms[k, n_stages:]
        assert decoders[k] > 0 and np.all(np.delete(decoders, k) == 0)


def test_overlapping_stage_gets_gradients_from_two_units(x):
    norms = gradient_norms(dense_model(overlap=1), x)[:, :4]
    units_per_stage = (norms > 0).sum(axis=0)
    # The gradient bridge: inner stages are trained by two losses, the ends by one.
    np.testing.assert_array_equal(units_per_stage, [1, 2, 2, 1])
    gim = gradient_norms(dense_model(overlap=0), x)[:, :4]
    np.testing.assert_array_equal((gim > 0).sum(axis=0), [1, 1, 1, 1])


def test_end_to_end_loss_reaches_every_stage(x):
    norms = gradient_norms(dense_model(end_to_end=True), x)
    assert norms.shape == (1, 5) and np.all(norms > 0)


def test_train_step_applies_the_sum_of_the_unit_gradients(x):
    # Deterministic views (no augmentation) so the step can be recomputed by hand.
    keras.utils.set_random_seed(0)
    model = LoCo(dense_stages(), augment=keras.layers.Identity(), projection_dim=4)
    model.build((None, 6))
    y = np.arange(16) % 4
    with tf.GradientTape() as tape:
        losses = model.compute_unit_losses(x, y, training=True)
        total = tf.add_n(losses)
    variables = model.trainable_variables
    expected_grads = tape.gradient(total, variables)
    before = [v.numpy() for v in variables]
    learning_rate = 0.5
    model.compile(optimizer=keras.optimizers.SGD(learning_rate))
    logs = model.train_on_batch(x, y, return_dict=True)
    for v, w, g in zip(variables, before, expected_grads, strict=True):
        np.testing.assert_allclose(v.numpy(), w - learning_rate * g.numpy(), atol=1e-5,
                                   err_msg=v.path)
    np.testing.assert_allclose(logs["loss"], float(total), rtol=1e-5)
    for k, loss in enumerate(losses):
        np.testing.assert_allclose(logs[f"unit_{k}_loss"], float(loss), rtol=1e-5)
    assert int(model.optimizer.iterations) == 1  # one optimizer step, not one per unit


def test_labels_switch_the_unit_loss_to_supcon(x):
    keras.utils.set_random_seed(0)
    model = LoCo(dense_stages(2), augment=keras.layers.Identity(), projection_dim=4,
                 temperature=0.5)
    model.build((None, 6))
    z = model.decoders[0](model.stages[1](model.stages[0](x)))
    views = np.concatenate([z, z])
    labels = np.arange(16) % 3
    (unsupervised,) = model.compute_unit_losses(x)
    (supervised,) = model.compute_unit_losses(x, labels)
    (instances,) = model.compute_unit_losses(x, np.arange(16))
    np.testing.assert_allclose(unsupervised, nt_xent_loss(z, z, temperature=0.5), rtol=1e-5)
    np.testing.assert_allclose(
        supervised,
        supcon_loss(np.concatenate([labels, labels]), views, temperature=0.5,
                    base_temperature=0.5),
        rtol=1e-5,
    )
    # One label per instance: SupCon is NT-Xent, so both modes are on one scale.
    np.testing.assert_allclose(instances, unsupervised, rtol=1e-5)


def test_a_shared_stage_weight_penalty_is_counted_once(x):
    keras.utils.set_random_seed(0)
    stages = dense_stages(3)
    stages[1] = keras.Sequential(
        [keras.layers.Dense(8, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.5))]
    )
    model = LoCo(stages, augment=keras.layers.Identity(), projection_dim=4)
    model.build((None, 6))
    losses = [float(v) for v in model.compute_unit_losses(x)]
    h0 = model.stages[0](x)
    h1 = model.stages[1](h0)
    z0 = model.decoders[0](h1)
    z1 = model.decoders[1](model.stages[2](h1))
    penalty = 0.5 * float(np.sum(model.stages[1].layers[0].kernel.numpy() ** 2))
    # Stage 1 is in both units; its penalty goes to the later one only.
    np.testing.assert_allclose(losses[0], float(nt_xent_loss(z0, z0)), rtol=1e-5)
    np.testing.assert_allclose(losses[1], float(nt_xent_loss(z1, z1)) + penalty, rtol=1e-5)


def test_decoder_adds_a_downsampling_residual_block_on_spatial_inputs():
    spatial = LoCoDecoder(projection_dim=8)
    assert tuple(spatial(np.zeros((2, 8, 8, 6), "float32")).shape) == (2, 8)
    assert spatial.conv_1.strides == (2, 2) and spatial.conv_1.filters == 6
    flat = LoCoDecoder(projection_dim=8, hidden_dim=5)
    assert tuple(flat(np.zeros((2, 6), "float32")).shape) == (2, 8)
    assert not hasattr(flat, "conv_1") and flat.hidden.units == 5


def _layers_reading_the_input(decoder, shape):
    """Names of the decoder's weight layers whose kernels see the stage's channel count."""
    layers = (getattr(decoder, n, None) for n in ("conv_1", "shortcut", "conv_2"))
    return sorted(
        layer.name for layer in layers
        if layer is not None and layer.kernel.shape[-2] == shape[-1]
    )


def test_default_decoder_reads_the_stage_output_once():
    # Every op that reads the stage's full-resolution output adds a full-resolution
    # gradient to the unit's backward pass: the default block has one such op.
    x = np.zeros((2, 8, 8, 6), "float32")
    default = LoCoDecoder(projection_dim=8, filters=4)
    default(x)
    assert default.block == "downsample" and not hasattr(default, "shortcut")
    assert _layers_reading_the_input(default, x.shape) == ["conv_1"]
    resnet = LoCoDecoder(projection_dim=8, filters=4, block="resnet")
    resnet(x)
    assert _layers_reading_the_input(resnet, x.shape) == ["conv_1", "shortcut"]
    bare = LoCoDecoder(projection_dim=8, block="none")
    assert tuple(bare(x).shape) == (2, 8)
    assert not hasattr(bare, "conv_1") and bare.hidden.kernel.shape == (6, 6)
    with pytest.raises(ValueError, match="block"):
        LoCoDecoder(block="bottleneck")
    with pytest.raises(ValueError, match="decoder_block"):
        LoCo(dense_stages(), decoder_block="wide")


def test_decoder_block_round_trips_and_old_configs_keep_the_resnet_block():
    model = LoCo(conv_stages(), decoder_block="none", projection_dim=8)
    assert LoCo.from_config(model.get_config()).decoder_block == "none"
    assert all(d.block == "none" for d in LoCo.from_config(model.get_config()).decoders)
    old = model.get_config()
    del old["decoder_block"]  # saved before the option existed
    assert LoCo.from_config(old).decoder_block == "resnet"
    config = LoCoDecoder(projection_dim=8).get_config()
    assert config["block"] == "downsample"
    del config["block"]
    assert LoCoDecoder.from_config(config).block == "resnet"


@pytest.mark.parametrize("dataset", [False, True])
def test_unit_wise_train_function_equals_the_single_graph_step(dataset, rng):
    # fit runs each unit as its own graph call; run_eagerly runs `train_step` itself.
    images = rng.random((32, 8, 8, 1)).astype("float32")
    weights = {}
    for eager in (False, True):
        keras.utils.set_random_seed(0)
        model = LoCo(conv_stages(), augment=keras.layers.Identity(), projection_dim=8)
        model.compile(optimizer=keras.optimizers.Adam(1e-2), run_eagerly=eager,
                      steps_per_execution=2)
        data = tf.data.Dataset.from_tensor_slices(images).batch(8) if dataset else images
        history = model.fit(data, batch_size=8, epochs=2, shuffle=False, verbose=0)
        assert int(model.optimizer.iterations) == 8
        weights[eager] = ([v.numpy() for v in model.trainable_variables],
                          history.history["loss"])
    for a, b in zip(weights[False][0], weights[True][0], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(weights[False][1], weights[True][1], rtol=1e-4)


_MEMORY_SCRIPT = """
import json, os
import keras, numpy as np, tensorflow as tf
from keras_dml.models.loco import LoCo

def stages():
    # 32x32x3 images; channels x4 as the resolution halves: each stage holds the same
    # activations, so end-to-end holds 4 stages' worth, LoCo 2, GIM 1.
    out = []
    for i, channels in enumerate((4, 16, 64, 256)):
        out.append(keras.Sequential([
            keras.layers.Conv2D(channels, 3, strides=1 if i == 0 else 2, padding="same",
                                activation="relu"),
            keras.layers.Conv2D(channels, 3, padding="same", activation="relu")]))
    out[-1].add(keras.layers.GlobalAveragePooling2D())
    return out

x = np.random.default_rng(0).random((64, 32, 32, 3)).astype("float32")
peaks = {}
for name, kwargs in (("end-to-end", {"end_to_end": True}), ("LoCo", {"overlap": 1}),
                     ("GIM", {"overlap": 0})):
    keras.utils.set_random_seed(0)
    model = LoCo(stages(), projection_dim=32, **kwargs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.train_on_batch(x)
    step_peaks = []
    for _ in range(2):
        in_use = tf.config.experimental.get_memory_info("CPU:0")["current"]
        tf.config.experimental.reset_memory_stats("CPU:0")
        model.train_on_batch(x)
        step_peaks.append(tf.config.experimental.get_memory_info("CPU:0")["peak"] - in_use)
    peaks[name] = min(step_peaks)
print(json.dumps(peaks))
"""


def test_step_peak_memory_orders_gim_below_loco_below_end_to_end():
    # TensorFlow's allocator peak of one training step on 32x32 images, in a fresh process
    # so that no other test's tensors or traced functions are counted.
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    assert peaks["GIM"] < peaks["LoCo"] < peaks["end-to-end"], peaks


def test_save_and_load_round_trip(tmp_path, rng):
    keras.utils.set_random_seed(0)
    model = LoCo(conv_stages(), overlap=1, temperature=0.2, projection_dim=8,
                 augment=SimCLRAugmentation(seed=1, rotation=5.0), name="loco")
    model.build((None, 8, 8, 1))
    images = rng.random((4, 8, 8, 1)).astype("float32")
    path = tmp_path / "loco.keras"
    model.save(path)
    restored = keras.saving.load_model(path)

    assert isinstance(restored, LoCo) and restored.unit_stages == model.unit_stages
    assert restored.get_config()["temperature"] == 0.2
    assert restored.augment.get_config()["rotation"] == 5.0
    np.testing.assert_allclose(restored.predict(images, verbose=0),
                               model.predict(images, verbose=0), atol=1e-6)
    for a, b in zip(model.decoders, restored.decoders, strict=True):
        for wa, wb in zip(a.weights, b.weights, strict=True):
            np.testing.assert_array_equal(wa.numpy(), wb.numpy())
    np.testing.assert_allclose(restored.encoder().predict(images, verbose=0),
                               model.encoder().predict(images, verbose=0), atol=1e-6)
    clone = LoCo.from_config(model.get_config())
    assert clone.unit_stages == model.unit_stages and len(clone.decoders) == 2


def test_encoder_is_a_plain_model_sharing_the_trained_weights(rng):
    model = LoCo(conv_stages()[:2], projection_dim=8)
    with pytest.raises(ValueError, match="Build"):
        model.encoder()
    images = rng.random((3, 8, 8, 1)).astype("float32")
    model(images)
    encoder = model.encoder()
    assert isinstance(encoder, keras.Model) and not isinstance(encoder, LoCo)
    assert encoder.count_params() == sum(s.count_params() for s in model.stages)
    np.testing.assert_allclose(encoder.predict(images, verbose=0), model(images), atol=1e-6)
    assert tuple(encoder.output.shape) == (None, 4, 4, 16)
    assert tuple(model.encoder(pooling="avg").output.shape) == (None, 16)


def test_short_fit_on_digits_lowers_every_unit_loss(tmp_path):
    from sklearn.datasets import load_digits

    images = (load_digits().images[:1024] / 16.0).astype("float32")[..., None]
    keras.utils.set_random_seed(0)
    model = LoCo(conv_stages(), overlap=1, temperature=0.2, projection_dim=16,
                 augment=SimCLRAugmentation(seed=0))
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    dataset = (tf.data.Dataset.from_tensor_slices(images).shuffle(1024, seed=0)
               .batch(128, drop_remainder=True))
    history = model.fit(dataset, epochs=6, shuffle=False, verbose=0).history
    assert sorted(history) == ["loss", "unit_0_loss", "unit_1_loss"]
    for name in ("unit_0_loss", "unit_1_loss"):
        first, last = history[name][0], history[name][-1]
        assert np.isfinite(last) and last < 0.9 * first, (name, history[name])
    np.testing.assert_allclose(
        history["loss"][-1], history["unit_0_loss"][-1] + history["unit_1_loss"][-1], rtol=1e-4
    )
    logs = model.evaluate(images[:256], batch_size=128, verbose=0, return_dict=True)
    assert sorted(logs) == ["loss", "unit_0_loss", "unit_1_loss"]
    assert model.encoder().predict(images[:5], verbose=0).shape == (5, 32)

    # The trained, compiled model round-trips with its optimizer state.
    model.save(tmp_path / "trained.keras")
    restored = keras.saving.load_model(tmp_path / "trained.keras")
    assert int(restored.optimizer.iterations) == int(model.optimizer.iterations) == 6 * 8
    np.testing.assert_allclose(restored.predict(images[:64], verbose=0),
                               model.predict(images[:64], verbose=0), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(stages=[]), "stages"),
        (dict(stages=[keras.layers.Dense(2), "relu"]), r"stages\[1\]"),
        (dict(overlap=4), "overlap"),
        (dict(overlap=-1), "overlap"),
        (dict(overlap=1.0), "overlap"),
        (dict(temperature=0.0), "temperature"),
        (dict(augment="flip"), "augment"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, match):
    kwargs = {"stages": dense_stages(), **kwargs}
    with pytest.raises(ValueError, match=match):
        LoCo(**kwargs)


def test_rejects_sample_weights_and_non_integer_labels(x):
    model = dense_model()
    with pytest.raises(ValueError, match="integer class labels"):
        model.compute_unit_losses(x, np.zeros(16, "float32"))
    model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="sample_weight"):
        model.train_on_batch(x, sample_weight=np.ones(16, "float32"))


def test_docstring_examples_run():
    import doctest

    from keras_dml.models import loco

    assert doctest.testmod(loco).failed == 0
