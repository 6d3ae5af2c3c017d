"""SimCLR-style random views of images, as a Keras layer that runs inside the train step.

Contrastive learning (SimCLR, LoCo, SupCon) needs two differently augmented
views of every image in a batch. `SimCLRAugmentation` draws one random
crop-and-resize, shift and rotation per image and applies them as a single
affine resampling (one interpolation, so small images are blurred once, not
once per transform), then a random intensity scaling and Gaussian noise. It
is written with `keras.ops` only, so it runs on every backend, on the
accelerator, in the compiled train step, and is saved with the model.

The defaults suit small grayscale images such as scikit-learn's 8x8 digits.
SimCLR's colour jitter and grayscale conversion have no counterpart for one
channel, and horizontal flips are off because they change the meaning of
digits and letters. Any layer or callable that maps an image batch to an
augmented batch of the same shape can be used instead.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_dml._checks import check_non_negative


def _check_range(value, arg: str, low: float, high: float) -> tuple[float, float]:
    try:
        lower, upper = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"`{arg}` must be a pair (min, max), got {value!r}.") from None
    if not low <= lower <= upper <= high:
        raise ValueError(f"`{arg}` must satisfy {low} <= min <= max <= {high}, got {value!r}.")
    return lower, upper


@keras.saving.register_keras_serializable(package="keras_dml")
class SimCLRAugmentation(keras.layers.Layer):
    """Draw a random crop, shift, rotation, intensity change and noise for every image.

    Each image gets its own random affine map, applied about the image centre
    with bilinear interpolation and zero fill: a crop covering a fraction `s`
    of the side, drawn from `crop_scale`, resized back to full size
    (SimCLR's random resized crop with a fixed aspect ratio); a shift of up to
    `translation` times the height and width; a rotation of up to `rotation`
    degrees. The result is then multiplied by a factor drawn from
    `[1 - intensity, 1 + intensity]` and gets Gaussian noise of standard
    deviation `noise_stddev`. Values are not clipped, so any input range works.

    Like Keras's random preprocessing layers, it only augments when
    `training=True` (the default when called directly) and returns its input
    unchanged at inference. Images are `(batch, height, width, channels)`, or
    channels first when `keras.config.image_data_format()` says so; a single
    unbatched image also works.

    Args:
        crop_scale: `(min, max)` side of the crop as a fraction of the image
            side, in `(0, 1]` for crops. Defaults to `(0.75, 1.0)`.
        translation: largest shift as a fraction of the height and of the
            width. Defaults to `0.125` (one pixel of an 8x8 image).
        rotation: largest rotation, in degrees. Defaults to `10.0`.
        intensity: largest relative brightness change. Defaults to `0.2`.
        noise_stddev: standard deviation of the additive Gaussian noise, in
            the units of the input. Defaults to `0.05`.
        seed: integer seed of the layer's random generator, for reproducible
            views; `None` draws a random seed.
        **kwargs: `keras.layers.Layer` arguments (`name`, ...).

    Example:

    >>> import numpy as np
    >>> from keras_dml.data.augment import SimCLRAugmentation
    >>> images = np.random.default_rng(0).random((4, 8, 8, 1)).astype("float32")
    >>> augment = SimCLRAugmentation(seed=0)
    >>> view_1, view_2 = augment(images), augment(images)
    >>> tuple(view_1.shape), bool(np.allclose(view_1, view_2))
    ((4, 8, 8, 1), False)
    >>> bool(np.allclose(augment(images, training=False), images))
    True

    Reference:
        Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive
        Learning of Visual Representations", ICML 2020 (Section 3, Appendix A).
    """

    def __init__(
        self,
        crop_scale: tuple[float, float] = (0.75, 1.0),
        translation: float = 0.125,
        rotation: float = 10.0,
        intensity: float = 0.2,
        noise_stddev: float = 0.05,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # Scales above 1 would zoom out; allowed up to 2 for users who want it.
        self.crop_scale = _check_range(crop_scale, "crop_scale", 1e-3, 2.0)
        self.translation = check_non_negative(translation, "translation")
        self.rotation = check_non_negative(rotation, "rotation")
        self.intensity = check_non_negative(intensity, "intensity")
        if self.intensity > 1:
            raise ValueError(f"`intensity` must be <= 1 (no negative images), got {intensity}.")
        self.noise_stddev = check_non_negative(noise_stddev, "noise_stddev")
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.data_format = keras.config.image_data_format()
        self.built = True

    def call(self, images, training=True):
        images = ops.convert_to_tensor(images)
        if not training:
            return images
        if len(images.shape) not in (3, 4):
            raise ValueError(
                "`images` must be a batch (batch, height, width, channels) or one image, "
                f"got shape {tuple(images.shape)}."
            )
        unbatched = len(images.shape) == 3
        if unbatched:
            images = ops.expand_dims(images, 0)
        if "float" not in keras.backend.standardize_dtype(images.dtype):
            images = ops.cast(images, self.compute_dtype)
        images = ops.image.affine_transform(
            images,
            self._random_transforms(images),
            interpolation="bilinear",
            fill_mode="constant",
            fill_value=0,
            data_format=self.data_format,
        )
        batch = ops.shape(images)[0]
        if self.intensity > 0:
            factor = keras.random.uniform(
                (batch, 1, 1, 1), 1.0 - self.intensity, 1.0 + self.intensity,
                seed=self.seed_generator,
            )
            images = images * ops.cast(factor, images.dtype)
        if self.noise_stddev > 0:
            noise = keras.random.normal(
                ops.shape(images), stddev=self.noise_stddev, seed=self.seed_generator
            )
            images = images + ops.cast(noise, images.dtype)
        return ops.squeeze(images, 0) if unbatched else images

    def _random_transforms(self, images):
        """`(batch, 8)` output-to-input maps for `ops.image.affine_transform`, one per image."""
        shape = ops.shape(images)
        if self.data_format == "channels_last":
            height, width = shape[1], shape[2]
        else:
            height, width = shape[2], shape[3]
        height = ops.cast(height, "float32")
        width = ops.cast(width, "float32")
        batch = (shape[0],)

        def uniform(low, high):
            return keras.random.uniform(batch, low, high, dtype="float32", seed=self.seed_generator)

        scale = uniform(*self.crop_scale)
        angle = uniform(-1.0, 1.0) * (self.rotation * math.pi / 180.0)
        shift_x = uniform(-1.0, 1.0) * self.translation * width
        shift_y = uniform(-1.0, 1.0) * self.translation * height
        # input = centre + scale * R(angle) @ (output - centre) + shift, so that the crop
        # and the rotation are about the image centre rather than the top-left corner.
        center_x, center_y = (width - 1.0) / 2.0, (height - 1.0) / 2.0
        cos, sin = scale * ops.cos(angle), scale * ops.sin(angle)
        zeros = ops.zeros_like(scale)
        return ops.stack(
            [
                cos,
                -sin,
                center_x - cos * center_x + sin * center_y + shift_x,
                sin,
                cos,
                center_y - sin * center_x - cos * center_y + shift_y,
                zeros,
                zeros,
            ],
            axis=1,
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "crop_scale": self.crop_scale,
                "translation": self.translation,
                "rotation": self.rotation,
                "intensity": self.intensity,
                "noise_stddev": self.noise_stddev,
                "seed": self.seed,
            }
        )
        return config
