"""Pair miners: positive and negative pair masks `(B, R)`, as PML's 4-tuples (a1, p, a2, n).

`PairMarginMiner`, `MultiSimilarityMiner`, `HDCMiner`, `UniformHistogramMiner`
and the batch miners `BatchEasyHardMiner` / `BatchHardMiner` (one positive and
one negative per anchor, which as masks are also its triplets).
"""

from __future__ import annotations

import keras
from keras import ops

from keras_dml import ops as dml_ops
from keras_dml._checks import check_positive_int
from keras_dml.miners.base import DistanceMiner, Mined, RandomMiner, check_choice, check_range

_INF = 1e30


@keras.saving.register_keras_serializable(package="keras_dml")
class PairMarginMiner(DistanceMiner):
    """Keeps positive pairs farther than `pos_margin` and negative pairs closer than `neg_margin`.

    For a similarity (`"cosine"`, `"dot"`) the comparisons flip: positives
    with similarity below `pos_margin`, negatives above `neg_margin` (PML's
    `is_inverted`).

    Args:
        pos_margin: positive pairs beyond it are mined.
        neg_margin: negative pairs within it are mined.
        distance: a name of `keras_dml.distances`. Defaults to `"euclidean"`.

    Example:

    >>> import numpy as np
    >>> from keras_dml.miners import PairMarginMiner
    >>> from keras_dml.losses import ContrastiveLoss
    >>> loss = ContrastiveLoss(miner=PairMarginMiner(pos_margin=0.0, neg_margin=1.0))
    >>> labels = np.array([0, 0, 1, 1])
    >>> emb = np.array([[0.0, 0.0], [0.0, 0.5], [0.0, 0.6], [0.0, 1.2]], "float32")
    >>> round(float(loss(labels, emb)), 4)  # the mean over the 3 mined negative pairs only
    1.0833

    Reference:
        pytorch-metric-learning's `PairMarginMiner`.
    """

    def __init__(self, pos_margin: float = 0.2, neg_margin: float = 0.8, distance="euclidean"):
        super().__init__(distance)
        self.pos_margin = float(pos_margin)
        self.neg_margin = float(neg_margin)

    def mine(self, labels, embeddings, references):
        values, is_similarity = self.matrix(embeddings, references)
        positive, negative = references.masks(labels)
        if is_similarity:
            hard_positive, hard_negative = values < self.pos_margin, values > self.neg_margin
        else:
            hard_positive, hard_negative = values > self.pos_margin, values < self.neg_margin
        return Mined(
            positive=ops.logical_and(positive, hard_positive),
            negative=ops.logical_and(negative, hard_negative),
        )

    def get_config(self):
        config = {"pos_margin": self.pos_margin, "neg_margin": self.neg_margin}
        return {**config, **super().get_config()}


@keras.saving.register_keras_serializable(package="keras_dml")
class MultiSimilarityMiner(DistanceMiner):
    """The pair mining of the multi-similarity loss (Wang et al., CVPR 2019).

    With similarities (the default, cosine): a positive (a, p) is kept when
    `S_ap - epsilon < max_n S_an`, a negative (a, n) when
    `S_an + epsilon > min_p S_ap`. With a distance the comparisons flip
    (`d_ap + epsilon > min_n d_an`, `d_an - epsilon < max_p d_ap`). An anchor
    without negatives keeps no positive and one without positives keeps no
    negative.

    Args:
        epsilon: the mining margin.
        distance: a name of `keras_dml.distances`. Defaults to `"cosine"`.

    Example:

    >>> import numpy as np
    >>> from keras_dml.miners import MultiSimilarityMiner
    >>> labels = np.array([0, 0, 1])
    >>> emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]], "float32")
    >>> mined = MultiSimilarityMiner(epsilon=0.1)(labels, emb)
    >>> np.asarray(mined.positive[0]).tolist(), np.asarray(mined.negative[0]).tolist()
    ([False, True, False], [False, False, True])

    Reference:
        Wang et al., "Multi-Similarity Loss with General Pair Weighting for
        Deep Metric Learning", CVPR 2019; PML's `MultiSimilarityMiner`.
    """

    def __init__(self, epsilon: float = 0.1, distance="cosine"):
        super().__init__(distance)
        self.epsilon = float(epsilon)

    def mine(self, labels, embeddings, references):
        values, is_similarity = self.matrix(embeddings, references)
        positive, negative = references.masks(labels)
        # As distances (smaller is closer) the rules are one: flip a similarity's sign.
        d = -values if is_similarity else values
        closest_negative = dml_ops.masked_min(d, negative, keepdims=True)
        farthest_positive = dml_ops.masked_max(d, positive, keepdims=True)
        return Mined(
            positive=ops.logical_and(positive, d + self.epsilon > closest_negative),
            negative=ops.logical_and(negative, d - self.epsilon < farthest_positive),
        )

    def get_config(self):
        return {"epsilon": self.epsilon, **super().get_config()}


def _ranks(values, mask):
    """Rank (0 = first) of each True entry of `mask` when they are sorted by `values` ascending.

    Computed over the flattened matrix; entries outside `mask` rank last.
    """
    flat = ops.reshape(ops.where(mask, values, ops.full_like(values, _INF)), (-1,))
    order = ops.argsort(flat)
    positions = ops.arange(ops.shape(flat)[0], dtype="int32")
    ranks = ops.scatter(ops.expand_dims(order, 1), positions, ops.shape(flat))
    return ops.reshape(ranks, ops.shape(values))


@keras.saving.register_keras_serializable(package="keras_dml")
class HDCMiner(DistanceMiner):
    """Hard-aware deeply cascaded mining: the hardest `filter_percentage` of each kind of pair.

    Of all positive pairs of the batch the `ceil(filter_percentage * P)`
    farthest (least similar) are kept, of all negative pairs the
    `ceil(filter_percentage * N)` closest (most similar), as PML's `HDCMiner`
    does with `topk` over the whole batch. Ties at the cut are broken by
    position (PML: by `torch.topk`).

    Args:
        filter_percentage: fraction of each kind of pair kept, in (0, 1].
        distance: a name of `keras_dml.distances`. Defaults to `"euclidean"`.

    Example:

    >>> import numpy as np
    >>> from keras_dml.miners import HDCMiner
    >>> labels = np.array([0, 0, 1, 1])
    >>> emb = np.array([[0.0], [1.0], [3.0], [3.5]], "float32")
    >>> mined = HDCMiner(filter_percentage=0.5)(labels, emb)
    >>> int(np.sum(mined.positive)), int(np.sum(mined.negative))
    (2, 4)

    Reference:
        Yuan, Yang & Zhang, "Hard-Aware Deeply Cascaded Embedding", ICCV 2017.
    """

    def __init__(self, filter_percentage: float = 0.5, distance="euclidean"):
        if not 0.0 < float(filter_percentage) <= 1.0:
            raise ValueError(f"`filter_percentage` must be in (0, 1], got {filter_percentage!r}.")
        super().__init__(distance)
        self.filter_percentage = float(filter_percentage)

    def _hardest(self, hardness, mask):
        count = ops.sum(ops.cast(mask, "float32"))
        # ceil(fraction * count), as PML's Python; the factor keeps float32 rounding of an
        # exact integer product (0.3 * 90 = 27.000002) from rounding up.
        keep = ops.cast(ops.ceil(self.filter_percentage * count * (1.0 - 1e-6)), "int32")
        return ops.logical_and(mask, _ranks(-hardness, mask) < keep)

    def mine(self, labels, embeddings, references):
        values, is_similarity = self.matrix(embeddings, references)
        positive, negative = references.masks(labels)
        d = -values if is_similarity else values
        return Mined(positive=self._hardest(d, positive), negative=self._hardest(-d, negative))

    def get_config(self):
        return {"filter_percentage": self.filter_percentage, **super().get_config()}


@keras.saving.register_keras_serializable(package="keras_dml")
class UniformHistogramMiner(DistanceMiner, RandomMiner):
    """Samples pairs uniformly over the range of their distances: a few pairs per histogram bin.

    The positive pairs' values are split into `num_bins` equal-width bins
    between their minimum and maximum, and up to `pos_per_bin` pairs are
    drawn at random from each bin; likewise for negative pairs with
    `neg_per_bin`.

    Differs from PML on purpose: PML draws `pos_per_bin` pairs per non-empty
    bin *with* replacement (a pair can be drawn twice); a mask holds a pair
    once, so here they are drawn without replacement (a bin with fewer pairs
    keeps all of them). The random draws are seeded by `seed` (the same seed
    gives the same pairs for the same batches and calls; under JAX's `jit`,
    the same pairs for the same batch, see `RandomMiner`).

    Args:
        num_bins: number of bins.
        pos_per_bin: positive pairs drawn per bin.
        neg_per_bin: negative pairs drawn per bin.
        distance: a name of `keras_dml.distances`. Defaults to `"euclidean"`.
        seed: seed of the draws; None for a random one.

    Example:

    >>> import numpy as np
    >>> from keras_dml.miners import UniformHistogramMiner
    >>> labels = np.array([0, 0, 0, 1, 1, 1])
    >>> emb = np.arange(6, dtype="float32")[:, None]
    >>> mined = UniformHistogramMiner(num_bins=2, pos_per_bin=1, neg_per_bin=2, seed=0)(labels, emb)
    >>> int(np.sum(mined.positive)), int(np.sum(mined.negative))
    (2, 4)

    Reference:
        pytorch-metric-learning's `UniformHistogramMiner`.
    """

    def __init__(
        self,
        num_bins: int = 100,
        pos_per_bin: int = 10,
        neg_per_bin: int = 10,
        distance="euclidean",
        seed: int | None = None,
    ):
        DistanceMiner.__init__(self, distance)
        RandomMiner.__init__(self, seed)
        self.num_bins = check_positive_int(num_bins, "num_bins")
        self.pos_per_bin = check_positive_int(pos_per_bin, "pos_per_bin")
        self.neg_per_bin = check_positive_int(neg_per_bin, "neg_per_bin")

    def _sample(self, values, mask, per_bin, seed):
        low = dml_ops.masked_min(values, mask, axis=None)
        high = dml_ops.masked_max(values, mask, axis=None)
        width = ops.maximum((high - low) / self.num_bins, 1e-30)
        bins = ops.clip(ops.floor((values - low) / width), 0, self.num_bins - 1)
        # Sort by bin, then by a random key: a pair's rank inside its bin is uniform.
        noise = keras.random.uniform(
            ops.shape(values), dtype=values.dtype, seed=seed
        )
        keys = bins + noise * 0.5
        rank = _ranks(keys, mask)
        flat_sorted = ops.sort(ops.reshape(ops.where(mask, keys, ops.full_like(keys, _INF)), (-1,)))
        first_of_bin = ops.searchsorted(flat_sorted, ops.reshape(bins, (-1,)), side="left")
        rank_in_bin = ops.reshape(rank, (-1,)) - ops.cast(first_of_bin, "int32")
        return ops.logical_and(mask, ops.reshape(rank_in_bin, ops.shape(values)) < per_bin)

    def mine(self, labels, embeddings, references):
        values, _ = self.matrix(embeddings, references)
        positive, negative = references.masks(labels)
        seed = self.random_seed(embeddings)
        if not isinstance(seed, keras.random.SeedGenerator):
            import jax

            seed, negative_seed = jax.random.split(seed)
        else:
            negative_seed = seed
        return Mined(
            positive=self._sample(values, positive, self.pos_per_bin, seed),
            negative=self._sample(values, negative, self.neg_per_bin, negative_seed),
        )

    def get_config(self):
        return {
            "num_bins": self.num_bins,
            "pos_per_bin": self.pos_per_bin,
            "neg_per_bin": self.neg_per_bin,
            **super().get_config(),
            "seed": self.seed,
        }


_STRATEGIES = ("hard", "semihard", "easy", "all")


@keras.saving.register_keras_serializable(package="keras_dml")
class BatchEasyHardMiner(DistanceMiner):
    """Per anchor, one positive and one negative chosen by a strategy (Xuan et al., WACV 2020).

    `pos_strategy` picks each anchor's positive: `"hard"` (farthest),
    `"easy"` (closest), `"semihard"` (the farthest positive closer than the
    chosen negative) or `"all"` (every positive). `neg_strategy` picks its
    negative: `"hard"` (closest), `"easy"` (farthest), `"semihard"` (the
    closest negative farther than the chosen positive) or `"all"`. An anchor
    keeps its pair only where the chosen one exists (inside
    `allowed_pos_range` / `allowed_neg_range`, `[low, high]` on the measure's
    values); when neither strategy is `"all"`, only anchors with both a
    positive and a negative are kept. As PML does, semihard cannot be used on
    both sides or with `"all"`.

    Args:
        pos_strategy: `"easy"` (default), `"hard"`, `"semihard"` or `"all"`.
        neg_strategy: `"semihard"` (default), `"hard"`, `"easy"` or `"all"`.
        allowed_pos_range: optional `(low, high)`: only positives in it.
        allowed_neg_range: optional `(low, high)`: only negatives in it.
        distance: a name of `keras_dml.distances`. Defaults to `"euclidean"`.

    Example:

    >>> import numpy as np
    >>> from keras_dml.miners import BatchEasyHardMiner
    >>> labels = np.array([0, 0, 0, 1])
    >>> emb = np.array([[0.0], [1.0], [2.0], [2.5]], "float32")
    >>> mined = BatchEasyHardMiner(pos_strategy="hard", neg_strategy="hard")(labels, emb)
    >>> int(np.argmax(mined.positive[0])), int(np.argmax(mined.negative[0]))
    (2, 3)

    Reference:
        Xuan, Stylianou, Liu & Pless, "Hard negative examples are hard, but
        useful", ECCV 2020; PML's `BatchEasyHardMiner`.
    """

    def __init__(
        self,
        pos_strategy: str = "easy",
        neg_strategy: str = "semihard",
        allowed_pos_range=None,
        allowed_neg_range=None,
        distance="euclidean",
    ):
        check_choice(pos_strategy, "pos_strategy", _STRATEGIES)
        check_choice(neg_strategy, "neg_strategy", _STRATEGIES)
        if pos_strategy == neg_strategy == "semihard":
            raise ValueError('`pos_strategy` and `neg_strategy` cannot both be "semihard".')
        if "semihard" in (pos_strategy, neg_strategy) and "all" in (pos_strategy, neg_strategy):
            raise ValueError('"semihard" cannot be used in combination with "all".')
        super().__init__(distance)
        self.pos_strategy = pos_strategy
        self.neg_strategy = neg_strategy
        self.allowed_pos_range = check_range(allowed_pos_range, "allowed_pos_range")
        self.allowed_neg_range = check_range(allowed_neg_range, "allowed_neg_range")

    @staticmethod
    def _pick(values, allowed, largest, value_range, beyond=None):
        """Per row, the column of the largest (or smallest) allowed value.

        Returns `(one_hot, found, value)`.

        `beyond`: `(B,)` thresholds; with `largest` only values below, else only above them.
        """
        if beyond is not None:
            beyond = ops.expand_dims(beyond, 1)
            allowed = ops.logical_and(allowed, values < beyond if largest else values > beyond)
        if value_range is not None:
            allowed = ops.logical_and(
                allowed, ops.logical_and(values >= value_range[0], values <= value_range[1])
            )
        scores = values if largest else -values
        scores = ops.where(allowed, scores, ops.full_like(scores, -_INF))
        column = ops.argmax(scores, axis=1)
        found = ops.any(allowed, axis=1)
        one_hot = ops.logical_and(
            ops.cast(ops.one_hot(column, ops.shape(values)[1]), "bool"), ops.expand_dims(found, 1)
        )
        value = ops.take_along_axis(values, ops.expand_dims(column, 1), axis=1)[:, 0]
        return one_hot, found, value

    def mine(self, labels, embeddings, references):
        values, is_similarity = self.matrix(embeddings, references)
        positive, negative = references.masks(labels)
        d = -values if is_similarity else values  # as a distance: smaller is closer
        flip = (lambda r: None if r is None else [-r[1], -r[0]]) if is_similarity else (lambda r: r)
        pos_range, neg_range = flip(self.allowed_pos_range), flip(self.allowed_neg_range)
        # Positive: hard/semihard take the farthest (largest d), easy the closest.
        pos_largest = self.pos_strategy in ("hard", "semihard")
        # Negative: hard/semihard take the closest, easy the farthest.
        neg_largest = self.neg_strategy == "easy"
        if self.pos_strategy == "semihard":
            neg, neg_found, neg_value = self._pick(d, negative, neg_largest, neg_range)
            pos, pos_found, _ = self._pick(d, positive, True, pos_range, beyond=neg_value)
        elif self.neg_strategy == "semihard":
            pos, pos_found, pos_value = self._pick(d, positive, pos_largest, pos_range)
            neg, neg_found, _ = self._pick(d, negative, False, neg_range, beyond=pos_value)
        else:
            if self.pos_strategy != "all":
                pos, pos_found, _ = self._pick(d, positive, pos_largest, pos_range)
            if self.neg_strategy != "all":
                neg, neg_found, _ = self._pick(d, negative, neg_largest, neg_range)
        if self.pos_strategy == "all" and self.neg_strategy == "all":
            return Mined(positive=positive, negative=negative)
        if self.pos_strategy == "all":
            return Mined(positive=positive, negative=neg)
        if self.neg_strategy == "all":
            return Mined(positive=pos, negative=negative)
        keep = ops.expand_dims(ops.logical_and(pos_found, neg_found), 1)
        return Mined(positive=ops.logical_and(pos, keep), negative=ops.logical_and(neg, keep))

    def get_config(self):
        return {
            "pos_strategy": self.pos_strategy,
            "neg_strategy": self.neg_strategy,
            "allowed_pos_range": self.allowed_pos_range,
            "allowed_neg_range": self.allowed_neg_range,
            **super().get_config(),
        }


@keras.saving.register_keras_serializable(package="keras_dml")
class BatchHardMiner(BatchEasyHardMiner):
    """Batch-hard mining (Hermans et al., 2017): each anchor's farthest positive, closest negative.

    Anchors without a positive or a negative mine nothing. The mined pairs
    are one triplet per anchor (`Mined.triplet_mask()`).

    Args:
        distance: a name of `keras_dml.distances`. Defaults to `"euclidean"`.

    Example:

    >>> import numpy as np
    >>> from keras_dml.miners import BatchHardMiner
    >>> from keras_dml.losses import TripletLoss
    >>> labels = np.array([0, 0, 1, 1])
    >>> emb = np.array([[0.0], [1.0], [1.5], [3.0]], "float32")
    >>> round(float(TripletLoss(margin=0.2, miner=BatchHardMiner())(labels, emb)), 4)
    0.95

    Reference:
        Hermans, Beyer & Leibe, "In Defense of the Triplet Loss for Person
        Re-Identification", 2017; PML's `BatchHardMiner`.
    """

    def __init__(self, distance="euclidean"):
        super().__init__(pos_strategy="hard", neg_strategy="hard", distance=distance)

    def get_config(self):
        return {"distance": self.distance}

