"""SimCLRAugmentation: each transform checked on images whose exact result is known.

Bilinear interpolation reproduces a linear function exactly, so on a ramp
image (value = column index) a crop, shift or rotation gives values that can
be computed by hand wherever the sampled point stays inside the image.
"""

import keras
import numpy as np
import pytest

from keras_dml.data.augment import SimCLRAugmentation

NO_RANDOMNESS = dict(crop_scale=(1.0, 1.0), translation=0.0, rotation=0.0, intensity=0.0,
                     noise_stddev=0.0)


def only(**kwargs):
    """A layer with every transform off except the given ones."""
    return SimCLRAugmentation(**{**NO_RANDOMNESS, "seed": 0, **kwargs})


def ramp(batch=16, size=8):
    cols = np.tile(np.arange(size, dtype="float32"), (size, 1))  # value = column index
    return np.broadcast_to(cols[None, :, :, None], (batch, size, size, 1)).copy()


def test_all_transforms_off_is_exact_identity(rng):
    images = rng.random((4, 8, 8, 3)).astype("float32")
    np.testing.assert_array_equal(np.asarray(only()(images)), images)


def test_inference_returns_input_unchanged(rng):
    images = rng.random((4, 8, 8, 1)).astype("float32")
    out = SimCLRAugmentation(seed=0)(images, training=False)
    np.testing.assert_array_equal(np.asarray(out), images)


def test_crop_zooms_about_the_centre():
    # A crop of half the side, resized to the full side: column x samples 3.5 + 0.5 (x - 3.5).
    out = np.asarray(only(crop_scale=(0.5, 0.5))(ramp()))
    expected = 3.5 + 0.5 * (np.arange(8) - 3.5)
    np.testing.assert_allclose(out[..., 0], np.broadcast_to(expected, (16, 8, 8)), atol=1e-5)


def test_shift_is_one_per_image_and_at_most_the_given_fraction():
    images = ramp()
    out = np.asarray(only(translation=0.125)(images))  # at most 1 pixel of 8
    # Interior pixels sample inside the image for any shift <= 1 px.
    shift = (out - images)[:, 1:-1, 1:-1, 0]
    per_image = shift.reshape(16, -1)
    np.testing.assert_allclose(per_image, per_image[:, :1] * np.ones_like(per_image), atol=1e-5)
    assert np.all(np.abs(per_image[:, 0]) <= 1.0 + 1e-6)
    assert len(np.unique(per_image[:, 0].round(4))) > 8  # drawn per image


def test_rotation_stays_within_the_given_degrees():
    out = np.asarray(only(rotation=10.0)(ramp()))[:, 2:6, 2:6, 0]  # the centre never leaves
    # On the ramp, rotating by t gives value = 3.5 + cos t (x - 3.5) - sin t (y - 3.5).
    slope_x = out[:, :, 1:] - out[:, :, :-1]
    slope_y = out[:, 1:, :] - out[:, :-1, :]
    cos, sin = slope_x.mean(axis=(1, 2)), -slope_y.mean(axis=(1, 2))
    np.testing.assert_allclose(cos**2 + sin**2, 1.0, atol=1e-4)
    angles = np.degrees(np.arctan2(sin, cos))
    assert np.all(np.abs(angles) <= 10.0 + 1e-3)
    assert np.ptp(angles) > 5.0  # drawn per image


def test_intensity_scales_each_image_by_one_factor():
    out = np.asarray(only(intensity=0.2)(np.ones((64, 4, 4, 1), "float32")))
    factors = out.reshape(64, -1)
    np.testing.assert_allclose(factors, factors[:, :1] * np.ones_like(factors), atol=1e-6)
    assert factors.min() >= 0.8 - 1e-6 and factors.max() <= 1.2 + 1e-6
    assert np.ptp(factors) > 0.2


def test_noise_has_the_given_standard_deviation():
    out = np.asarray(only(noise_stddev=0.05)(np.zeros((256, 8, 8, 1), "float32")))
    assert abs(out.mean()) < 0.002
    np.testing.assert_allclose(out.std(), 0.05, rtol=0.05)


def test_two_calls_give_two_different_views_and_seeds_reproduce(rng):
    images = rng.random((8, 8, 8, 1)).astype("float32")
    layer = SimCLRAugmentation(seed=3)
    view_1, view_2 = np.asarray(layer(images)), np.asarray(layer(images))
    assert not np.allclose(view_1, view_2)
    np.testing.assert_allclose(np.asarray(SimCLRAugmentation(seed=3)(images)), view_1)
    assert not np.allclose(np.asarray(SimCLRAugmentation(seed=4)(images)), view_1)


def test_single_image_and_integer_images(rng):
    image = rng.random((8, 8, 1)).astype("float32")
    assert tuple(SimCLRAugmentation(seed=0)(image).shape) == (8, 8, 1)
    pixels = (rng.random((2, 8, 8, 1)) * 255).astype("uint8")
    out = only()(pixels)
    assert "float" in keras.backend.standardize_dtype(out.dtype)
    np.testing.assert_array_equal(np.asarray(out), pixels.astype("float32"))


def test_config_round_trip():
    layer = SimCLRAugmentation(crop_scale=(0.6, 0.9), translation=0.2, rotation=5.0,
                               intensity=0.1, noise_stddev=0.02, seed=11, name="views")
    restored = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(restored, SimCLRAugmentation)
    config = restored.get_config()
    for key, value in layer.get_config().items():
        assert config[key] == value, key


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(crop_scale=(0.9, 0.5)), "crop_scale"),
        (dict(crop_scale=0.5), "crop_scale"),
        (dict(translation=-0.1), "translation"),
        (dict(rotation=-1.0), "rotation"),
        (dict(intensity=1.5), "intensity"),
        (dict(noise_stddev=-0.1), "noise_stddev"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        SimCLRAugmentation(**kwargs)


def test_rejects_wrong_rank():
    with pytest.raises(ValueError, match="images"):
        SimCLRAugmentation(seed=0)(np.zeros((4, 8), "float32"))


def test_docstring_examples_run():
    import doctest

    from keras_dml.data import augment

    assert doctest.testmod(augment).failed == 0
