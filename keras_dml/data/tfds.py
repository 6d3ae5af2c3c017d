"""TFDS loaders for the metric-learning benchmarks, with the literature's zero-shot class splits.

Metric learning is evaluated on classes never seen in training. The
standard splits (Oh Song et al., "Deep Metric Learning via Lifted Structured
Feature Embedding", CVPR 2016), by TFDS name:

| TFDS name | train classes | test classes | images read |
| --- | --- | --- | --- |
| `mnist` | digits 0-4 | digits 5-9 | `train+test` |
| `caltech_birds2011` (CUB-200-2011) | first 100 | last 100 | `train+test` |
| `cars196` (Cars196) | first 98 | last 98 | `train+test` |
| `stanford_online_products` (SOP) | first 11,318 | last 11,316 | `train` / `test` |

The loaders read the images still encoded (JPEG/PNG bytes, a fraction of
the decoded size) into memory once; pipelines decode, augment and
preprocess them per batch for a chosen backbone:

- `load_zero_shot(name, "train" | "test")` -> `EncodedImages`;
- `training_batches(...)`: class-balanced P x M batches from
  `keras_dml.data.m_per_class_dataset`, random resized crops and flips;
- `inference_batches(...)`: resize + centre crop, for `predict`;
- `thumbnails(...)`: small uint8 images for plots and retrieval strips.

Nothing is downloaded unless `download=True`: a dataset that is not
prepared in `data_dir` raises `DatasetUnavailableError`. Prepare one with
`tfds build caltech_birds2011` (Cars196 and SOP may need their archives
placed in TFDS's manual directory; see the TFDS catalog).

Example:

```python
from keras_dml.data import tfds as dml_tfds

train = dml_tfds.load_zero_shot("caltech_birds2011", "train")
batches = dml_tfds.training_batches(
    train, classes_per_batch=16, samples_per_class=4, backbone="resnet50", seed=0
)
model.fit(batches, steps_per_epoch=len(train) // 64, epochs=30)
test = dml_tfds.load_zero_shot("caltech_birds2011", "test")
embeddings = model.predict(dml_tfds.inference_batches(test, backbone="resnet50"))
```
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from keras_dml.data.sampler import m_per_class_dataset


@dataclasses.dataclass(frozen=True)
class ZeroShotDataset:
    """How a TFDS dataset is split into training and unseen test classes.

    Attributes:
        name: the TFDS name.
        label_key: the feature holding the class.
        num_classes: number of classes.
        num_train_classes: classes `0 .. num_train_classes - 1` train; the
            rest are the unseen test classes.
        train_split: the TFDS split(s) read for the training classes.
        test_split: the TFDS split(s) read for the test classes.
        channels: image channels (1 for MNIST).
        flip: whether horizontal flips keep the class (not for digits).
    """

    name: str
    label_key: str
    num_classes: int
    num_train_classes: int
    train_split: str
    test_split: str
    channels: int
    flip: bool


ZERO_SHOT_DATASETS: dict[str, ZeroShotDataset] = {
    "mnist": ZeroShotDataset("mnist", "label", 10, 5, "train+test", "train+test", 1, False),
    "caltech_birds2011": ZeroShotDataset(
        "caltech_birds2011", "label", 200, 100, "train+test", "train+test", 3, True
    ),
    "cars196": ZeroShotDataset("cars196", "label", 196, 98, "train+test", "train+test", 3, True),
    # TFDS's own train/test split of SOP is the zero-shot split already.
    "stanford_online_products": ZeroShotDataset(
        "stanford_online_products", "class_id", 22634, 11318, "train", "test", 3, True
    ),
}

# Input scaling each Keras application expects, as `keras.applications.*.preprocess_input`:
# "unit": [0, 1]; "tf": [-1, 1]; "caffe": BGR minus the ImageNet mean; "torch": ImageNet
# mean/std; "raw": 0-255 (models with their own Rescaling layer).
PREPROCESSING_MODES = ("unit", "tf", "caffe", "torch", "raw")

# backbone -> (preprocessing mode, input side in pixels; None keeps the image size).
BACKBONES: dict[str, tuple[str, int | None]] = {
    "small_conv": ("unit", None),
    "resnet50": ("caffe", 224),
    "resnet50v2": ("tf", 224),
    "mobilenetv2": ("tf", 224),
    "efficientnetb0": ("raw", 224),
    "efficientnetv2b0": ("raw", 224),
    "convnexttiny": ("raw", 224),
    "densenet121": ("torch", 224),
    "inceptionv3": ("tf", 299),
}

_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# Evaluation resizes the shorter side to size * 256 / 224, then centre-crops `size`.
_EVAL_RESIZE_RATIO = 256 / 224


class DatasetUnavailableError(ValueError):
    """A TFDS dataset is not prepared in the data directory and downloading was not allowed."""


@dataclasses.dataclass(frozen=True)
class EncodedImages:
    """Encoded images and their labels, held in memory.

    Attributes:
        images: `(n,)` object array of encoded image bytes (JPEG/PNG).
        labels: `(n,)` int64 class labels.
        channels: channels to decode to.
        flip: whether horizontal flips keep the class.
    """

    images: np.ndarray
    labels: np.ndarray
    channels: int = 3
    flip: bool = True

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices) -> EncodedImages:
        """The images at `indices`, as a new `EncodedImages`."""
        indices = np.asarray(indices, dtype="int64")
        return dataclasses.replace(self, images=self.images[indices], labels=self.labels[indices])


def zero_shot_spec(name: str) -> ZeroShotDataset:
    """The split of a supported TFDS dataset; raises `ValueError` naming the supported ones."""
    if name not in ZERO_SHOT_DATASETS:
        raise ValueError(
            f"Unknown dataset {name!r}: keras-dml knows the zero-shot splits of "
            f"{', '.join(ZERO_SHOT_DATASETS)}."
        )
    return ZERO_SHOT_DATASETS[name]


def zero_shot_dataset(
    name: str, part: str = "train", *, data_dir: str | None = None, download: bool = False
) -> tf.data.Dataset:
    """Streams `(encoded image, label)` pairs of the training or the unseen test classes.

    Args:
        name: a key of `ZERO_SHOT_DATASETS`.
        part: `"train"` (the first `num_train_classes` classes) or `"test"`
            (the others).
        data_dir: TFDS data directory; `None` uses TFDS's default
            (`~/tensorflow_datasets` or `$TFDS_DATA_DIR`).
        download: let TFDS download and prepare the dataset if missing.

    Returns:
        An unbatched `tf.data.Dataset` of `(tf.string, tf.int64)` scalars.

    Raises:
        ValueError: for an unknown dataset or part.
        DatasetUnavailableError: if the dataset is not prepared and
            `download` is False, or the download fails.
    """
    spec = zero_shot_spec(name)
    if part not in ("train", "test"):
        raise ValueError(f"`part` must be 'train' or 'test', got {part!r}.")
    import tensorflow_datasets as tfds

    # Only the image (left encoded) and the label are read: CUB's masks and
    # boxes are never decoded.
    decoders = tfds.decode.PartialDecoding(
        {"image": True, spec.label_key: True}, decoders={"image": tfds.decode.SkipDecoding()}
    )
    split = spec.train_split if part == "train" else spec.test_split
    try:
        dataset = tfds.load(
            name, split=split, data_dir=data_dir, download=download, decoders=decoders
        )
    except (AssertionError, OSError, tfds.core.registered.DatasetNotFoundError) as error:
        where = data_dir or "TFDS's default data directory"
        text = str(error).strip()
        # TFDS's first sentence names the problem; the rest is its own advice.
        detail = text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(error).__name__
        hint = (
            f"prepare it with `tfds build {name} --data_dir DIR` and pass that directory"
            if not download
            else "the download or preparation failed"
        )
        raise DatasetUnavailableError(
            f"TFDS dataset {name!r} is not available offline in {where}: {hint} ({detail})"
        ) from error
    limit = spec.num_train_classes
    label_key = spec.label_key

    def keep(example):
        label = example[label_key]
        return label < limit if part == "train" else label >= limit

    return dataset.filter(keep).map(
        lambda example: (example["image"], tf.cast(example[label_key], tf.int64)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )


def load_zero_shot(
    name: str,
    part: str = "train",
    *,
    data_dir: str | None = None,
    download: bool = False,
    max_examples: int | None = None,
) -> EncodedImages:
    """Reads the encoded images of the training or the unseen test classes into memory.

    Memory is about the size of the dataset's files (CUB ~0.6 GB per part,
    SOP ~1.5 GB per part); decoding happens per batch in the pipelines.

    Args:
        name: a key of `ZERO_SHOT_DATASETS`, e.g. `"caltech_birds2011"`.
        part: `"train"` or `"test"`.
        data_dir: TFDS data directory (`None`: TFDS's default).
        download: let TFDS download and prepare the dataset if missing.
        max_examples: keep only the first this many images (quick trials).

    Returns:
        An `EncodedImages`.

    Raises:
        ValueError: for an unknown dataset or part, or no image of the part.
        DatasetUnavailableError: if the dataset is not available offline.
    """
    spec = zero_shot_spec(name)
    dataset = zero_shot_dataset(name, part, data_dir=data_dir, download=download)
    if max_examples is not None:
        dataset = dataset.take(max_examples)
    images, labels = [], []
    for encoded, label in dataset.batch(1024).as_numpy_iterator():
        images.extend(encoded.tolist())
        labels.append(label)
    if not images:
        raise ValueError(f"TFDS dataset {name!r} has no image of the {part} classes.")
    array = np.empty(len(images), dtype=object)
    array[:] = images
    return EncodedImages(array, np.concatenate(labels).astype("int64"), spec.channels, spec.flip)


def holdout_split(
    data: EncodedImages, fraction: float, seed: int = 0
) -> tuple[EncodedImages, EncodedImages]:
    """Splits images at random into `(kept, held_out)`, `fraction` of them held out.

    Use it on the training classes to measure retrieval on held-out images of
    seen classes next to the unseen test classes.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"`fraction` must be in [0, 1), got {fraction!r}.")
    held = np.random.default_rng(seed).random(len(data)) < fraction
    return data.subset(np.flatnonzero(~held)), data.subset(np.flatnonzero(held))


def backbone_preprocessing(backbone: str) -> tuple[str, int | None]:
    """`(preprocessing mode, input side)` for a backbone name of `BACKBONES`."""
    if backbone not in BACKBONES:
        raise ValueError(f"Unknown backbone {backbone!r}; choose from {', '.join(BACKBONES)}.")
    return BACKBONES[backbone]


def scale_pixels(images, mode: str = "unit"):
    """Maps float pixels in [0, 255] (RGB or grey) to the range a backbone expects (`mode`)."""
    if mode not in PREPROCESSING_MODES:
        raise ValueError(f"`mode` must be one of {PREPROCESSING_MODES}, got {mode!r}.")
    images = tf.cast(images, tf.float32)
    if mode == "unit":
        return images / 255.0
    if mode == "tf":
        return images / 127.5 - 1.0
    if mode == "raw":
        return images
    if images.shape[-1] != 3:
        raise ValueError(f"Preprocessing mode {mode!r} needs RGB images, got {images.shape}.")
    if mode == "caffe":
        return images[..., ::-1] - tf.constant(_CAFFE_MEAN_BGR)
    return (images / 255.0 - tf.constant(_IMAGENET_MEAN)) / tf.constant(_IMAGENET_STD)


def _decode(encoded, channels: int):
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    image.set_shape([None, None, channels])
    return image


def _center_square(image):
    shape = tf.shape(image)
    side = tf.minimum(shape[0], shape[1])
    top, left = (shape[0] - side) // 2, (shape[1] - side) // 2
    return image[top : top + side, left : left + side]


def _eval_transform(image, image_size: int | None):
    image = tf.cast(image, tf.float32)
    if image_size is None:
        return image
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = image_size * _EVAL_RESIZE_RATIO / tf.reduce_min(shape)
    resized = tf.cast(tf.math.ceil(shape * scale), tf.int32)
    image = tf.image.resize(image, tf.maximum(resized, image_size))
    return tf.image.resize_with_crop_or_pad(image, image_size, image_size)


def _train_transform(image, image_size: int | None, seed, flip: bool, crop_scale):
    image_shape = tf.shape(image)
    if image_size is not None:
        # Random resized crop (Inception / SimCLR): area fraction in crop_scale,
        # aspect ratio in [3/4, 4/3], then resized to the backbone's input.
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            image_shape,
            bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=seed,
            area_range=crop_scale,
            aspect_ratio_range=(3 / 4, 4 / 3),
            min_object_covered=0.0,
            use_image_if_no_bounding_boxes=True,
        )
        image = tf.slice(image, begin, size)
        image = tf.image.resize(tf.cast(image, tf.float32), (image_size, image_size))
    image = tf.cast(image, tf.float32)
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=seed + 1)
    return image


def _resolve(backbone: str | None, image_size: int | None, preprocessing: str | None):
    mode, size = backbone_preprocessing(backbone) if backbone else ("unit", None)
    return preprocessing or mode, image_size if image_size is not None else size


def _lookup(data: EncodedImages):
    images = data.images

    def load(indices, *rest):
        encoded = tf.numpy_function(lambda i: images[i], [indices], tf.string, stateful=False)
        encoded.set_shape(indices.shape)
        return (encoded, *rest)

    return load


def training_batches(
    data: EncodedImages,
    *,
    classes_per_batch: int,
    samples_per_class: int,
    backbone: str | None = None,
    image_size: int | None = None,
    preprocessing: str | None = None,
    augment: bool = True,
    flip: bool | None = None,
    crop_scale: tuple[float, float] = (0.16, 1.0),
    seed: int | None = None,
    num_batches: int | None = None,
) -> tf.data.Dataset:
    """Builds class-balanced training batches (P classes x M images) of decoded, augmented images.

    Batches come from `keras_dml.data.m_per_class_dataset` over the image
    indices (so many classes, such as SOP's 11,318, cost nothing extra);
    each image is then decoded and, with `augment`, given a random resized
    crop (area in `crop_scale`, aspect ratio 3/4-4/3) and, where the
    dataset allows it, a random horizontal flip; finally pixels are scaled
    for the backbone.

    Args:
        data: the training images, from `load_zero_shot(..., "train")`.
        classes_per_batch: P, distinct classes per batch.
        samples_per_class: M, images per class in each batch.
        backbone: a `BACKBONES` name; sets the input side and pixel scaling.
        image_size: input side in pixels, overriding the backbone's; `None`
            with no backbone keeps the decoded size (all images must share it).
        preprocessing: a `PREPROCESSING_MODES` name overriding the backbone's.
        augment: random resized crops and flips (crops only with a size).
        flip: random horizontal flips; `None` follows the dataset (`data.flip`).
        crop_scale: `(min, max)` area fraction of the random crops.
        seed: makes the batches and augmentations reproducible.
        num_batches: stop after this many batches; `None` repeats forever
            (pass `steps_per_epoch` to `fit`).

    Returns:
        A `tf.data.Dataset` of `(images, labels)`, images float32
        `(P * M, size, size, channels)`.
    """
    mode, size = _resolve(backbone, image_size, preprocessing)
    flip = data.flip if flip is None else bool(flip)
    batch = classes_per_batch * samples_per_class
    indices = m_per_class_dataset(
        np.arange(len(data)),
        data.labels,
        classes_per_batch=classes_per_batch,
        samples_per_class=samples_per_class,
        seed=seed,
        num_batches=num_batches,
    )
    examples = indices.map(_lookup(data)).unbatch()
    # One stateless seed pair per image keeps augmentations reproducible
    # under parallel map.
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    channels = data.channels

    def transform(example, image_seed):
        encoded, label = example
        image = _decode(encoded, channels)
        if augment:
            image = _train_transform(image, size, image_seed, flip, crop_scale)
        else:
            image = _eval_transform(image, size)
        return scale_pixels(image, mode), label

    examples = tf.data.Dataset.zip((examples, seeds)).map(
        transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    return examples.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def inference_batches(
    data: EncodedImages,
    *,
    backbone: str | None = None,
    image_size: int | None = None,
    preprocessing: str | None = None,
    batch_size: int = 128,
    with_labels: bool = False,
) -> tf.data.Dataset:
    """Builds batches for `predict`: decode, resize the shorter side, centre-crop, scale pixels.

    Args:
        data: images from `load_zero_shot`.
        backbone: a `BACKBONES` name; sets the input side and pixel scaling.
        image_size: input side, overriding the backbone's; `None` with no
            backbone keeps the decoded size.
        preprocessing: a `PREPROCESSING_MODES` name overriding the backbone's.
        batch_size: images per batch.
        with_labels: yield `(images, labels)` instead of images alone (for
            `RetrievalMetricsCallback`).

    Returns:
        A `tf.data.Dataset` of float32 image batches, in the order of `data`.
    """
    mode, size = _resolve(backbone, image_size, preprocessing)
    channels = data.channels
    rows = tf.data.Dataset.from_tensor_slices((np.arange(len(data)), data.labels))
    examples = rows.batch(batch_size).map(_lookup(data)).unbatch()

    def transform(encoded, label):
        image = scale_pixels(_eval_transform(_decode(encoded, channels), size), mode)
        return (image, label) if with_labels else image

    return (
        examples.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )


def thumbnails(data: EncodedImages, size: int = 64, batch_size: int = 256) -> np.ndarray:
    """Decodes every image to a `size` x `size` uint8 thumbnail (centre square) for plots.

    Returns:
        `(n, size, size, channels)` uint8 array.
    """
    channels = data.channels
    rows = tf.data.Dataset.from_tensor_slices(np.arange(len(data)))

    def small(encoded):
        image = _center_square(_decode(encoded, channels))
        image = tf.image.resize(image, (size, size), antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)

    batches = (
        rows.batch(batch_size)
        .map(_lookup(data))
        .map(lambda *x: x[0])
        .unbatch()
        .map(small, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(batch_size)
    )
    return np.concatenate(list(batches.as_numpy_iterator()))
