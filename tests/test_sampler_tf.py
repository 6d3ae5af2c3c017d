"""The P×M sampler (tf.data): batch composition, determinism, arrays and Dataset inputs.

TensorFlow only (tf.data); independent of the Keras backend.
"""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import tensorflow as tf

from keras_dml.data import m_per_class_dataset, sampler


def imbalanced(seed=0, n=150, classes=9):
    rng = np.random.default_rng(seed)
    weights = np.arange(1, classes + 1) / np.sum(range(1, classes + 1))
    labels = rng.choice(classes, size=n, p=weights)
    labels[:classes] = np.arange(classes)  # every class present
    x = np.stack([np.arange(n), labels], axis=1).astype("float32")  # row id, label
    return x, labels


def batches(ds, count):
    return [(xb.numpy(), yb.numpy()) for xb, yb in ds.take(count)]


def assert_p_by_m(batch_list, labels, p, m):
    for xb, yb in batch_list:
        assert xb.shape[0] == yb.shape[0] == p * m
        blocks = yb.reshape(p, m)
        assert np.all(blocks == blocks[:, :1]), "classes come in blocks of M"
        assert len(np.unique(blocks[:, 0])) == p, "P distinct classes"
        # Features belong to the labels they are batched with.
        np.testing.assert_array_equal(labels[xb[:, 0].astype(int)], yb)
        np.testing.assert_array_equal(xb[:, 1], yb)


@pytest.mark.parametrize("p, m", [(3, 4), (9, 2), (2, 8)])
def test_batches_hold_p_classes_times_m_samples_from_arrays(p, m):
    x, labels = imbalanced()
    ds = m_per_class_dataset(x, labels, classes_per_batch=p, samples_per_class=m, seed=1)
    assert_p_by_m(batches(ds, 12), labels, p, m)


def test_batches_from_a_dataset_of_pairs():
    x, labels = imbalanced(1)
    source = tf.data.Dataset.from_tensor_slices((x, labels))
    ds = m_per_class_dataset(source, classes_per_batch=4, samples_per_class=3, seed=2)
    assert_p_by_m(batches(ds, 10), labels, 4, 3)


def test_dict_features_are_gathered_together():
    x, labels = imbalanced(2)
    features = {"row": x[:, 0], "label_copy": x[:, 1].astype("int32")}
    ds = m_per_class_dataset(features, labels, classes_per_batch=3, samples_per_class=2, seed=0)
    for xb, yb in ds.take(5):
        np.testing.assert_array_equal(labels[xb["row"].numpy().astype(int)], yb.numpy())
        np.testing.assert_array_equal(xb["label_copy"].numpy(), yb.numpy())


def test_deterministic_with_a_seed_and_new_batches_each_epoch():
    x, labels = imbalanced(3)

    def run(seed):
        ds = m_per_class_dataset(
            x, labels, classes_per_batch=3, samples_per_class=2, seed=seed, num_batches=4
        )
        return [yb.numpy().tolist() + xb[:, 0].numpy().tolist() for xb, yb in ds] + [
            yb.numpy().tolist() + xb[:, 0].numpy().tolist() for xb, yb in ds
        ]

    first, again, other = run(7), run(7), run(8)
    assert first == again
    assert first != other
    assert len(first) == 8
    assert first[:4] != first[4:], "each pass over a finite dataset draws new batches"


def test_dataset_input_is_deterministic_with_a_seed():
    x, labels = imbalanced(4)
    source = tf.data.Dataset.from_tensor_slices((x, labels))

    def run():
        ds = m_per_class_dataset(source, classes_per_batch=3, samples_per_class=2, seed=5)
        return [xb[:, 0].tolist() for xb, _ in batches(ds, 6)]

    assert run() == run()


def test_each_class_is_cycled_before_repeating():
    labels = np.repeat(np.arange(3), [4, 6, 8])
    x = np.arange(labels.size, dtype="float32")
    ds = m_per_class_dataset(x, labels, classes_per_batch=3, samples_per_class=4, seed=0)
    seen = {c: [] for c in range(3)}
    for xb, yb in batches(ds, 1):
        for value, label in zip(xb, yb, strict=True):
            seen[int(label)].append(int(value))
    assert sorted(seen[0]) == [0, 1, 2, 3]  # all 4 samples of class 0, no repeats
    assert len(set(seen[1])) == 4 and len(set(seen[2])) == 4


def test_feeds_keras_fit():
    import keras

    x, labels = imbalanced(5)
    ds = m_per_class_dataset(x, labels, classes_per_batch=3, samples_per_class=4, seed=0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(9)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(ds, steps_per_epoch=3, epochs=2, shuffle=False, verbose=0)
    assert len(history.history["loss"]) == 2


def test_bad_inputs_raise_value_errors():
    x, labels = imbalanced(6)
    with pytest.raises(ValueError, match="classes_per_batch"):
        m_per_class_dataset(x, labels, classes_per_batch=10, samples_per_class=2)
    with pytest.raises(ValueError, match="classes_per_batch"):
        m_per_class_dataset(x, labels, classes_per_batch=0, samples_per_class=2)
    with pytest.raises(ValueError, match="samples_per_class"):
        m_per_class_dataset(x, labels, classes_per_batch=2, samples_per_class=1.5)
    with pytest.raises(ValueError, match="`y`"):
        m_per_class_dataset(x, labels[:-1], classes_per_batch=2, samples_per_class=2)
    with pytest.raises(ValueError, match="`y`"):
        m_per_class_dataset(x, labels + 0.5, classes_per_batch=2, samples_per_class=2)
    with pytest.raises(ValueError, match="`y`"):
        m_per_class_dataset(x, None, classes_per_batch=2, samples_per_class=2)
    with pytest.raises(ValueError, match="seed"):
        m_per_class_dataset(x, labels, classes_per_batch=2, samples_per_class=2, seed=-1)
    with pytest.raises(ValueError, match="unbatched"):
        batched = tf.data.Dataset.from_tensor_slices((x, labels)).batch(4)
        m_per_class_dataset(batched, classes_per_batch=2, samples_per_class=2)
    with pytest.raises(ValueError, match="features, label"):
        m_per_class_dataset(
            tf.data.Dataset.from_tensor_slices(x), classes_per_batch=2, samples_per_class=2
        )


def test_docstring_example():
    assert doctest.testmod(sampler).failed == 0


def test_later_passes_do_not_depend_on_how_far_earlier_passes_read():
    """Pass k's batches depend on the seed and k only, not on read-ahead in pass k-1."""
    x, labels = imbalanced(3)

    def second_pass(first_pass_batches):
        ds = m_per_class_dataset(
            x, labels, classes_per_batch=3, samples_per_class=2, seed=7, num_batches=4
        )
        for i, _ in enumerate(ds):
            if i + 1 == first_pass_batches:
                break
        return [xb[:, 0].numpy().tolist() for xb, _ in ds]

    assert second_pass(1) == second_pass(4)


def test_works_and_stays_deterministic_after_a_global_seed_is_set():
    """A global TF seed (keras.utils.set_random_seed) changes how tf.data seeds ops."""
    import keras

    x, labels = imbalanced(5)
    keras.utils.set_random_seed(123)

    def run(source_is_dataset):
        if source_is_dataset:
            source = tf.data.Dataset.from_tensor_slices((x, labels))
            ds = m_per_class_dataset(source, classes_per_batch=3, samples_per_class=2, seed=4)
        else:
            ds = m_per_class_dataset(x, labels, classes_per_batch=3, samples_per_class=2, seed=4)
        found = batches(ds, 5)
        assert_p_by_m(found, labels, 3, 2)
        return [xb[:, 0].tolist() for xb, _ in found]

    for source_is_dataset in (False, True):
        assert run(source_is_dataset) == run(source_is_dataset)
