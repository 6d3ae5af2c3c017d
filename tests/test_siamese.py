"""Tests for keras_dml.models.siamese: distances, the pair contrastive loss, the model and pairs."""

from __future__ import annotations

import doctest

import keras
import numpy as np
import pytest
from conftest import loss_gradient
from sklearn.datasets import load_digits

from keras_dml.evaluation.verification import verification_metrics
from keras_dml.models.siamese import (
    ContrastivePairLoss,
    SiameseModel,
    contrastive_pair_loss,
    make_pair_indices,
    make_pairs,
    paired_distance,
)

# ---------------------------------------------------------- distance and loss


@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "angular"])
def test_paired_distance_matches_numpy(rng, distance):
    a = rng.normal(size=(10, 5)).astype("float32")
    b = rng.normal(size=(10, 5)).astype("float32")
    b[3] = a[3]
    expected = []
    for x, y in zip(a.astype(np.float64), b.astype(np.float64), strict=True):
        cos = x @ y / np.linalg.norm(x) / np.linalg.norm(y)
        expected.append(
            {
                "euclidean": np.linalg.norm(x - y),
                "squared_euclidean": np.sum((x - y) ** 2),
                "angular": max(1.0 - cos, 0.0),
            }[distance]
        )
    np.testing.assert_allclose(np.asarray(paired_distance(a, b, distance)), expected, atol=1e-5)


def test_euclidean_gradient_is_finite_for_identical_pairs():
    a = np.ones((2, 3), "float32")
    value, grad = loss_gradient(lambda v: keras.ops.sum(paired_distance(v, a)), a.copy())
    assert value == 0.0
    assert np.all(np.isfinite(grad)) and np.all(grad == 0.0)


def test_contrastive_pair_loss_matches_naive_loop(rng):
    same = (rng.random(20) < 0.5).astype("float32")
    distances = rng.uniform(0.0, 2.0, 20).astype("float32")
    weights = rng.uniform(0.0, 1.0, 20).astype("float32")

    def naive(pos_margin, neg_margin, squared):
        total = 0.0
        for z, d, w in zip(same, distances, weights, strict=True):
            term = max(d - pos_margin, 0.0) if z else max(neg_margin - d, 0.0)
            total += w * (term**2 if squared else term)
        return total / len(same)

    for options in ((0.0, 1.0, True), (0.1, 1.5, False)):
        loss = ContrastivePairLoss(*options)
        assert float(loss(same, distances, sample_weight=weights)) == pytest.approx(
            naive(*options), rel=1e-5
        )
    per_pair = np.asarray(contrastive_pair_loss(same, distances))
    assert per_pair.shape == (20,)


def test_loss_config_round_trip():
    loss = ContrastivePairLoss(pos_margin=0.1, neg_margin=0.7, squared=False)
    restored = ContrastivePairLoss.from_config(loss.get_config())
    assert (restored.pos_margin, restored.neg_margin, restored.squared) == (0.1, 0.7, False)
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(restored, ContrastivePairLoss) and restored.neg_margin == 0.7


# ---------------------------------------------------------------------- model


def small_backbone(dim_in=8, dim_out=4):
    return keras.Sequential([keras.Input((dim_in,)), keras.layers.Dense(dim_out)])


def test_model_shares_one_backbone(rng):
    keras.utils.set_random_seed(0)
    backbone = small_backbone()
    model = SiameseModel(backbone, distance="squared_euclidean")
    a = rng.normal(size=(6, 8)).astype("float32")
    b = rng.normal(size=(6, 8)).astype("float32")
    out = keras.ops.convert_to_numpy(model((a, b)))
    ea, eb = keras.ops.convert_to_numpy(backbone(a)), keras.ops.convert_to_numpy(backbone(b))
    np.testing.assert_allclose(out, np.sum((ea - eb) ** 2, axis=1), rtol=1e-5)
    assert len(model.trainable_weights) == len(backbone.trainable_weights) == 2
    assert model.embedding_model() is backbone


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    return (data.data / 16.0).astype("float32"), data.target


def test_fit_on_pairs_learns_to_verify_held_out_images(digits):
    x, y = digits
    keras.utils.set_random_seed(0)
    backbone = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(16)]
    )
    model = SiameseModel(backbone)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    train = np.random.default_rng(0).random(len(x)) < 0.7
    (test_a, test_b), test_same = make_pairs(x[~train], y[~train], num_pairs=1500, seed=1)

    def auc():
        return verification_metrics(
            scores=model.predict((test_a, test_b), verbose=0), same=test_same,
            distance="euclidean", far=1e-2,
        )["roc_auc"]

    before = auc()
    history = model.fit(*make_pairs(x[train], y[train], num_pairs=4000, seed=0), epochs=4,
                        batch_size=64, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0]
    # Pairs of images never seen in training are verified far better. (Transfer
    # to unseen classes is weak on 8x8 digits and is not asserted here.)
    after = auc()
    assert after > 0.94 and after > before + 0.1


def test_config_and_keras_file_round_trip(tmp_path, rng):
    keras.utils.set_random_seed(0)
    model = SiameseModel(keras.Sequential([keras.layers.Dense(4)]), distance="angular", name="siam")
    model.compile(optimizer="adam", loss=ContrastivePairLoss(neg_margin=0.5))
    x = rng.normal(size=(32, 8)).astype("float32")
    pairs, same = make_pairs(x, np.arange(32) % 4, num_pairs=32)
    model.fit(pairs, same, epochs=1, verbose=0)
    expected = model.predict(pairs, verbose=0)

    clone = SiameseModel.from_config(model.get_config())
    assert clone.distance == "angular" and clone.name == "siam"

    path = str(tmp_path / "siamese.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, SiameseModel)
    np.testing.assert_allclose(loaded.predict(pairs, verbose=0), expected, atol=1e-6)
    assert isinstance(loaded.loss, ContrastivePairLoss) and loaded.loss.neg_margin == 0.5
    loaded.fit(pairs, same, epochs=1, verbose=0)  # training resumes
    assert loaded.embed(x).shape == (32, 4)


def test_model_errors():
    with pytest.raises(ValueError, match="angular"):
        SiameseModel(small_backbone(), distance="cosine")
    with pytest.raises(ValueError, match="backbone"):
        SiameseModel("not a layer")
    model = SiameseModel(small_backbone())
    with pytest.raises(ValueError, match="pair"):
        model(np.zeros((2, 8), "float32"))


# ---------------------------------------------------------------------- pairs


def test_pairs_are_labelled_correctly_and_seeded():
    labels = np.repeat(np.arange(6), [1, 2, 3, 5, 8, 13])
    a, b, same = make_pair_indices(labels, num_pairs=1001, positive_fraction=0.3, seed=7)
    assert same.sum() == round(1001 * 0.3) and same.dtype == np.int32
    np.testing.assert_array_equal(labels[a] == labels[b], same.astype(bool))
    assert not np.any(a == b)
    # Class 0 has a single sample: it is never part of a same-class pair.
    assert not np.any((labels[a] == 0) & (same == 1))
    again = make_pair_indices(labels, num_pairs=1001, positive_fraction=0.3, seed=7)
    for first, second in zip((a, b, same), again, strict=True):
        np.testing.assert_array_equal(first, second)
    other = make_pair_indices(labels, num_pairs=1001, positive_fraction=0.3, seed=8)
    assert not np.array_equal(a, other[0])


def test_pair_sampling_is_uniform_enough():
    labels = np.repeat(np.arange(3), 4)
    a, b, same = make_pair_indices(labels, num_pairs=24000, seed=0)
    # Every sample appears about equally often in each kind of pair.
    counts = np.bincount(np.r_[a[same == 1], b[same == 1]], minlength=12)
    assert counts.min() > 0.9 * counts.mean()
    counts = np.bincount(np.r_[a[same == 0], b[same == 0]], minlength=12)
    assert counts.min() > 0.9 * counts.mean()


def test_make_pairs_gathers_inputs_and_accepts_string_labels():
    x = np.arange(24.0).reshape(6, 2, 2)
    y = np.array(["cat", "dog", "cat", "dog", "emu", "emu"])
    (x_a, x_b), same = make_pairs(x, y, num_pairs=50, seed=3)
    assert x_a.shape == x_b.shape == (50, 2, 2)
    first = y[(x_a[:, 0, 0] // 4).astype(int)]
    second = y[(x_b[:, 0, 0] // 4).astype(int)]
    np.testing.assert_array_equal(first == second, same.astype(bool))


def test_pair_errors():
    with pytest.raises(ValueError, match="two samples"):
        make_pair_indices([0, 1, 2], num_pairs=4)
    with pytest.raises(ValueError, match="two classes"):
        make_pair_indices([0, 0, 0], num_pairs=4)
    assert make_pair_indices([0, 0, 0], num_pairs=4, positive_fraction=1.0)[2].all()
    with pytest.raises(ValueError, match="positive_fraction"):
        make_pair_indices([0, 1], positive_fraction=1.5)
    with pytest.raises(ValueError, match="labels"):
        make_pairs(np.zeros((3, 2)), [0, 1])


def test_docstring_examples_run():
    from keras_dml.losses import pair
    from keras_dml.models import siamese

    assert doctest.testmod(siamese).failed == 0
    assert doctest.testmod(pair).failed == 0  # ContrastivePairLoss moved there


def test_pair_building_lives_in_data_and_old_imports_still_work():
    import keras_dml.data
    import keras_dml.models
    from keras_dml.data import pairs

    assert make_pairs is pairs.make_pairs is keras_dml.models.make_pairs
    assert make_pair_indices is pairs.make_pair_indices is keras_dml.data.make_pair_indices
    assert doctest.testmod(pairs).failed == 0
