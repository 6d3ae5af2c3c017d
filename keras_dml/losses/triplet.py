"""Triplet losses: a general mined `TripletLoss` and the two tensorflow-addons losses.

`TripletSemiHardLoss` and `TripletHardLoss` reproduce
`tfa.losses.TripletSemiHardLoss` / `tfa.losses.TripletHardLoss` (addons 0.23)
number for number, with the same argument names, so that migrating is a
change of import. They differ from addons only where addons returns NaN: a
batch without any positive pair gives 0 (addons issues #2447, #1676).

Every triplet loss takes `references=` (see `keras_dml.losses.base.References`)
and, as a Keras loss, `cross_replica=True`: under `tf.distribute` each anchor
mines its positives and negatives among the batches of all replicas, and the
value equals that of one device on the global batch.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_dml import miners as miners_lib
from keras_dml import mining
from keras_dml import ops as dml_ops
from keras_dml import reducers as reducers_lib
from keras_dml import regularizers as regularizers_lib
from keras_dml.losses.base import MetricLoss, References, resolve_references

_TFA_METRICS = {"L2": "euclidean", "squared-L2": "squared_euclidean", "angular": "angular"}


def _tfa_distances(embeddings, distance_metric: str, references: References):
    if distance_metric not in _TFA_METRICS:
        raise ValueError(
            f"`distance_metric` must be one of {sorted(_TFA_METRICS)} (tensorflow-addons' names), "
            f"got {distance_metric!r}."
        )
    return references.pairwise(embeddings, _TFA_METRICS[distance_metric])


def triplet_semihard_loss(
    labels,
    embeddings,
    margin: float = 1.0,
    distance_metric: str = "L2",
    references: References | None = None,
):
    """Semi-hard triplet loss with tensorflow-addons' exact semantics.

    For every positive pair (a, p), a != p, the negative is the closest one
    farther than p, or the farthest negative when there is none; the loss is
    `sum max(margin + d(a, p) - d(a, n), 0) / #positive pairs`.

    Args:
        labels: `(B,)` integer labels.
        embeddings: `(B, D)` float embeddings (not normalised here).
        margin: the triplet margin.
        distance_metric: `"L2"`, `"squared-L2"` or `"angular"`.
        references: what the anchors are compared with; the batch itself by
            default. The mean runs over the positive pairs of all queries
            (of all replicas, across replicas).

    Returns:
        A scalar; 0 when the batch holds no positive pair.
    """
    references = resolve_references(labels, embeddings, references)
    distances = _tfa_distances(embeddings, distance_metric, references)
    positives, negatives = references.masks(labels)
    total, count = mining.semi_hard_terms(
        distances, negatives, positives, lambda dap, dan: ops.maximum(margin + dap - dan, 0.0)
    )
    return references.mean(total, count)


def triplet_hard_loss(
    labels,
    embeddings,
    margin: float = 1.0,
    soft: bool = False,
    distance_metric: str = "L2",
    references: References | None = None,
):
    """Batch-hard triplet loss with tensorflow-addons' exact semantics.

    Per anchor: the farthest positive and the closest negative;
    `mean_a max(d(a, p*) - d(a, n*) + margin, 0)`, or `log1p(exp(d(a, p*) - d(a, n*)))`
    with `soft=True`. As in addons, the mean runs over every anchor; an anchor
    without positives uses 0 for `d(a, p*)` and one without negatives uses its
    largest distance for `d(a, n*)`.

    Args:
        labels: `(B,)` integer labels.
        embeddings: `(B, D)` float embeddings.
        margin: the triplet margin (unused when `soft=True`).
        soft: use the soft-margin (softplus) form.
        distance_metric: `"L2"`, `"squared-L2"` or `"angular"`.
        references: what the anchors are compared with; the batch itself by
            default. The mean runs over all anchors (of all replicas).

    Returns:
        A scalar.
    """
    references = resolve_references(labels, embeddings, references)
    distances = _tfa_distances(embeddings, distance_metric, references)
    positives, negatives = references.masks(labels)
    hardest_negative, has_negative = mining.hardest_negative(distances, negatives)
    hardest_negative = ops.where(has_negative, hardest_negative, ops.max(distances, axis=1))
    hardest_positive = dml_ops.masked_max(distances, positives, axis=1)
    has_positive = ops.any(positives, axis=1)
    hardest_positive = ops.where(has_positive, hardest_positive, ops.min(distances, axis=1))
    gap = hardest_positive - hardest_negative
    per_anchor = ops.softplus(gap) if soft else ops.maximum(gap + margin, 0.0)
    return references.mean_over_queries(per_anchor)


def triplet_loss(
    labels,
    embeddings,
    margin: float = 0.2,
    negative_mining: str = "semi-hard",
    positive_mining: str = "all",
    soft_margin: bool = False,
    distance: str = "euclidean",
    references: References | None = None,
    miner: miners_lib.Miner | None = None,
    reducer: reducers_lib.Reducer | None = None,
    embedding_regularizer=None,
):
    """Triplet loss with a choice of positive and negative mining.

    Args:
        labels: `(B,)` integer labels.
        embeddings: `(B, D)` float embeddings.
        margin: hinge margin `m` in `max(d(a, p) - d(a, n) + m, 0)`.
        negative_mining: which negatives each (anchor, positive) pair uses:
            `"semi-hard"` (closest negative farther than the positive, else the
            farthest negative), `"hard"` (the anchor's closest negative),
            `"easy"` (its farthest negative) or `"all"` (every negative).
        positive_mining: `"all"` positive pairs, or per anchor the `"hard"`
            (farthest) or `"easy"` (closest) positive.
        soft_margin: replace the hinge by `softplus(d(a, p) - d(a, n))`
            (Hermans et al.'s soft margin; `margin` is then unused).
        distance: any name of `keras_dml.distances`; similarities are turned
            into distances (`1 - cos`, `-dot`).
        references: what the anchors mine their positives and negatives
            from; the batch itself by default.
        miner: a `keras_dml.miners.Miner` choosing the triplets instead of
            the string modes (which must then keep their defaults): the loss
            runs over the miner's triplets (`Mined.triplet_mask()`; a pair
            miner's positives and negatives of each anchor are combined). A
            triplet miner, or a reducer other than `AvgNonZeroReducer`, makes
            it a `(B, R, R)` computation; a pair miner (e.g.
            `BatchHardMiner`) with the default reducer stays O(B·R log R).
        reducer: a `keras_dml.reducers.Reducer` for the per-element terms
            (per triplet with a miner or `negative_mining="all"`, else per
            (anchor, positive) pair). None: the reductions described under
            Returns; with a miner, `AvgNonZeroReducer()` (PML's
            `TripletMarginLoss` default).
        embedding_regularizer: a regularizer of `keras_dml.regularizers`
            whose value on `embeddings` is added to the loss.

    Returns:
        A scalar: the mean over the selected (anchor, positive) pairs, or, for
        `negative_mining="all"`, the mean over triplets with a non-zero loss
        (the batch-all convention), of all queries (of all replicas). Anchors
        without a positive or a negative are left out; a batch with no valid
        triplet gives 0.
    """
    loss = _triplet_loss(
        labels, embeddings, margin, negative_mining, positive_mining, soft_margin, distance,
        references, miner, reducer,
    )
    return regularizers_lib.add_embedding_regularizer(loss, embeddings, embedding_regularizer)


def _check_miner_modes(miner, negative_mining, positive_mining):
    if miner is not None and (negative_mining, positive_mining) != ("semi-hard", "all"):
        raise ValueError(
            "With `miner=`, the miner chooses the triplets: leave `negative_mining` and "
            f"`positive_mining` at their defaults, got {negative_mining!r} and {positive_mining!r}."
        )


def _triplet_loss(
    labels, embeddings, margin, negative_mining, positive_mining, soft_margin, distance,
    references, miner, reducer,
):
    mining.check_modes(negative_mining, positive_mining)
    _check_miner_modes(miner, negative_mining, positive_mining)
    references = resolve_references(labels, embeddings, references)
    distances = references.pairwise(embeddings, distance)

    def term(positive_distances, negative_distances):
        gap = positive_distances - negative_distances
        return ops.softplus(gap) if soft_margin else ops.maximum(gap + margin, 0.0)

    if miner is not None:
        mined = miner.mine(labels, embeddings, references)
        if mined.triplets is None and (
            reducer is None or type(reducer) is reducers_lib.AvgNonZeroReducer
        ):
            # Pairs: every mined positive with every mined negative of its anchor, averaged
            # over the non-zero terms, is batch-all mining on the mined masks: O(B·R log R)
            # instead of the (B, R, R) terms.
            positive, negative = mined.pairs()
            return references.mean(*_batch_all(distances, positive, negative, margin, soft_margin))
        terms = term(ops.expand_dims(distances, 2), ops.expand_dims(distances, 1))
        reducer = reducers_lib.AvgNonZeroReducer() if reducer is None else reducer
        return references.mean(*reducer.reduce(terms, mined.triplet_mask(), labels))

    positives, negatives = references.masks(labels)
    pairs = mining.select_positives(distances, positives, positive_mining)
    pairs = ops.logical_and(pairs, ops.any(negatives, axis=1, keepdims=True))

    if reducer is not None:
        return references.mean(
            *_reduced_terms(distances, pairs, negatives, negative_mining, term, reducer, labels)
        )

    if negative_mining == "all":
        return references.mean(*_batch_all(distances, pairs, negatives, margin, soft_margin))

    if negative_mining == "semi-hard":
        return references.mean(*mining.semi_hard_terms(distances, negatives, pairs, term))
    miner = mining.hardest_negative if negative_mining == "hard" else mining.easiest_negative
    per_pair = term(distances, ops.expand_dims(miner(distances, negatives)[0], 1))
    return references.mean(dml_ops.masked_sum(per_pair, pairs), dml_ops.masked_count(pairs))


def _reduced_terms(distances, pairs, negatives, negative_mining, term, reducer, labels):
    """`reducer`'s `(total, count)` of the per-triplet or per-(a, p) terms of a string mode."""
    if negative_mining == "all":
        triplets = ops.logical_and(ops.expand_dims(pairs, 2), ops.expand_dims(negatives, 1))
        terms = term(ops.expand_dims(distances, 2), ops.expand_dims(distances, 1))
        return reducer.reduce(terms, triplets, labels)
    if negative_mining == "semi-hard":
        chosen, _ = mining.semi_hard_negatives(distances, negatives, pairs)
    else:
        miner = mining.hardest_negative if negative_mining == "hard" else mining.easiest_negative
        chosen = ops.expand_dims(miner(distances, negatives)[0], 1)
    return reducer.reduce(term(distances, chosen), pairs, labels)


def _batch_all(distances, pairs, negatives, margin, soft_margin):
    """`(sum of the triplet terms, number of triplets with a non-zero term)`."""
    if soft_margin:
        # softplus is not piecewise linear, so no prefix-sum shortcut: one anchor
        # at a time keeps memory at O(B·R).
        def one_anchor(row):
            d, pair_row, negative_row = row
            gaps = ops.expand_dims(d, 1) - ops.expand_dims(d, 0)
            valid = ops.logical_and(ops.expand_dims(pair_row, 1), ops.expand_dims(negative_row, 0))
            return ops.stack(
                [dml_ops.masked_sum(ops.softplus(gaps), valid), dml_ops.masked_count(valid)]
            )

        sums_and_counts = ops.map(one_anchor, (distances, pairs, negatives))
        return ops.sum(sums_and_counts[:, 0]), ops.sum(sums_and_counts[:, 1])
    sums, counts = mining.sum_of_hinges_over_negatives(distances, negatives, distances + margin)
    return dml_ops.masked_sum(sums, pairs), dml_ops.masked_sum(counts, pairs)


@keras.saving.register_keras_serializable(package="keras_dml")
class TripletLoss(MetricLoss):
    """Pulls each anchor closer to its positives than to its negatives by a margin.

    The general triplet loss: pick how positives and negatives are mined
    within the batch (semi-hard by default), hinge or soft margin, and any
    distance. Batches should hold several samples per class (see
    `keras_dml.data` for an M-per-class sampler). For
    tensorflow-addons' exact numbers use `TripletSemiHardLoss` /
    `TripletHardLoss`.

    Args:
        margin: hinge margin (0.2 as in FaceNet, for L2-normalised embeddings).
        negative_mining: `"semi-hard"`, `"hard"`, `"easy"` or `"all"`.
        positive_mining: `"all"`, `"hard"` or `"easy"`.
        soft_margin: use `softplus(d(a, p) - d(a, n))` instead of the hinge.
        distance: a name from `keras_dml.distances` (`"euclidean"` default).
        miner: a `keras_dml.miners.Miner` (e.g. `TripletMarginMiner`,
            `BatchHardMiner`) choosing the triplets instead of the string
            modes, which must then keep their defaults. See `triplet_loss`.
        reducer: a `keras_dml.reducers.Reducer` of the per-element terms;
            None keeps the reductions above (`AvgNonZeroReducer` with a miner).
        embedding_regularizer: a `keras_dml.regularizers` regularizer of
            the embeddings, added to the loss.
        cross_replica: under `tf.distribute`, mine among the batches of all
            replicas, so that the loss equals the one of the global batch
            (a no-op elsewhere). Defaults to `True`.
        name: loss name.
        reduction: Keras reduction; the loss is already a scalar mean.
        dtype: the loss's compute dtype (float32 by default, also under
            mixed precision).

    Example:

    >>> import numpy as np, keras, keras_dml
    >>> labels = np.array([0, 0, 1, 1])
    >>> emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], "float32")
    >>> float(keras_dml.TripletLoss(margin=0.2)(labels, emb))
    0.0
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4),
    ...                           keras.layers.UnitNormalization()])
    >>> model.compile(optimizer="adam", loss=keras_dml.TripletLoss(negative_mining="hard"))

    Reference:
        Schroff et al., "FaceNet", CVPR 2015; Hermans et al., "In Defense of
        the Triplet Loss for Person Re-Identification", 2017.
    """

    supports_multi_label = True

    def __init__(
        self,
        margin: float = 0.2,
        negative_mining: str = "semi-hard",
        positive_mining: str = "all",
        soft_margin: bool = False,
        distance: str = "euclidean",
        miner=None,
        reducer=None,
        embedding_regularizer=None,
        cross_replica: bool = True,
        name: str = "triplet_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        mining.check_modes(negative_mining, positive_mining)
        miner = miners_lib.get(miner)
        _check_miner_modes(miner, negative_mining, positive_mining)
        super().__init__(
            triplet_loss,
            name=name,
            reduction=reduction,
            dtype=dtype,
            cross_replica=cross_replica,
            margin=margin,
            negative_mining=negative_mining,
            positive_mining=positive_mining,
            soft_margin=soft_margin,
            distance=distance,
            miner=miner,
            reducer=reducers_lib.get(reducer),
            embedding_regularizer=regularizers_lib.get(embedding_regularizer),
        )


@keras.saving.register_keras_serializable(package="keras_dml")
class TripletSemiHardLoss(MetricLoss):
    """Drop-in replacement for `tfa.losses.TripletSemiHardLoss`, with the same numbers.

    Args:
        margin: triplet margin (1.0, as in addons).
        distance_metric: `"L2"` (default), `"squared-L2"` or `"angular"`.
        cross_replica: under `tf.distribute`, mine among the batches of all
            replicas (the global batch); a no-op elsewhere. Defaults to `True`.
        name: loss name.
        reduction: Keras reduction; the loss is already a scalar.
        dtype: compute dtype (float32 by default).

    Example:

    >>> import numpy as np, keras_dml
    >>> labels = np.array([0, 0, 1, 1])
    >>> emb = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], "float32")
    >>> round(float(keras_dml.TripletSemiHardLoss()(labels, emb)), 4)
    0.5858

    Reference:
        Schroff et al., "FaceNet", CVPR 2015; tensorflow-addons 0.23.
    """

    supports_multi_label = True

    def __init__(
        self,
        margin: float = 1.0,
        distance_metric: str = "L2",
        cross_replica: bool = True,
        name: str = "triplet_semihard_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        _check_tfa_metric(distance_metric)
        super().__init__(
            triplet_semihard_loss,
            name=name,
            reduction=reduction,
            dtype=dtype,
            cross_replica=cross_replica,
            margin=margin,
            distance_metric=distance_metric,
        )


@keras.saving.register_keras_serializable(package="keras_dml")
class TripletHardLoss(MetricLoss):
    """Drop-in replacement for `tfa.losses.TripletHardLoss`, with the same numbers.

    Args:
        margin: triplet margin (1.0, as in addons).
        soft: soft-margin form `log1p(exp(d(a, p*) - d(a, n*)))`.
        distance_metric: `"L2"` (default), `"squared-L2"` or `"angular"`.
        cross_replica: under `tf.distribute`, mine among the batches of all
            replicas (the global batch); a no-op elsewhere. Defaults to `True`.
        name: loss name.
        reduction: Keras reduction; the loss is already a scalar.
        dtype: compute dtype (float32 by default).

    Example:

    >>> import numpy as np, keras_dml
    >>> labels = np.array([0, 0, 1, 1])
    >>> emb = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], "float32")
    >>> round(float(keras_dml.TripletHardLoss()(labels, emb)), 4)
    1.0

    Reference:
        Hermans et al., "In Defense of the Triplet Loss", 2017; tensorflow-addons 0.23.
    """

    supports_multi_label = True

    def __init__(
        self,
        margin: float = 1.0,
        soft: bool = False,
        distance_metric: str = "L2",
        cross_replica: bool = True,
        name: str = "triplet_hard_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        _check_tfa_metric(distance_metric)
        super().__init__(
            triplet_hard_loss,
            name=name,
            reduction=reduction,
            dtype=dtype,
            cross_replica=cross_replica,
            margin=margin,
            soft=soft,
            distance_metric=distance_metric,
        )


def _check_tfa_metric(distance_metric):
    if not isinstance(distance_metric, str) or distance_metric not in _TFA_METRICS:
        raise ValueError(
            f"`distance_metric` must be one of {sorted(_TFA_METRICS)}, got {distance_metric!r}. "
            "(A callable metric, allowed by addons, cannot be saved with the model; use "
            "`keras_dml.TripletLoss(distance=...)` for other distances.)"
        )
