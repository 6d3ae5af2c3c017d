"""Labelled pairs for Siamese training and verification: same-class and different-class pairs.

`make_pair_indices` draws index pairs from a label array; `make_pairs`
gathers the inputs into `((x_a, x_b), same)`, which `SiameseModel.fit`
takes as it is. NumPy only (no Keras import). Also importable from
`keras_dml.models.siamese` and `keras_dml.models`, where they lived before.

Example:

>>> import numpy as np
>>> from keras_dml.data.pairs import make_pairs
>>> x, y = np.random.rand(64, 8).astype("float32"), np.arange(64) % 4
>>> (x_a, x_b), same = make_pairs(x, y, num_pairs=128, seed=0)
>>> x_a.shape, same.shape
((128, 8), (128,))
"""

from __future__ import annotations

import numpy as np

from keras_dml._checks import is_integer


def make_pair_indices(
    labels,
    num_pairs: int | None = None,
    positive_fraction: float = 0.5,
    seed: int | None = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draws random labelled pairs of sample indices: same-class pairs and different-class pairs.

    Exactly `round(num_pairs * positive_fraction)` pairs are same-class: the
    first member uniformly among samples whose class has another sample,
    the second uniformly among the other samples of its class (never itself).
    The rest are different-class pairs: the first member uniformly among all
    samples, the second uniformly among samples of other classes. Pairs are
    shuffled and each pair's order is random. Sampling is with replacement,
    so a pair can repeat.

    Args:
        labels: `(N,)` class labels (any values that compare equal in a class).
        num_pairs: number of pairs; defaults to `N`.
        positive_fraction: share of same-class pairs, in [0, 1].
        seed: seed of the NumPy generator; the same seed gives the same pairs.

    Returns:
        `(index_a, index_b, same)`: int64 indices into `labels` and int32
        flags (1 for same-class pairs), each `(num_pairs,)`.

    Raises:
        ValueError: if same-class pairs are asked for but no class has two
            samples, or different-class pairs but there is one class only.

    Example:

    >>> labels = np.array([0, 0, 1, 1, 2])
    >>> index_a, index_b, same = make_pair_indices(labels, num_pairs=4, seed=1)
    >>> same.tolist(), (labels[index_a] == labels[index_b]).astype(int).tolist()
    ([1, 0, 1, 0], [1, 0, 1, 0])
    """
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels.reshape(-1)
    if labels.ndim != 1 or labels.shape[0] == 0:
        raise ValueError(f"`labels` must be a non-empty 1-D array, got shape {labels.shape}.")
    n = labels.shape[0]
    num_pairs = n if num_pairs is None else num_pairs
    if not is_integer(num_pairs) or num_pairs < 1:
        raise ValueError(f"`num_pairs` must be a positive integer, got {num_pairs!r}.")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"`positive_fraction` must lie in [0, 1], got {positive_fraction!r}.")
    n_positive = int(round(num_pairs * positive_fraction))
    n_negative = int(num_pairs) - n_positive
    rng = np.random.default_rng(seed)

    # Work on positions in class-sorted order: a class is one contiguous block.
    order = np.argsort(labels, kind="stable")
    _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    class_of = np.repeat(np.arange(len(counts)), counts)

    eligible = np.flatnonzero(counts[class_of] >= 2)
    if n_positive and not len(eligible):
        raise ValueError("Same-class pairs need a class with at least two samples; none has.")
    if n_negative and len(counts) < 2:
        raise ValueError("Different-class pairs need at least two classes; `labels` has one.")

    first = rng.choice(eligible, n_positive) if n_positive else np.zeros(0, np.int64)
    cls = class_of[first]
    # A non-zero offset within the class block never lands on the sample itself.
    offset = rng.integers(1, np.maximum(counts[cls], 2))
    second = starts[cls] + (first - starts[cls] + offset) % counts[cls]

    anchor = rng.integers(0, n, n_negative)
    cls = class_of[anchor]
    # Position among the samples of other classes, mapped around the anchor's block.
    other = rng.integers(0, n - counts[cls])
    partner = np.where(other < starts[cls], other, other + counts[cls])

    index_a = order[np.concatenate([first, anchor])].astype(np.int64)
    index_b = order[np.concatenate([second, partner])].astype(np.int64)
    same = np.concatenate([np.ones(n_positive, np.int32), np.zeros(n_negative, np.int32)])
    swap = rng.random(num_pairs) < 0.5
    index_a, index_b = np.where(swap, index_b, index_a), np.where(swap, index_a, index_b)
    shuffle = rng.permutation(num_pairs)
    return index_a[shuffle], index_b[shuffle], same[shuffle]


def make_pairs(
    x,
    y,
    num_pairs: int | None = None,
    positive_fraction: float = 0.5,
    seed: int | None = 0,
):
    """Builds Siamese training pairs from labelled arrays: `((x_a, x_b), same)`.

    See `make_pair_indices` for how pairs are drawn; the result feeds
    `SiameseModel.fit` directly: `model.fit(*make_pairs(x, y))`.

    Args:
        x: `(N, ...)` array of inputs.
        y: `(N,)` class labels.
        num_pairs: number of pairs; defaults to `N`.
        positive_fraction: share of same-class pairs, in [0, 1].
        seed: seed of the NumPy generator.

    Returns:
        `((x_a, x_b), same)`: `x_a` and `x_b` are `(num_pairs, ...)` arrays
        gathered from `x`, `same` `(num_pairs,)` int32 flags.

    Raises:
        ValueError: if `x` and `y` have different lengths, or as
            `make_pair_indices`.

    Example:

    >>> x, y = np.arange(12.0).reshape(6, 2), np.array([0, 0, 1, 1, 2, 2])
    >>> (x_a, x_b), same = make_pairs(x, y, num_pairs=10, seed=0)
    >>> x_a.shape, int(same.sum())
    ((10, 2), 5)
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.shape[0] != y.reshape(-1).shape[0]:
        raise ValueError(f"`x` has {x.shape[0]} samples but `y` has {y.size} labels.")
    index_a, index_b, same = make_pair_indices(y, num_pairs, positive_fraction, seed)
    return (x[index_a], x[index_b]), same
