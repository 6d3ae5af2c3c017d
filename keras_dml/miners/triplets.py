"""Triplet miners: a triplet mask `(B, R, R)`, True at `[a, p, n]`, as PML's 3-tuples (a, p, n).

`TripletMarginMiner`, `AngularMiner` and `DistanceWeightedMiner`. The mask
holds every (anchor, positive, negative) of the batch, so memory grows as
`B * R * R` booleans (about 1 GB at B = R = 1024): fine for the usual
batches of a few hundred, too large for cross-batch memories of many
thousands of references. Batch-level miners with one triplet per anchor
(`BatchHardMiner`) return pair masks instead.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_dml import distances as distances_lib
from keras_dml._checks import check_non_negative, check_positive
from keras_dml.miners.base import DistanceMiner, Mined, Miner, RandomMiner, check_choice

_TRIPLET_TYPES = ("all", "hard", "semihard", "easy")


def _triplet_candidates(labels, references):
    """`(B, R, R)` bool: every (a, p, n) with p a positive and n a negative of anchor a."""
    positive, negative = references.masks(labels)
    return ops.logical_and(ops.expand_dims(positive, 2), ops.expand_dims(negative, 1))


@keras.saving.register_keras_serializable(package="keras_dml")
class TripletMarginMiner(DistanceMiner):
    """Keeps the triplets whose margin `d(a, n) - d(a, p)` is at most `margin`.

    `type_of_triplets`:

    - `"all"`: every triplet violating the margin, `d_an - d_ap <= margin`;
    - `"hard"`: those of them with the negative closer than the positive,
      `d_an - d_ap <= 0`;
    - `"semihard"`: those with the negative farther than the positive,
      `0 < d_an - d_ap <= margin`;
    - `"easy"`: the triplets that do not violate it, `d_an - d_ap > margin`.

    For a similarity the margin is `s_ap - s_an` (PML's `is_inverted`).

    Args:
        margin: the triplet margin.
        type_of_triplets: `"all"` (default), `"hard"`, `"semihard"` or `"easy"`.
        distance: a name of `keras_dml.distances`. Defaults to `"euclidean"`.

    Example:

    >>> import numpy as np
    >>> from keras_dml.miners import TripletMarginMiner
    >>> from keras_dml.losses import TripletLoss
    >>> labels = np.array([0, 0, 1, 1])
    >>> emb = np.array([[0.0], [1.0], [1.9], [3.7]], "float32")
    >>> miner = TripletMarginMiner(margin=0.2, type_of_triplets="semihard")
    >>> int(np.sum(miner(labels, emb).triplets))
    1
    >>> round(float(TripletLoss(margin=0.2, miner=miner)(labels, emb)), 4)
    0.1

    Reference:
        pytorch-metric-learning's `TripletMarginMiner`.
    """

    def __init__(self, margin: float = 0.2, type_of_triplets: str = "all", distance="euclidean"):
        super().__init__(distance)
        self.margin = float(margin)
        self.type_of_triplets = check_choice(type_of_triplets, "type_of_triplets", _TRIPLET_TYPES)

    def mine(self, labels, embeddings, references):
        values, is_similarity = self.matrix(embeddings, references)
        ap, an = ops.expand_dims(values, 2), ops.expand_dims(values, 1)
        triplet_margin = ap - an if is_similarity else an - ap
        if self.type_of_triplets == "easy":
            keep = triplet_margin > self.margin
        else:
            keep = triplet_margin <= self.margin
            if self.type_of_triplets == "hard":
                keep = ops.logical_and(keep, triplet_margin <= 0)
            elif self.type_of_triplets == "semihard":
                keep = ops.logical_and(keep, triplet_margin > 0)
        return Mined(triplets=ops.logical_and(_triplet_candidates(labels, references), keep))

    def get_config(self):
        return {
            "margin": self.margin,
            "type_of_triplets": self.type_of_triplets,
            **super().get_config(),
        }


def _unit_rows(x):
    return distances_lib.l2_normalize(x)


@keras.saving.register_keras_serializable(package="keras_dml")
class AngularMiner(Miner):
    """Keeps the triplets whose angle at the negative exceeds `angle` degrees (Wang et al., 2017).

    On L2-normalised embeddings, with `c = (x_a + x_p) / 2`, the angle at
    the negative is `atan(||x_a - x_p|| / (2 ||x_n - c||))` (the angular
    loss's angle); triplets above `angle` are the ones that loss penalises.
    Computed from `(B, R)` and `(R, R)` cosine matrices, never a
    `(B, R, R, D)` tensor.

    Same as PML on unit-norm embeddings. PML requires its distance to
    normalise but computes the angle on the raw embeddings; here the
    embeddings are always normalised first.

    Args:
        angle: threshold in degrees.

    Example:

    >>> import numpy as np
    >>> from keras_dml.miners import AngularMiner
    >>> labels = np.array([0, 0, 1])
    >>> emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]], "float32")
    >>> np.asarray(AngularMiner(angle=20)(labels, emb).triplets)[0, 1].tolist()
    [False, False, True]

    Reference:
        Wang, Zhou, Wen, Liu & Lin, "Deep Metric Learning with Angular Loss",
        ICCV 2017; PML's `AngularMiner`.
    """

    def __init__(self, angle: float = 20.0):
        self.angle = check_non_negative(angle, "angle")

    def mine(self, labels, embeddings, references):
        queries = _unit_rows(ops.stop_gradient(embeddings))
        refs = _unit_rows(ops.stop_gradient(ops.cast(references.embeddings, queries.dtype)))
        cos_qr = ops.matmul(queries, ops.transpose(refs))  # [a, p] and [a, n]
        cos_rr = ops.matmul(refs, ops.transpose(refs))  # [p, n]
        ap = ops.sqrt(ops.maximum(2.0 - 2.0 * cos_qr, 0.0))
        # ||x_n - c||^2 = 1 + ||c||^2 - 2 x_n . c, with ||c||^2 = (1 + cos_ap) / 2.
        nc_squared = (
            1.0 + ops.expand_dims((1.0 + cos_qr) / 2.0, 2)
            - ops.expand_dims(cos_qr, 1) - ops.expand_dims(cos_rr, 0)
        )
        nc = ops.sqrt(ops.maximum(nc_squared, 0.0))
        angles = ops.arctan(ops.expand_dims(ap, 2) / (2.0 * nc))
        keep = angles > math.radians(self.angle)
        return Mined(triplets=ops.logical_and(_triplet_candidates(labels, references), keep))

    def get_config(self):
        return {"angle": self.angle}


@keras.saving.register_keras_serializable(package="keras_dml")
class DistanceWeightedMiner(RandomMiner):
    """Distance-weighted sampling (Wu et al., ICCV 2017): negatives drawn by inverse density.

    On L2-normalised embeddings of dimension `D`, pairwise distances `d`
    (clipped below at `cutoff`) of points uniform on the sphere have density
    `q(d) ∝ d^(D-2) (1 - d²/4)^((D-3)/2)`; each anchor draws negatives with
    probability `∝ 1/q(d)` among those closer than `nonzero_loss_cutoff`
    (farther ones give no loss), so that distances are sampled evenly. Every
    (anchor, positive) pair gets one negative drawn from its anchor's
    distribution; anchors without an eligible negative mine nothing.

    Differs from PML on purpose: PML draws, per anchor, as many positives
    as the class has, at random with replacement; here each positive is
    used exactly once (a mask cannot hold a triplet twice). The draws come
    from `keras.random.categorical` with a `SeedGenerator(seed)`: a seed
    fixes the sequence of draws (same batches, same calls, same triplets),
    None draws a fresh seed. Under JAX's `jit` (`model.fit`) the key is the
    seed folded with the batch (see `RandomMiner`).

    Args:
        cutoff: distances below it count as `cutoff` (0.5, the paper's).
        nonzero_loss_cutoff: negatives at or beyond it are never drawn (1.4).
        seed: seed of the draws; None for a random one.

    Example:

    >>> import numpy as np
    >>> from keras_dml.miners import DistanceWeightedMiner
    >>> labels = np.array([0, 0, 1, 1])
    >>> emb = np.array([[1.0, 0.0], [0.9, 0.4], [0.6, 0.8], [0.0, 1.0]], "float32")
    >>> triplets = DistanceWeightedMiner(seed=1)(labels, emb).triplets
    >>> np.asarray(triplets).sum(axis=2).tolist()  # one negative per (anchor, positive)
    [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]

    Reference:
        Wu, Manmatha, Smola & Krähenbühl, "Sampling Matters in Deep Embedding
        Learning", ICCV 2017; PML's `DistanceWeightedMiner`.
    """

    def __init__(self, cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4, seed=None):
        self.cutoff = check_non_negative(cutoff, "cutoff")
        self.nonzero_loss_cutoff = check_positive(nonzero_loss_cutoff, "nonzero_loss_cutoff")
        super().__init__(seed)

    def log_weights(self, labels, embeddings, references):
        """`(B, R)` log-probabilities (unnormalised) of drawing each reference as a negative.

        Not-eligible references (same class, beyond `nonzero_loss_cutoff`, or
        where the density formula is not finite) get `-inf`-like values;
        returns `(log_weights, eligible)`.
        """
        dim = float(embeddings.shape[1])
        units = _unit_rows(ops.stop_gradient(embeddings))
        if references._is_query_batch:
            d = distances_lib.euclidean_distance(units)
        else:
            refs = ops.stop_gradient(ops.cast(references.embeddings, units.dtype))
            d = distances_lib.euclidean_distance(units, _unit_rows(refs))
        d = ops.maximum(d, self.cutoff)
        log_w = (2.0 - dim) * ops.log(d) - ((dim - 3.0) / 2.0) * ops.log(1.0 - 0.25 * ops.square(d))
        _, negative = references.masks(labels)
        eligible = ops.logical_and(negative, d < self.nonzero_loss_cutoff)
        eligible = ops.logical_and(eligible, ops.isfinite(log_w))
        return ops.where(eligible, log_w, ops.full_like(log_w, -1e30)), eligible

    def mine(self, labels, embeddings, references):
        log_w, eligible = self.log_weights(labels, embeddings, references)
        positive, _ = references.masks(labels)
        num_refs = ops.shape(log_w)[1]
        # One draw per (anchor, column); a row's draw is used at its positive columns.
        log_w = log_w - ops.max(log_w, axis=1, keepdims=True)
        drawn = keras.random.categorical(log_w, num_refs, seed=self.random_seed(embeddings))
        one_hot = ops.cast(ops.one_hot(drawn, num_refs), "bool")  # [a, p, n]
        has = ops.expand_dims(ops.expand_dims(ops.any(eligible, axis=1), 1), 2)
        triplets = ops.logical_and(one_hot, ops.expand_dims(positive, 2))
        return Mined(triplets=ops.logical_and(triplets, has))

    def get_config(self):
        return {"cutoff": self.cutoff, "nonzero_loss_cutoff": self.nonzero_loss_cutoff,
                "seed": self.seed}
