"""The bundled glyph dataset: classes, determinism, the zero-shot split, the cache."""

import unicodedata

import numpy as np
import pytest

from keras_dml.data import glyphs
from keras_dml.data.glyphs import FACES, glyph_classes, load_glyphs_zero_shot, render_glyphs

SMALL = dict(image_size=16, samples_per_face=1, num_classes=12)


def test_classes_are_shared_letters_digits_symbols_with_look_alikes_merged():
    classes = glyph_classes()
    assert len(classes.code_points) + classes.num_dropped == classes.shared
    assert len(classes.code_points) > 500
    categories = {unicodedata.category(chr(c)) for c in classes.code_points}
    assert categories <= set(glyphs.CATEGORIES) and "Nd" in categories
    # Latin A, Greek Alpha and Cyrillic A are one class, kept as the Latin letter.
    assert ord("A") in classes.code_points
    assert {0x0391, 0x0410} <= set(classes.duplicates[ord("A")])
    dropped = {c for group in classes.duplicates.values() for c in group}
    assert not dropped & set(classes.code_points)
    # Characters that only look alike in some faces stay apart (l and I differ with serifs).
    assert {ord("l"), ord("I"), ord("0"), ord("O")} <= set(classes.code_points)


def test_rendering_is_deterministic_and_covers_every_face():
    images, code_points, faces = render_glyphs(**SMALL, seed=3, cache_dir=False)
    again = render_glyphs(**SMALL, seed=3, cache_dir=False)
    np.testing.assert_array_equal(images, again[0])
    np.testing.assert_array_equal(code_points, again[1])
    assert images.shape == (12 * len(FACES), 16, 16, 1) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    for code_point in np.unique(code_points):
        assert sorted(faces[code_points == code_point]) == list(range(len(FACES)))
    # Every image has ink, and the augmentations make images of one class differ.
    assert np.all(images.reshape(len(images), -1).max(axis=1) > 0.3)
    first = images[code_points == code_points[0]]
    assert not np.allclose(first[0], first[1])
    other_seed = render_glyphs(image_size=16, samples_per_face=1, num_classes=12, seed=4,
                               cache_dir=False)[0]
    assert not np.array_equal(other_seed, images)


def test_zero_shot_split_is_by_class_and_disjoint():
    data = load_glyphs_zero_shot(**SMALL, train_fraction=0.5, validation_fraction=0.25,
                                 cache_dir=False)
    assert data.num_train_classes == 6 and len(data.class_names) == 12
    assert set(data.y_train) == set(range(6)) and set(data.y_unseen) == set(range(6, 12))
    assert set(data.y_seen) <= set(range(6))
    n_seen_class = len(data.y_train) + len(data.y_seen)
    assert n_seen_class == 6 * len(FACES) and len(data.y_unseen) == 6 * len(FACES)
    assert 0 < len(data.y_seen) < n_seen_class
    train_rows = {x.tobytes() for x in data.x_train}
    assert not any(x.tobytes() in train_rows for x in data.x_seen)
    assert not any(x.tobytes() in train_rows for x in data.x_unseen)
    for split in (data.x_train, data.x_seen, data.x_unseen):
        assert split.shape[1:] == (16, 16, 1) and split.dtype == np.float32
    for split in (data.y_train, data.y_seen, data.y_unseen):
        assert split.dtype == np.int32


def test_cache_is_written_reused_and_a_damaged_file_is_replaced(tmp_path):
    first = load_glyphs_zero_shot(**SMALL, cache_dir=tmp_path)
    [path] = list(tmp_path.glob("*.npz"))
    assert not list(tmp_path.glob("*.tmp*"))
    cached = load_glyphs_zero_shot(**SMALL, cache_dir=tmp_path)
    np.testing.assert_array_equal(first.x_unseen, cached.x_unseen)
    path.write_bytes(b"truncated")
    repaired = load_glyphs_zero_shot(**SMALL, cache_dir=tmp_path)
    np.testing.assert_array_equal(first.x_train, repaired.x_train)
    with np.load(path) as again:
        assert again["images"].shape[0] == 12 * len(FACES)


def test_feeds_the_m_per_class_sampler():
    from keras_dml.data import m_per_class_dataset

    data = load_glyphs_zero_shot(image_size=16, samples_per_face=1, num_classes=20,
                                 cache_dir=False)
    dataset = m_per_class_dataset(data.x_train, data.y_train, classes_per_batch=4,
                                  samples_per_class=4, seed=0, num_batches=3)
    for x, y in dataset:
        assert tuple(x.shape) == (16, 16, 16, 1)
        counts = np.unique(np.asarray(y), return_counts=True)[1]
        assert len(counts) == 4 and set(counts) == {4}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_size=4), "image_size"),
        (dict(samples_per_face=0), "samples_per_face"),
        (dict(num_classes=1), "num_classes"),
        (dict(num_classes=10**6), "num_classes"),
        (dict(train_fraction=1.0), "train_fraction"),
        (dict(validation_fraction=-0.1), "validation_fraction"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_glyphs_zero_shot(**{"cache_dir": False, **kwargs})


def test_docstring_examples_run(tmp_path, monkeypatch):
    import doctest

    monkeypatch.setenv("KERAS_DML_CACHE", str(tmp_path))
    assert doctest.testmod(glyphs).failed == 0
