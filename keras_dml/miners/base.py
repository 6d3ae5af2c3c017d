"""What every miner shares: the `Mined` result (static-shape masks) and the `Miner` base class.

pytorch-metric-learning's miners return index tuples, whose length depends on
the data. Under `jit` (XLA, JAX) shapes must be static, so a keras-dml miner
returns boolean masks over the anchor-to-reference matrix instead:

- pair miners: a positive-pair mask and a negative-pair mask, both `(B, R)`;
- triplet miners: a triplet mask `(B, R, R)`, True at `[a, p, n]`.

A pair loss reads pairs (`Mined.pairs()`: a triplet's (a, p) and (a, n)) and
a triplet loss reads triplets (`Mined.triplet_mask()`: every mined positive
of an anchor with every mined negative of it, as PML's `convert_to_triplets`
does), so any miner works with any pair or triplet loss.

Example:

>>> import numpy as np
>>> from keras_dml.miners import PairMarginMiner
>>> labels = np.array([0, 0, 1])
>>> emb = np.array([[0.0, 0.0], [0.0, 0.5], [0.0, 0.6]], "float32")
>>> mined = PairMarginMiner(pos_margin=0.2, neg_margin=0.55)(labels, emb)
>>> np.asarray(mined.positive).astype(int).tolist()
[[0, 1, 0], [1, 0, 0], [0, 0, 0]]
>>> np.asarray(mined.negative).astype(int).tolist()
[[0, 0, 0], [0, 0, 1], [0, 1, 0]]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
from keras import ops

from keras_dml import distances as distances_lib
from keras_dml import distributed
from keras_dml._registry import ConfigObject, deserialize_as
from keras_dml.losses.base import References, resolve_references, validate_inputs


@dataclasses.dataclass(frozen=True)
class Mined:
    """What a miner selected, as masks of static shape.

    Attributes:
        positive: `(B, R)` bool, the mined (anchor, positive) pairs; None for
            a triplet miner.
        negative: `(B, R)` bool, the mined (anchor, negative) pairs; None for
            a triplet miner.
        triplets: `(B, R, R)` bool, True at `[a, p, n]` for a mined triplet;
            None for a pair miner.
    """

    positive: Any = None
    negative: Any = None
    triplets: Any = None

    def pairs(self):
        """`(positive, negative)` `(B, R)` masks; a triplet's (a, p) and (a, n) pairs.

        A pair used by several triplets counts once here (PML's
        `convert_to_pairs` repeats it once per triplet).
        """
        if self.triplets is None:
            return self.positive, self.negative
        return ops.any(self.triplets, axis=2), ops.any(self.triplets, axis=1)

    def triplet_mask(self):
        """`(B, R, R)` bool: the mined triplets, or each mined positive with each mined negative."""
        if self.triplets is not None:
            return self.triplets
        return ops.logical_and(
            ops.expand_dims(self.positive, 2), ops.expand_dims(self.negative, 1)
        )


def mined_or_all(miner: Miner | None, labels, embeddings, references: References) -> Mined:
    """`miner`'s selection, or (no miner) every pair of the label masks, as a `Mined`.

    Raises:
        ValueError: for multi-hot `(B, C)` labels with a miner (miners mine
            single-label batches).
    """
    if miner is None:
        return Mined(*references.masks(labels))
    _check_single_label(labels)
    return miner.mine(labels, embeddings, references)


def mined_pairs(miner: Miner | None, labels, embeddings, references: References):
    """`(positive, negative)` `(B, R)` pair masks: the label masks, or `miner`'s pairs.

    The one path by which a pair loss takes `miner=`: with a miner, its
    pairs (a triplet miner's (a, p) and (a, n) pairs, each once; PML's
    pair-based losses repeat a pair once per triplet it comes from).

    Raises:
        ValueError: for multi-hot `(B, C)` labels with a miner (miners mine
            single-label batches).
    """
    return mined_or_all(miner, labels, embeddings, references).pairs()


def mined_triplet_counts(miner: Miner | None, labels, embeddings, references: References):
    """`(positive_count, negative_count)` `(B, R)` floats: how many triplets hold each pair.

    `positive_count[a, p]` counts the triplets `(a, p, n)`, `negative_count[a, n]`
    the triplets `(a, p, n)`, over every positive times every negative of
    `a` (no miner, or a pair miner: PML's `convert_to_triplets`) or over a
    triplet miner's triplets. A triplet loss whose terms split into an
    (a, p) part and an (a, n) part sums them as pair terms weighted by
    these counts; only a triplet miner builds a `(B, R, R)` mask.
    """
    if miner is not None:
        _check_single_label(labels)
        mined = miner.mine(labels, embeddings, references)
        if mined.triplets is not None:
            triplets = ops.cast(mined.triplets, "float32")
            return ops.sum(triplets, axis=2), ops.sum(triplets, axis=1)
        positive, negative = mined.positive, mined.negative
    else:
        positive, negative = references.masks(labels)
    positive = ops.cast(positive, "float32")
    negative = ops.cast(negative, "float32")
    per_anchor_negatives = ops.sum(negative, axis=1, keepdims=True)
    per_anchor_positives = ops.sum(positive, axis=1, keepdims=True)
    return positive * per_anchor_negatives, negative * per_anchor_positives


def mined_triplets(miner: Miner | None, labels, embeddings, references: References):
    """`(B, R, R)` bool: every positive times every negative of each anchor, or `miner`'s triplets.

    What a triplet loss reduces with a `keras_dml.reducers.Reducer` (PML's
    `convert_to_triplets`: a pair miner's positives times its negatives, per
    anchor).
    """
    return mined_or_all(miner, labels, embeddings, references).triplet_mask()


def mined_query_weights(miner: Miner, labels, embeddings, references: References):
    """`(B,)` float32: how often `miner` picks each query, divided by the largest such count.

    PML's `lmu.convert_to_weights`, by which its `NCALoss` weighs each query
    given an `indices_tuple`: a sample's count is how many times its index
    appears in the tuple's index arrays (as anchor, positive or negative), a
    query the miner never mentions weighs 0, and when the miner selects
    nothing every query weighs 1. A pair miner's pairs are counted as PML
    counts its 4-tuple (an anchor once per pair), a triplet miner's triplets
    as its 3-tuple (an anchor once per triplet).

    The references decide which indices count: the batch itself, all of
    them; the gathered batches of the `tf.distribute` replicas, the same over
    the global batch (the counts as references summed over the replicas, the
    largest count the global one); other samples (a cross-batch memory),
    only the queries' counts as anchors (PML's convention with `ref_emb`).

    Raises:
        ValueError: for multi-hot `(B, C)` labels (miners mine single-label batches).
    """
    _check_single_label(labels)
    mined = miner.mine(labels, embeddings, references)
    if mined.triplets is not None:
        triplets = ops.cast(mined.triplets, "float32")
        as_anchor = ops.sum(triplets, axis=(1, 2))
        as_reference = ops.sum(triplets, axis=(0, 2)) + ops.sum(triplets, axis=(0, 1))
    else:
        positive = ops.cast(mined.positive, "float32")
        negative = ops.cast(mined.negative, "float32")
        as_anchor = ops.sum(positive, axis=1) + ops.sum(negative, axis=1)
        as_reference = ops.sum(positive, axis=0) + ops.sum(negative, axis=0)
    if references._is_query_batch or references.across_replicas:
        every = references.gather_rows(as_anchor) + distributed.sum_over_replicas(as_reference)
        offset = ops.cast(ops.reshape(references.query_offset, (1,)), "int32")
        counts = ops.slice(every, offset, ops.shape(as_anchor))
    else:
        every = counts = as_anchor
    largest = ops.max(every)
    weights = counts / ops.maximum(largest, 1.0)
    return ops.stop_gradient(ops.where(largest > 0, weights, ops.ones_like(weights)))


def _check_single_label(labels):
    if len(getattr(labels, "shape", ())) == 2 and labels.shape[1] not in (None, 1):
        raise ValueError(
            "A `miner` mines single-label batches; multi-hot `(B, C)` labels are not supported "
            "with one."
        )


class Miner(ConfigObject):
    """Base class: selects informative pairs or triplets of a batch, as masks.

    Subclasses implement `mine(labels, embeddings, references)` on validated
    inputs and list their constructor arguments in `get_config`. Mining
    selects only: no gradient flows through a miner (as in PML, which mines
    under `torch.no_grad()`).

    A miner is called as `miner(labels, embeddings, references=None)` and
    returns a `Mined`; a loss built with `miner=` calls it on every batch
    (on the batch's own references: the batch itself, or all replicas'
    batches under `cross_replica=True`).
    """

    def __call__(self, labels, embeddings, references: References | None = None) -> Mined:
        """Mines the batch.

        Args:
            labels: `(B,)` integer labels.
            embeddings: `(B, D)` float embeddings.
            references: what the anchors mine from; the batch itself by default.

        Returns:
            A `Mined`.

        Raises:
            ValueError: for a wrong shape, non-integer labels, an empty batch
                or NaN/Inf embeddings (the checks of the losses).
        """
        labels, embeddings = validate_inputs(labels, embeddings, "labels", "embeddings")
        return self.mine(labels, embeddings, resolve_references(labels, embeddings, references))

    def mine(self, labels, embeddings, references: References) -> Mined:
        """Mines validated inputs; implemented by each miner."""
        raise NotImplementedError


class DistanceMiner(Miner):
    """A miner that compares anchors and references with one measure of `keras_dml.distances`.

    `matrix` gives the `(B, R)` values in the measure's own direction (a
    similarity for `"cosine"` and `"dot"`, a distance otherwise), without
    gradient, and whether larger means closer (PML's `is_inverted`).
    """

    def __init__(self, distance: str = "euclidean"):
        self.distance = distances_lib.get(distance).name

    def matrix(self, embeddings, references: References):
        measure = distances_lib.get(self.distance)
        kind = "similarity" if measure.is_similarity else "distance"
        values = references.pairwise(embeddings, measure, kind)
        return ops.stop_gradient(values), measure.is_similarity

    def get_config(self) -> dict:
        return {"distance": self.distance}


def get(identifier) -> Miner | None:
    """A `Miner` from a miner, its serialized config (`serialize_keras_object`) or None.

    Raises:
        ValueError: for anything else.
    """
    return deserialize_as(
        identifier, Miner, "miner", "keras_dml.miners.Miner", "TripletMarginMiner()"
    )


def check_choice(value, arg: str, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"`{arg}` must be one of {tuple(allowed)}, got {value!r}.")
    return value


def check_range(value, arg: str):
    """`None` or a `(low, high)` pair of numbers with low <= high, as a tuple."""
    if value is None:
        return None
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"`{arg}` must be None or a (low, high) pair, got {value!r}.") from None
    if not low <= high:
        raise ValueError(f"`{arg}` must have low <= high, got {value!r}.")
    return [low, high]


class RandomMiner(Miner):
    """A miner that draws at random: `seed` fixes the draws, `random_seed` gives each call's seed.

    Eagerly and in TensorFlow graphs a `keras.random.SeedGenerator(seed)`
    advances at every call. A compiled JAX step cannot advance a generator
    that its model does not track (a loss's miner), so under `jax.jit` the
    key is `seed` folded with the bits of the batch's embeddings: the same
    batch gives the same draws, a new batch new ones.
    """

    def __init__(self, seed: int | None = None):
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"`seed` must be an int or None, got {seed!r}.")
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def random_seed(self, embeddings):
        if keras.backend.backend() == "jax":
            import jax

            if isinstance(embeddings, jax.core.Tracer):
                bits = jax.lax.bitcast_convert_type(
                    ops.sum(ops.cast(embeddings, "float32")), "uint32"
                )
                return jax.random.fold_in(jax.random.PRNGKey(self.seed or 0), bits)
        return self.seed_generator

