"""Class-balanced batches (P classes × M samples) as a `tf.data` pipeline.

Pair and triplet losses need positives in every batch; uniformly shuffled
batches over many classes often have none. `m_per_class_dataset` builds
batches that hold exactly `classes_per_batch` (P) distinct classes with
`samples_per_class` (M) samples each, in class blocks
`[c1 × M, c2 × M, ..., cP × M]`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from keras_dml._checks import is_integer

# Mixed into each class's seed so that class streams shuffle independently.
_SEED_STRIDE = 1_000_003


def _check_positive_int(value, arg: str) -> int:
    if not is_integer(value) or value < 1:
        raise ValueError(f"`{arg}` must be a positive integer, got {value!r}.")
    return int(value)


def _labels_from_arrays(y) -> np.ndarray:
    if y is None:
        raise ValueError("`y` is required when `x` is an array (pass the integer labels).")
    labels = np.asarray(y)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(f"`y` must have shape (n,) or (n, 1), got {labels.shape}.")
    if labels.dtype.kind not in "iu":
        if labels.dtype.kind != "f" or not np.all(labels == np.round(labels)):
            raise ValueError(f"`y` must hold integer class labels, got dtype {labels.dtype}.")
        labels = labels.astype("int64")
    return labels.astype("int64")


def _check_dataset(dataset: tf.data.Dataset) -> None:
    spec = dataset.element_spec
    if not isinstance(spec, tuple) or len(spec) != 2:
        raise ValueError(
            "`x` as a tf.data.Dataset must yield `(features, label)` pairs, got element spec "
            f"{spec}."
        )
    label_spec = spec[1]
    if not isinstance(label_spec, tf.TensorSpec) or not label_spec.dtype.is_integer:
        raise ValueError(f"The dataset's labels must be integer tensors, got {label_spec}.")
    if label_spec.shape.rank != 0:
        raise ValueError(
            f"The dataset must be unbatched (scalar labels), got label shape {label_spec.shape}; "
            "call `.unbatch()` first."
        )


def _class_seed(seed: int | None, index: int) -> int | None:
    return None if seed is None else (seed * _SEED_STRIDE + index) % (2**31 - 1)


def _reshuffled_cycles(members: np.ndarray, seed) -> tf.data.Dataset:
    """Endless stream of `members` (row indices), freshly permuted on every cycle.

    Each cycle's permutation is a stateless shuffle keyed by the next draw of a
    per-iterator random stream, so the sequence depends only on `seed` and on
    how many passes were started, never on how far a prefetching consumer read
    ahead in an earlier pass (a `shuffle(...).repeat()` shares one seed
    generator across passes, which made later passes timing-dependent).
    """
    members = tf.constant(members, dtype=tf.int64)
    cycle_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    return cycle_seeds.flat_map(
        lambda cycle_seed: tf.data.Dataset.from_tensor_slices(
            tf.random.experimental.stateless_shuffle(
                members, seed=tf.stack([cycle_seed, tf.constant(1, tf.int64)])
            )
        )
    )


def _class_selector(num_classes: int, classes_per_batch: int, samples_per_class: int, seed):
    """Stream of class positions: per batch, P distinct classes, each repeated M times."""
    # rerandomize_each_iteration: a finite dataset draws new batches every epoch,
    # still reproducibly for a given seed.
    batch_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)

    def classes_of_batch(batch_seed):
        stateless_seed = tf.stack([batch_seed, tf.constant(0, tf.int64)])
        chosen = tf.random.experimental.stateless_shuffle(
            tf.range(num_classes, dtype=tf.int64), seed=stateless_seed
        )[:classes_per_batch]
        return tf.data.Dataset.from_tensor_slices(tf.repeat(chosen, samples_per_class))

    return batch_seeds.flat_map(classes_of_batch)


def m_per_class_dataset(
    x: Any,
    y: Any = None,
    *,
    classes_per_batch: int,
    samples_per_class: int,
    seed: int | None = None,
    num_batches: int | None = None,
    shuffle_buffer_size: int = 1024,
) -> tf.data.Dataset:
    """Builds a `tf.data.Dataset` of `(x, y)` batches holding P classes × M samples each.

    Within a class, samples from arrays are drawn in a reshuffled cycle (each
    sample once before any repeats; a class with fewer than M samples repeats
    some); a `tf.data.Dataset`'s classes stream through a shuffle buffer of
    `shuffle_buffer_size`. The
    P classes of a batch are distinct and drawn uniformly. With a `seed`, the
    sequence of batches is reproducible; each pass over a finite dataset
    (`num_batches`) draws new batches.

    Args:
        x: features: a NumPy array (or a dict/tuple of arrays with the same
            first dimension), or an unbatched `tf.data.Dataset` of
            `(features, label)` pairs (then `y` must be None).
        y: integer labels `(n,)` when `x` is an array.
        classes_per_batch: P, distinct classes per batch (<= number of classes).
        samples_per_class: M, samples per class in each batch.
        seed: makes the batches deterministic; None draws a random sequence.
        num_batches: stop after this many batches (one "epoch"); None repeats
            forever (pass `steps_per_epoch` to `fit`).
        shuffle_buffer_size: per-class shuffle buffer for a `tf.data.Dataset`
            input (arrays shuffle each class fully).

    Returns:
        A `tf.data.Dataset` of `(x_batch, y_batch)` with batch size P * M.

    Raises:
        ValueError: wrong shapes, non-integer labels, fewer classes than
            `classes_per_batch`, or a dataset that is not `(features, label)`.

    A `tf.data.Dataset` input is split with one `filter` per class, each of
    which reads the whole dataset: fine for tens to a few hundred classes. For
    many classes, pass arrays, e.g. file paths and labels, and `.map` a loader
    over the result.

    Example:

    >>> import numpy as np
    >>> x = np.arange(40, dtype="float32").reshape(20, 2)
    >>> y = np.repeat(np.arange(5), 4)
    >>> ds = m_per_class_dataset(x, y, classes_per_batch=3, samples_per_class=2, seed=0)
    >>> xb, yb = next(iter(ds))
    >>> tuple(xb.shape), np.unique(yb.numpy(), return_counts=True)[1].tolist()
    ((6, 2), [2, 2, 2])

    Reference: Hermans et al., "In Defense of the Triplet Loss for Person
    Re-Identification", 2017 (P×K batches).
    """
    classes_per_batch = _check_positive_int(classes_per_batch, "classes_per_batch")
    samples_per_class = _check_positive_int(samples_per_class, "samples_per_class")
    if num_batches is not None:
        num_batches = _check_positive_int(num_batches, "num_batches")
    shuffle_buffer_size = _check_positive_int(shuffle_buffer_size, "shuffle_buffer_size")
    if seed is not None and (
        not is_integer(seed) or seed < 0
    ):
        raise ValueError(f"`seed` must be None or an integer >= 0, got {seed!r}.")

    if isinstance(x, tf.data.Dataset):
        if y is not None:
            raise ValueError("`y` must be None when `x` is a tf.data.Dataset of (features, label).")
        _check_dataset(x)
        labels = np.fromiter(
            x.map(lambda features, label: label).as_numpy_iterator(), dtype="int64"
        )
    else:
        labels = _labels_from_arrays(y)
        sizes = {np.shape(a)[0] if np.ndim(a) else None for a in tf.nest.flatten(x)}
        if sizes != {labels.shape[0]}:
            raise ValueError(
                f"`x` has first dimension(s) {sorted(s for s in sizes if s is not None)} but `y` "
                f"has {labels.shape[0]} labels; they must match."
            )

    classes = np.unique(labels)
    if classes.size < classes_per_batch:
        raise ValueError(
            f"`classes_per_batch`={classes_per_batch} exceeds the {classes.size} classes in the "
            "data."
        )

    if isinstance(x, tf.data.Dataset):
        # One shuffle over the endless stream, not one per cycle: its seed
        # generator then advances once per pass, whatever the read-ahead.
        streams = [
            x.filter(lambda features, label, c=int(c): tf.equal(label, tf.cast(c, label.dtype)))
            .repeat()
            .shuffle(
                # A buffer larger than the class would read the dataset many times over.
                min(shuffle_buffer_size, int(np.sum(labels == c))),
                seed=_class_seed(seed, i),
                reshuffle_each_iteration=True,
            )
            for i, c in enumerate(classes)
        ]
    else:
        streams = [
            _reshuffled_cycles(np.flatnonzero(labels == c), _class_seed(seed, i))
            for i, c in enumerate(classes)
        ]
    selector = _class_selector(classes.size, classes_per_batch, samples_per_class, seed)
    batches = tf.data.Dataset.choose_from_datasets(streams, selector).batch(
        classes_per_batch * samples_per_class, drop_remainder=True
    )
    if not isinstance(x, tf.data.Dataset):
        features = tf.nest.map_structure(tf.convert_to_tensor, x)
        label_tensor = tf.convert_to_tensor(labels)

        def gather(indices):
            batch_x = tf.nest.map_structure(lambda a: tf.gather(a, indices), features)
            return batch_x, tf.gather(label_tensor, indices)

        # Read-ahead is harmless: every random stream lives in its iterator.
        batches = batches.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if num_batches is not None:
        batches = batches.take(num_batches)
    return batches.prefetch(tf.data.AUTOTUNE)
