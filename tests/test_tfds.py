"""TFDS loaders: zero-shot splits, pipelines and errors, on `tfds.testing.mock_data` (offline)."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from keras_dml.data import tfds as dml_tfds  # noqa: E402

SPLITS = {  # name -> (label feature, classes, training classes): the literature's splits
    "mnist": ("label", 10, 5),
    "caltech_birds2011": ("label", 200, 100),
    "cars196": ("label", 196, 98),
    "stanford_online_products": ("class_id", 22634, 11318),
}


@pytest.fixture
def mock():
    # Mocked examples are random; with 64 of them both parts of every split are non-empty.
    with tfds.testing.mock_data(num_examples=64):
        yield


def test_zero_shot_table_is_the_literature_split():
    for name, (label_key, classes, train_classes) in SPLITS.items():
        spec = dml_tfds.ZERO_SHOT_DATASETS[name]
        assert (spec.label_key, spec.num_classes, spec.num_train_classes) == (
            label_key, classes, train_classes)
    assert dml_tfds.ZERO_SHOT_DATASETS["mnist"].channels == 1
    assert not dml_tfds.ZERO_SHOT_DATASETS["mnist"].flip


@pytest.mark.parametrize("name", list(SPLITS))
def test_parts_hold_only_their_classes(mock, name):
    _, _, train_classes = SPLITS[name]
    train = dml_tfds.load_zero_shot(name, "train")
    test = dml_tfds.load_zero_shot(name, "test")
    assert len(train) and len(test)
    assert train.labels.max() < train_classes <= test.labels.min()
    assert train.images.dtype == object and isinstance(train.images[0], bytes)
    assert train.channels == (1 if name == "mnist" else 3)
    limited = dml_tfds.load_zero_shot(name, "train", max_examples=3)
    assert len(limited) == 3


def test_training_batches_are_class_balanced_and_resized(mock):
    train = dml_tfds.load_zero_shot("caltech_birds2011", "train")
    batches = dml_tfds.training_batches(train, classes_per_batch=4, samples_per_class=2,
                                        image_size=24, seed=0, num_batches=3)
    seen = 0
    for images, labels in batches:
        seen += 1
        assert images.shape == (8, 24, 24, 3) and images.dtype == tf.float32
        assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 1.0
        _, counts = np.unique(labels.numpy(), return_counts=True)
        assert counts.tolist() == [2, 2, 2, 2]
        assert labels.numpy().max() < 100
    assert seen == 3
    # The same seed gives the same images, augmentations included (on a first pass: later
    # passes over a dataset draw new batches).
    first = [dml_tfds.training_batches(train, classes_per_batch=4, samples_per_class=2,
                                       image_size=24, seed=0, num_batches=2) for _ in range(2)]
    for (a, la), (b, lb) in zip(*first, strict=True):
        np.testing.assert_array_equal(la.numpy(), lb.numpy())
        np.testing.assert_allclose(a.numpy(), b.numpy())


def test_backbone_sets_size_and_scaling(mock):
    train = dml_tfds.load_zero_shot("cars196", "train", max_examples=16)
    (images, _), = dml_tfds.training_batches(train, classes_per_batch=2, samples_per_class=2,
                                             backbone="mobilenetv2", augment=False, seed=0,
                                             num_batches=1)
    assert images.shape[1:] == (224, 224, 3)
    assert float(tf.reduce_min(images)) >= -1.0 and float(tf.reduce_max(images)) <= 1.0


def test_inference_batches_keep_order_and_labels(mock):
    test = dml_tfds.load_zero_shot("mnist", "test")
    images = np.concatenate(list(dml_tfds.inference_batches(test, batch_size=5)))
    assert images.shape == (len(test), 28, 28, 1)
    labelled = list(dml_tfds.inference_batches(test, batch_size=5, with_labels=True))
    np.testing.assert_array_equal(np.concatenate([y for _, y in labelled]), test.labels)
    decoded = np.stack([tf.io.decode_png(b).numpy() for b in test.images]) / 255.0
    np.testing.assert_allclose(images, decoded, atol=1e-6)


def test_mnist_batches_feed_the_sampler_without_resizing(mock):
    train = dml_tfds.load_zero_shot("mnist", "train")
    classes = min(3, len(np.unique(train.labels)))
    (images, labels), = dml_tfds.training_batches(train, classes_per_batch=classes,
                                                  samples_per_class=4, seed=1, num_batches=1)
    assert images.shape == (classes * 4, 28, 28, 1)


def test_eval_transform_resizes_shorter_side_then_centre_crops():
    image = tf.zeros((40, 80, 3), tf.uint8)
    out = dml_tfds._eval_transform(image, 32)
    assert tuple(out.shape) == (32, 32, 3)


@pytest.mark.parametrize(
    "mode, module",
    [("caffe", "resnet50"), ("tf", "mobilenet_v2"), ("torch", "densenet")],
)
def test_scaling_matches_keras_applications(mode, module):
    import keras

    pixels = np.random.default_rng(0).uniform(0, 255, size=(2, 5, 5, 3)).astype("float32")
    expected = getattr(keras.applications, module).preprocess_input(pixels.copy())
    np.testing.assert_allclose(dml_tfds.scale_pixels(pixels, mode).numpy(),
                               np.asarray(expected), rtol=1e-5, atol=1e-4)


def test_holdout_split_and_thumbnails(mock):
    train = dml_tfds.load_zero_shot("caltech_birds2011", "train")
    kept, held = dml_tfds.holdout_split(train, 0.25, seed=0)
    assert len(kept) + len(held) == len(train) and len(held) > 0
    thumbs = dml_tfds.thumbnails(held, size=16)
    assert thumbs.shape == (len(held), 16, 16, 3) and thumbs.dtype == np.uint8


def test_unprepared_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(dml_tfds.DatasetUnavailableError, match="tfds build cars196"):
        dml_tfds.load_zero_shot("cars196", "train", data_dir=str(tmp_path))


def test_unknown_names():
    with pytest.raises(ValueError, match="caltech_birds2011"):
        dml_tfds.load_zero_shot("imagenet", "train")
    with pytest.raises(ValueError, match="part"):
        dml_tfds.zero_shot_dataset("mnist", "validation")
    with pytest.raises(ValueError, match="backbone"):
        dml_tfds.backbone_preprocessing("vgg99")
    with pytest.raises(ValueError, match="mode"):
        dml_tfds.scale_pixels(np.zeros((1, 2, 2, 3)), "zscore")
