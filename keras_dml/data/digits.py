"""The bundled zero-shot benchmark: scikit-learn's 8x8 handwritten digits, no download.

scikit-learn ships 1,797 real 8x8 handwritten digits. The zero-shot
protocol of the metric-learning literature (CUB-200 trains on its first 100
classes and tests on the other 100) becomes: train on digits 0-4, evaluate
retrieval on the unseen digits 5-9. A fraction of the images of digits 0-4
is held out as well, to measure retrieval on the training classes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

NUM_TRAIN_CLASSES = 5


@dataclasses.dataclass(frozen=True)
class ZeroShotArrays:
    """Arrays of a zero-shot split: training images, held-out seen-class images, unseen classes.

    Attributes:
        x_train: training inputs (classes `0 .. num_train_classes - 1`).
        y_train: their integer labels.
        x_seen: held-out inputs of the training classes.
        y_seen: their labels.
        x_unseen: inputs of the classes never trained on.
        y_unseen: their labels.
        num_train_classes: number of training classes.
        class_names: each label's name, indexed by label (empty when the
            labels are their own names, as for the digits).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_seen: np.ndarray
    y_seen: np.ndarray
    x_unseen: np.ndarray
    y_unseen: np.ndarray
    num_train_classes: int
    class_names: tuple[str, ...] = ()


def load_digits_zero_shot(holdout_fraction: float = 0.2, seed: int = 0) -> ZeroShotArrays:
    """Loads the digits as `(8, 8, 1)` float32 images in [0, 1], split for zero-shot retrieval.

    Digits 0-4 are split at random into training images and a held-out
    `holdout_fraction` of seen-class images; digits 5-9 are the unseen test
    classes. The split is the one of `examples/digits_triplet.py` for the
    same `seed`.

    Args:
        holdout_fraction: fraction of the images of digits 0-4 held out,
            in `[0, 1)`.
        seed: seed of the held-out draw.

    Returns:
        A `ZeroShotArrays`.

    Example:

    >>> from keras_dml.data.digits import load_digits_zero_shot
    >>> data = load_digits_zero_shot()
    >>> data.x_train.shape[1:], sorted(set(data.y_unseen.tolist()))
    ((8, 8, 1), [5, 6, 7, 8, 9])
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"`holdout_fraction` must be in [0, 1), got {holdout_fraction!r}.")
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    seen = np.flatnonzero(y < NUM_TRAIN_CLASSES)
    held_out = np.random.default_rng(seed).random(len(seen)) < holdout_fraction
    train, val = seen[~held_out], seen[held_out]
    unseen = np.flatnonzero(y >= NUM_TRAIN_CLASSES)
    return ZeroShotArrays(
        x[train], y[train], x[val], y[val], x[unseen], y[unseen], NUM_TRAIN_CLASSES
    )
