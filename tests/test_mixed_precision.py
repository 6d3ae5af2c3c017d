"""Mixed precision: every loss, head and model trains 3 epochs on digits with no NaN or Inf.

Under `mixed_float16` and `mixed_bfloat16` the layers compute in half
precision; the losses and heads must compute their log-sum-exps and softmaxes
(scales up to s = 64, circle's gamma = 256) in float32 and return float32.
Kept small: a 64-d digits subset, a two-layer backbone, 3 epochs of 2 steps.
Backend-agnostic except LoCo, whose train step is TensorFlow's.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import mixed_precision
from keras import ops
from sklearn.datasets import load_digits

import keras_dml
from keras_dml import heads
from keras_dml.models import S2SD, MarginModel, SiameseModel, make_pairs

POLICIES = ["mixed_float16", "mixed_bfloat16"]
BATCH = 64


def digits(n=128):
    data = load_digits()
    # Sorted by class, then interleaved: every batch of 64 holds all 10 classes.
    per_class = [np.flatnonzero(data.target == c)[: n // 10 + 1] for c in range(10)]
    order = np.stack(per_class, axis=1).reshape(-1)[:n]
    return (data.data[order] / 16.0).astype("float32"), data.target[order].astype("int32")


def backbone(out=16):
    return keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(out)]
    )


def assert_trained(history, model):
    for name, values in history.history.items():
        assert np.all(np.isfinite(values)), (name, values)
    for weight in model.get_weights():
        assert np.all(np.isfinite(np.asarray(weight, "float32")))


def make_losses():
    return {
        "TripletLoss": keras_dml.TripletLoss(),
        "TripletSemiHardLoss": keras_dml.TripletSemiHardLoss(),
        "TripletHardLoss": keras_dml.TripletHardLoss(soft=True),
        "ContrastiveLoss": keras_dml.ContrastiveLoss(),
        "NPairsLoss": keras_dml.NPairsLoss(),
        "MultiSimilarityLoss": keras_dml.MultiSimilarityLoss(),
        "CircleLoss": keras_dml.CircleLoss(),  # gamma = 256
        "LiftedStructLoss": keras_dml.LiftedStructLoss(),
        "SupConLoss": keras_dml.SupConLoss(),
        "NTXentLoss": keras_dml.NTXentLoss(),
        "QuadrupletLoss": keras_dml.QuadrupletLoss(),
        "MarginLoss": keras_dml.MarginLoss(),
        "NCALoss": keras_dml.NCALoss(),
        "TupletMarginLoss": keras_dml.TupletMarginLoss(),  # scale 64
        "AngularLoss": keras_dml.AngularLoss(),
        "GeneralizedLiftedStructureLoss": keras_dml.GeneralizedLiftedStructureLoss(),
        "IntraPairVarianceLoss": keras_dml.IntraPairVarianceLoss(),
        "SignalToNoiseRatioContrastiveLoss": keras_dml.SignalToNoiseRatioContrastiveLoss(),
        "RankedListLoss": keras_dml.RankedListLoss(),
        "InstanceLoss": keras_dml.InstanceLoss(),  # gamma 64
        "ThresholdConsistentMarginLoss": keras_dml.ThresholdConsistentMarginLoss(),
        "FastAPLoss": keras_dml.FastAPLoss(),
        "SmoothAPLoss": keras_dml.SmoothAPLoss(),
        "PNPLoss": keras_dml.PNPLoss(),
        "HistogramLoss": keras_dml.HistogramLoss(),
        "VICRegLoss": keras_dml.VICRegLoss(),
        "DynamicSoftMarginLoss": keras_dml.DynamicSoftMarginLoss(momentum=1.0),  # stateless
        "MultipleLosses": keras_dml.MultipleLosses([keras_dml.ContrastiveLoss(),
                                                    keras_dml.CircleLoss()]),
    }


# Losses whose `y_pred` stacks two views of the batch along the batch axis.
TWO_VIEW_LOSSES = ("NTXentLoss", "VICRegLoss")


def test_every_public_loss_is_covered():
    public = {n for n in keras_dml.losses.__all__ if n[0].isupper() and n != "MetricLoss"}
    assert public == set(make_losses())


@pytest.mark.parametrize("policy", POLICIES)
def test_losses_compute_in_float32_on_half_precision_embeddings(policy):
    x, y = digits(32)
    emb = np.random.default_rng(0).normal(size=(32, 16)).astype("float32") * 4.0
    half = "float16" if policy == "mixed_float16" else "bfloat16"
    with mixed_precision(policy):
        for name, loss in make_losses().items():
            exact = loss(y, emb)
            value = loss(y, ops.cast(emb, half))
            assert ops.dtype(value) == "float32", name
            # Only the rounding of the inputs differs: no overflow in exp(256 * s).
            assert np.isfinite(float(value)), name
            np.testing.assert_allclose(float(value), float(exact), rtol=0.1, atol=0.05,
                                       err_msg=name)


@pytest.mark.parametrize("policy", POLICIES)
def test_losses_train_under_mixed_precision(policy):
    # One model, one output per loss (all from one shared backbone): a single
    # fit trains with every loss and logs each one's value.
    x, y = digits()
    with mixed_precision(policy):
        losses = make_losses()
        net = backbone()
        inputs = keras.Input((64,))
        noise = keras.layers.GaussianNoise(0.1)
        outputs = {
            name: keras.layers.Dense(16, name=name)(net(inputs))
            for name in losses if name not in TWO_VIEW_LOSSES
        }
        # NT-Xent, VICReg: both augmented views stacked along the batch axis.
        for name in TWO_VIEW_LOSSES:
            outputs[name] = keras.layers.Identity(name=name)(
                keras.ops.concatenate([net(noise(inputs)), net(noise(inputs))], axis=0)
            )
        model = keras.Model(inputs, outputs)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=losses)
        history = model.fit(x, {name: y for name in losses}, batch_size=BATCH, epochs=3,
                            verbose=0)
    assert {f"{name}_loss" for name in losses} <= set(history.history)
    assert_trained(history, model)


HEADS = {
    "CosineHead": lambda: heads.CosineHead(10),
    "ArcFace": lambda: heads.ArcFace(10),  # s = 64
    "SubCenterArcFace": lambda: heads.SubCenterArcFace(10),
    "CosFace": lambda: heads.CosFace(10),
    "AdaCos": lambda: heads.AdaCos(10),
    "SoftTriple": lambda: heads.SoftTriple(10, centers_per_class=3),
    "SphereFace": lambda: heads.SphereFace(10),
    "CurricularFace": lambda: heads.CurricularFace(10),
    "CenterLoss": lambda: heads.CenterLoss(10),
    "ProxyNCA": lambda: heads.ProxyNCA(10),
    "ProxyAnchor": lambda: heads.ProxyAnchor(10),
    "NormalizedSoftmax": lambda: heads.NormalizedSoftmax(10),
    "LargeMarginSoftmax": lambda: heads.LargeMarginSoftmax(10),
    "P2SGrad": lambda: heads.P2SGrad(10),
    "Manifold": lambda: heads.Manifold(10),
}


def test_every_head_is_covered():
    public = {
        n for n in heads.__all__
        if n[0].isupper() and isinstance(getattr(heads, n), type)
        and issubclass(getattr(heads, n), keras.layers.Layer)
    }
    assert public == set(HEADS)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", sorted(HEADS))
def test_heads_train_under_mixed_precision(policy, name):
    x, y = digits()
    with mixed_precision(policy):
        head = HEADS[name]()
        assert head.compute_dtype == "float32"  # logits scaled by s=64 stay in float32
        model = MarginModel(backbone(), head)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        history = model.fit(x, y, batch_size=BATCH, epochs=3, verbose=0)
        assert ops.dtype(head(ops.cast(model.embed(x[:4]), "float32"))) == "float32"
    assert_trained(history, model)


@pytest.mark.parametrize("policy", POLICIES)
def test_s2sd_trains_under_mixed_precision(policy):
    x, y = digits()
    with mixed_precision(policy):
        model = S2SD(backbone(32), embedding_dim=8, target_dims=(32, 64),
                     feature_distillation=True, feature_distillation_delay=0)
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras_dml.MultiSimilarityLoss())
        history = model.fit(x, y, batch_size=BATCH, epochs=3, verbose=0)
    assert_trained(history, model)
    assert history.history["distillation"][-1] >= 0


@pytest.mark.parametrize("policy", POLICIES)
def test_siamese_model_trains_under_mixed_precision(policy):
    x, y = digits()
    pairs, same = make_pairs(x, y, num_pairs=128, seed=0)
    with mixed_precision(policy):
        model = SiameseModel(backbone())
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        history = model.fit(pairs, same, batch_size=BATCH, epochs=3, verbose=0)
    assert_trained(history, model)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="LoCo's train step is TensorFlow's (see its docstring)")
@pytest.mark.parametrize("policy", POLICIES)
def test_loco_trains_under_mixed_precision(policy):
    from keras_dml.models.loco import LoCo

    x, _ = digits()
    images = x.reshape(-1, 8, 8, 1)
    with mixed_precision(policy):
        stages = [
            keras.Sequential([keras.layers.Conv2D(8, 3, padding="same", activation="relu")]),
            keras.Sequential([keras.layers.Conv2D(8, 3, padding="same", activation="relu")]),
            keras.Sequential([keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
                              keras.layers.GlobalAveragePooling2D()]),
        ]
        model = LoCo(stages, overlap=1, projection_dim=8, augment=keras.layers.GaussianNoise(0.1))
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        history = model.fit(images, batch_size=BATCH, epochs=3, verbose=0)
    assert_trained(history, model)
