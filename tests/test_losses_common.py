"""What every exported loss promises: serialisation, compile/fit/save, input errors."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_dml

ALL_LOSSES = [
    keras_dml.TripletLoss(margin=0.3, negative_mining="all", positive_mining="hard"),
    keras_dml.TripletSemiHardLoss(margin=0.5, distance_metric="angular"),
    keras_dml.TripletHardLoss(soft=True),
    keras_dml.ContrastiveLoss(),
    keras_dml.NPairsLoss(),
    keras_dml.MultiSimilarityLoss(),
    keras_dml.CircleLoss(),
    keras_dml.LiftedStructLoss(),
    keras_dml.NTXentLoss(),
    keras_dml.SupConLoss(),
    keras_dml.QuadrupletLoss(),
    keras_dml.MarginLoss(),
    keras_dml.NCALoss(),
    keras_dml.TupletMarginLoss(),
    keras_dml.AngularLoss(),
    keras_dml.GeneralizedLiftedStructureLoss(),
    keras_dml.IntraPairVarianceLoss(),
    keras_dml.SignalToNoiseRatioContrastiveLoss(),
    keras_dml.RankedListLoss(),
    keras_dml.InstanceLoss(),
    keras_dml.ThresholdConsistentMarginLoss(),
    keras_dml.FastAPLoss(),
    keras_dml.SmoothAPLoss(),
    keras_dml.PNPLoss(),
    keras_dml.HistogramLoss(),
    keras_dml.VICRegLoss(),
    # momentum=1.0: a compiled JAX fit cannot carry the running histogram (see its docstring).
    keras_dml.DynamicSoftMarginLoss(momentum=1.0),
    keras_dml.MultipleLosses([keras_dml.ContrastiveLoss(), keras_dml.TripletLoss()], [1.0, 0.5]),
]
IDS = [type(loss).__name__ for loss in ALL_LOSSES]


def test_every_public_loss_is_covered():
    public = {
        name
        for name in keras_dml.losses.__all__
        if name[0].isupper() and name != "MetricLoss"
    }
    assert public == set(IDS)


def batch(n=8, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n // 2), 2).astype("int32")  # two views/samples per class
    return labels, rng.normal(size=(n, dim)).astype("float32")


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=IDS)
def test_config_round_trip(loss):
    config = loss.get_config()
    clone = type(loss).from_config(config)
    assert clone.get_config() == config
    labels, x = batch()
    np.testing.assert_allclose(float(clone(labels, x)), float(loss(labels, x)), rtol=1e-6)
    # And through Keras's generic serialisation, by registered name.
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is type(loss)
    assert restored.get_config() == config


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=IDS)
def test_labels_shape_b1_equals_b(loss):
    labels, x = batch()
    np.testing.assert_allclose(
        float(loss(labels[:, None], x)), float(loss(labels, x)), rtol=1e-6
    )


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=IDS)
def test_compile_fit_save_load(loss, tmp_path):
    labels, x = batch(n=32, dim=6)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(4), keras.layers.UnitNormalization()]
    )
    model.compile(optimizer="adam", loss=loss)
    history = model.fit(x, labels, batch_size=16, epochs=2, verbose=0, shuffle=False)
    assert np.all(np.isfinite(history.history["loss"]))
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert type(restored.loss) is type(loss)
    assert restored.loss.get_config() == loss.get_config()
    np.testing.assert_allclose(restored.predict(x, verbose=0), model.predict(x, verbose=0))
    np.testing.assert_allclose(
        restored.evaluate(x, labels, batch_size=32, verbose=0),
        model.evaluate(x, labels, batch_size=32, verbose=0),
        rtol=1e-5,
    )


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=IDS)
def test_bad_inputs_raise_value_errors_naming_the_argument(loss):
    labels, x = batch()
    with pytest.raises(ValueError, match="y_pred"):
        loss(labels, x[:, :, None])  # rank 3 embeddings
    if loss.supports_multi_label:
        # (B, 2) labels are multi-hot label sets for these losses (issue 19); their rows
        # must still match the embeddings.
        with pytest.raises(ValueError, match="y_true"):
            loss(np.stack([labels, labels], axis=1)[:-2], x)
    else:
        with pytest.raises(ValueError, match="y_true"):
            loss(np.stack([labels, labels], axis=1), x)  # (B, 2) labels
    with pytest.raises(ValueError, match="y_true"):
        loss(labels[:, None, None], x)  # rank 3 labels
    with pytest.raises(ValueError, match="y_true"):
        loss(labels[:-2], x)  # mismatched batch sizes
    with pytest.raises(ValueError, match="y_true"):
        loss(labels + 0.5, x)  # not integer class ids
    with pytest.raises(ValueError, match="y_true"):
        loss(np.array(["a"] * len(labels)), x)
    with pytest.raises(ValueError, match="y_pred"):
        loss(labels[:0], x[:0])  # empty batch
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="y_pred"):
        loss(labels, bad)


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=IDS)
def test_float_labels_with_whole_values_are_accepted(loss):
    labels, x = batch()
    np.testing.assert_allclose(
        float(loss(labels.astype("float32"), x)), float(loss(labels, x)), rtol=1e-6
    )


_KERAS_KEYS = {"name", "reduction", "dtype", "cross_replica"}


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=IDS)
def test_options_are_read_only_attributes(loss):
    # One store of the settings: every option reads as an attribute with its config
    # value, and assigning one raises instead of silently doing nothing.
    clone = type(loss).from_config(loss.get_config())
    options = {k: v for k, v in clone.get_config().items() if k not in _KERAS_KEYS}
    assert options  # every loss has options
    for option, value in options.items():
        assert getattr(clone, option) == value
        with pytest.raises(AttributeError, match=f"`{option}` of {type(loss).__name__}"):
            setattr(clone, option, value)
    assert clone.get_config() == loss.get_config()


def test_contrastive_neg_margin_cannot_be_changed_silently():
    loss = keras_dml.ContrastiveLoss(distance="L2")
    assert loss.distance == "euclidean"  # stored canonical, as TripletLoss does
    with pytest.raises(AttributeError, match="read-only"):
        loss.neg_margin = 2.0
    assert loss.neg_margin == 1.0 and loss.get_config()["neg_margin"] == 1.0
