"""Margin loss (Wu et al., "Sampling Matters in Deep Embedding Learning", ICCV 2017).

β, the boundary between positive and negative distances, is a fixed number
or a weight learned with the model. A `keras.losses.Loss` owns no trainable
weights (`compile`/`fit` train only the model's variables), so a learned β
lives in the model: the `MarginBeta` layer appends β to the embeddings it
passes on, and `MarginLoss(learn_beta=True)` reads it from there.
"""

from __future__ import annotations

import dataclasses

import keras
from keras import ops

from keras_dml import distances
from keras_dml import miners as miners_lib
from keras_dml import reducers as reducers_lib
from keras_dml._checks import check_non_negative, check_positive_int
from keras_dml.losses._pair_terms import oriented_matrix
from keras_dml.losses.base import MetricLoss, References, resolve_references


def _split_beta(labels, embeddings, references, learn_beta, num_classes):
    """`(embeddings, references, beta per anchor (B, 1) or None, beta columns)`."""
    if not learn_beta:
        return embeddings, references, None, None
    columns = int(num_classes or 1)
    if embeddings.shape[-1] is not None and embeddings.shape[-1] <= columns:
        raise ValueError(
            f"With `learn_beta=True` the model output must be embeddings followed by "
            f"{columns} β column(s) (the output of `MarginBeta`), got width "
            f"{embeddings.shape[-1]}."
        )
    beta = embeddings[0, -columns:]
    embeddings = embeddings[:, :-columns]
    if references is not None:
        references = dataclasses.replace(references, embeddings=references.embeddings[:, :-columns])
    if columns == 1:
        per_anchor = ops.broadcast_to(ops.reshape(beta, (1, 1)), (ops.shape(labels)[0], 1))
    else:
        per_anchor = ops.expand_dims(ops.take(beta, labels), 1)
    return embeddings, references, per_anchor, beta


def margin_loss(
    labels,
    embeddings,
    *,
    margin: float = 0.2,
    beta: float = 1.2,
    nu: float = 0.0,
    learn_beta: bool = False,
    num_classes: int | None = None,
    distance: str | distances.Distance = "euclidean",
    miner=None,
    reducer=None,
    references: References | None = None,
):
    """Keeps positive distances below `beta - margin` and negative ones above `beta + margin`.

    Over every triplet `(a, p, n)` of the batch (`p` a positive of `a`,
    `n` a negative of `a`):

    `loss = sum_triplets [relu(d_ap - beta_a + margin) + relu(beta_a - d_an + margin)]
    / (#triplets with a positive first term + #triplets with a positive second term)`

    (for a similarity `s`: `relu(beta - s_ap + margin)` and
    `relu(s_an - beta + margin)`), which is pytorch-metric-learning's
    `MarginLoss` with its `DivisorReducer`. The triplet sums are computed
    from the `(B, R)` pair terms weighted by each anchor's number of
    negatives (positives); no `(B, R, R)` tensor is built. With
    `learn_beta=True` and `nu > 0` the regulariser `nu * beta` is added (for
    per-class β, its sum over the triplets divided by the same count).

    Args:
        labels: `(B,)` int32 class labels.
        embeddings: `(B, D)` float embeddings; with `learn_beta=True`, the
            output of `MarginBeta`: `(B, D + K)`, the last `K` columns
            (`K = num_classes or 1`) holding β in every row.
        margin: half the gap between positive and negative distances.
        beta: the fixed boundary β (ignored with `learn_beta=True`).
        nu: weight of the β regulariser (only with `learn_beta=True`).
        learn_beta: read β from the last columns of `embeddings`.
        num_classes: with `learn_beta=True`, one β per class (labels must
            then be in `[0, num_classes)`); None: one β for all.
        distance: a name accepted by `keras_dml.distances.get`.
        miner: a `keras_dml.miners.Miner`: only its triplets are used (PML's
            `indices_tuple`; a pair miner's positives times its negatives, per anchor).
        reducer: a `keras_dml.reducers.Reducer` of the per-triplet terms
            `relu(d_ap - beta_a + margin) + relu(beta_a - d_an + margin)` (PML's
            `MarginLoss(reducer=...)`, reduction type "triplet"); this builds the
            `(B, R, R)` triplet terms. With `learn_beta=True`, `nu > 0` and
            per-class β, the regulariser's per-triplet terms `nu * beta_a` are
            reduced by the same reducer and added. None: the division by the
            number of non-zero terms above.
        references: what the anchors take positives and negatives from; the
            batch itself by default.

    Returns:
        A scalar loss; 0 when the batch has no triplet (no positive pair or
        no negative pair) or every term is 0.
    """
    embeddings, references, beta_columns, beta_vector = _split_beta(
        labels, embeddings, references, learn_beta, num_classes
    )
    references = resolve_references(labels, embeddings, references)
    matrix, sign = oriented_matrix(references, embeddings, distance)
    beta_a = beta if beta_columns is None else ops.cast(beta_columns, matrix.dtype)
    positive_terms = ops.relu(sign * (matrix - beta_a) + margin)
    negative_terms = ops.relu(sign * (beta_a - matrix) + margin)
    if reducer is not None:
        return _reduced_margin_loss(
            labels, embeddings, references, miner, reducer, positive_terms, negative_terms,
            beta_a if learn_beta and nu else None, nu, num_classes, beta_vector,
        )
    # A pair term enters as many triplets as hold that pair (every positive times every
    # negative of its anchor, or the miner's triplets).
    positive_count, negative_count = miners_lib.mined_triplet_counts(
        miner, labels, embeddings, references
    )
    positive_count = ops.cast(positive_count, matrix.dtype)
    negative_count = ops.cast(negative_count, matrix.dtype)
    total = ops.sum(positive_terms * positive_count) + ops.sum(negative_terms * negative_count)
    active = ops.sum(ops.cast(positive_terms > 0, matrix.dtype) * positive_count) + ops.sum(
        ops.cast(negative_terms > 0, matrix.dtype) * negative_count
    )
    loss = references.mean(total, ops.stop_gradient(active))
    if learn_beta and nu:
        triplets_per_anchor = ops.sum(positive_count, axis=1, keepdims=True)
        has_triplet = ops.sum(triplets_per_anchor) > 0
        if num_classes:
            regulariser = references.mean(
                nu * ops.sum(beta_a * triplets_per_anchor), ops.stop_gradient(active)
            )
        else:
            regulariser = nu * ops.cast(ops.reshape(beta_vector, ()), matrix.dtype)
        loss = loss + ops.where(has_triplet, regulariser, ops.zeros_like(regulariser))
    return loss


def _reduced_margin_loss(
    labels, embeddings, references, miner, reducer, positive_terms, negative_terms,
    learned_beta, nu, num_classes, beta_vector,
):
    """`margin_loss` with a reducer: the `(B, R, R)` triplet terms reduced by `reducer`.

    `learned_beta` is the per-anchor β when it is learned and regularised
    (`nu > 0`), else None.
    """
    triplets = miners_lib.mined_triplets(miner, labels, embeddings, references)
    terms = ops.expand_dims(positive_terms, 2) + ops.expand_dims(negative_terms, 1)
    loss = references.mean(*reducer.reduce(terms, triplets, labels))
    if learned_beta is None:
        return loss
    if num_classes:
        # PML: one `nu * beta_a` element per triplet, reduced by the same reducer.
        per_triplet = ops.broadcast_to(
            ops.expand_dims(nu * learned_beta, 2), ops.shape(terms)
        )
        regulariser = references.mean(*reducer.reduce(per_triplet, triplets, labels))
    else:
        # PML: one β is an already-reduced `nu * beta`, added as it is.
        regulariser = nu * ops.cast(ops.reshape(beta_vector, ()), terms.dtype)
    return loss + ops.where(ops.any(triplets), regulariser, ops.zeros_like(regulariser))


@keras.saving.register_keras_serializable(package="keras_dml")
class MarginBeta(keras.layers.Layer):
    """Holds the learnable β of `MarginLoss` and appends it to the embeddings it passes on.

    Put it last in the training model and compile with
    `MarginLoss(learn_beta=True, num_classes=...)` (same `num_classes`); the
    output is `(B, D + K)`, the embeddings followed by the `K` β values
    (`K = num_classes or 1`) repeated in every row. Serve the model without
    this layer (e.g. the model up to the layer before it).

    Args:
        num_classes: one β per class, or None for a single β.
        beta: initial value of β. Defaults to `1.2` (PML's default).

    Example:

    >>> import keras
    >>> from keras_dml.losses.margin import MarginBeta, MarginLoss
    >>> embed = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4),
    ...                           keras.layers.UnitNormalization()])
    >>> model = keras.Sequential([embed, MarginBeta(num_classes=3)])
    >>> model.compile(optimizer="adam", loss=MarginLoss(learn_beta=True, num_classes=3))
    >>> model.output_shape
    (None, 7)
    """

    def __init__(self, num_classes: int | None = None, beta: float = 1.2, **kwargs):
        super().__init__(**kwargs)
        if num_classes is not None:
            check_positive_int(num_classes, "num_classes")
        self.num_classes = None if num_classes is None else int(num_classes)
        self.beta_initial = float(beta)

    def build(self, input_shape):
        self.beta = self.add_weight(
            name="beta",
            shape=(self.num_classes or 1,),
            initializer=keras.initializers.Constant(self.beta_initial),
        )

    def call(self, embeddings):
        rows = ops.shape(embeddings)[0]
        beta = ops.cast(ops.expand_dims(self.beta, 0), embeddings.dtype)
        return ops.concatenate([embeddings, ops.tile(beta, (rows, 1))], axis=1)

    def compute_output_shape(self, input_shape):
        width = None if input_shape[-1] is None else input_shape[-1] + (self.num_classes or 1)
        return (*input_shape[:-1], width)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(num_classes=self.num_classes, beta=self.beta_initial)
        return config


@keras.saving.register_keras_serializable(package="keras_dml")
class MarginLoss(MetricLoss):
    """Trains embeddings so that positive pairs fall below and negative pairs above a boundary β.

    Every triplet of the batch contributes `relu(d_ap - beta + margin)` and
    `relu(beta - d_an + margin)`; the sum is divided by the number of
    non-zero terms (pytorch-metric-learning's `MarginLoss` with its default
    `DivisorReducer`, `triplets_per_anchor="all"`). See `margin_loss`.

    β fixed: a plain loss. β learned (the paper's setting, per class with
    `num_classes`): add a `MarginBeta` layer at the end of the training model
    and pass `learn_beta=True` (and the same `num_classes`); β is then one
    of the model's weights, trained by `fit`, saved with the model, and read
    by the loss from the model output's last columns.

    Differences from PML: PML's `LpDistance` L2-normalises embeddings first
    by default; here `"euclidean"` is measured on the embeddings as given
    (end the model with `keras.layers.UnitNormalization()` for PML's
    default). `nu` without `learn_beta=True` is refused (PML ignores it).
    Defaults (`margin=0.2`, `beta=1.2`, `nu=0`) are PML's.

    Args:
        margin: half the gap between positive and negative distances. Defaults to `0.2`.
        beta: the fixed β (initial β is `MarginBeta`'s). Defaults to `1.2`.
        nu: weight of the `nu * beta` regulariser, with `learn_beta=True`. Defaults to `0`.
        learn_beta: read β from the model output (see `MarginBeta`). Defaults to `False`.
        num_classes: with `learn_beta=True`, one β per class. Defaults to None.
        distance: a name accepted by `keras_dml.distances.get`. Defaults to `"euclidean"`.
        miner: a `keras_dml.miners.Miner` choosing the triplets (see the function).
        reducer: a `keras_dml.reducers.Reducer` of the per-triplet terms (see
            the function); None: PML's default `DivisorReducer` reduction above.
        cross_replica: under `tf.distribute`, compare with all replicas' batches.
        name: name of the loss instance.
        reduction: kept for Keras compatibility; the loss is already a scalar.
        dtype: dtype of the loss computation.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> from keras_dml.losses.margin import MarginLoss
    >>> labels = np.array([0, 0, 1, 1])
    >>> embeddings = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]], "float32")
    >>> round(float(MarginLoss()(labels, embeddings)), 4)
    0.8841
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model.compile(optimizer="adam", loss=MarginLoss(margin=0.2, beta=1.2))

    Reference:
        Wu, Manmatha, Smola & Krähenbühl, "Sampling Matters in Deep
        Embedding Learning", ICCV 2017.
    """

    def __init__(
        self,
        margin: float = 0.2,
        beta: float = 1.2,
        nu: float = 0.0,
        learn_beta: bool = False,
        num_classes: int | None = None,
        distance: str = "euclidean",
        miner=None,
        reducer=None,
        cross_replica: bool = True,
        name: str = "margin_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        check_non_negative(margin, "margin")
        if nu and not learn_beta:
            raise ValueError("`nu` regularises a learned β: it needs `learn_beta=True`.")
        if num_classes is not None:
            check_positive_int(num_classes, "num_classes")
            if not learn_beta:
                raise ValueError(
                    "`num_classes` gives one learned β per class: it needs `learn_beta=True`."
                )
        super().__init__(
            margin_loss,
            name=name,
            reduction=reduction,
            dtype=dtype,
            cross_replica=cross_replica,
            margin=margin,
            beta=beta,
            nu=nu,
            learn_beta=bool(learn_beta),
            num_classes=None if num_classes is None else int(num_classes),
            distance=distance,
            miner=miners_lib.get(miner),
            reducer=reducers_lib.get(reducer),
        )
