"""Circle loss (Sun et al., CVPR 2020) over the pairs of a batch."""

from __future__ import annotations

import keras
from keras import ops

from keras_dml import distances
from keras_dml import miners as miners_lib
from keras_dml import ops as dml_ops
from keras_dml import reducers as reducers_lib
from keras_dml import regularizers as regularizers_lib
from keras_dml.losses.base import MetricLoss, References, resolve_references


def circle_loss(
    labels,
    embeddings,
    *,
    margin: float = 0.25,
    gamma: float = 256.0,
    distance: str | distances.Distance = "cosine",
    references: References | None = None,
    miner: miners_lib.Miner | None = None,
    reducer: reducers_lib.Reducer | None = None,
    embedding_regularizer=None,
):
    """Re-weights every similarity by its distance from its optimum, then applies a soft-plus.

    With similarities `s`, optima `O_p = 1 + m`, `O_n = -m` and decision
    margins `Delta_p = 1 - m`, `Delta_n = m`, the weights
    `alpha_p = relu(O_p - s_p)` and `alpha_n = relu(s_n - O_n)` are constants
    (no gradient flows through them, as in the paper and its code), and for
    each anchor

    `loss_i = softplus(logsumexp_{N_i}(gamma alpha_n (s_n - Delta_n))
    + logsumexp_{P_i}(-gamma alpha_p (s_p - Delta_p)))`.

    The result is the mean over anchors that have at least one positive and
    one negative, 0 when none has.

    Args:
        labels: `(B,)` int32 class labels.
        embeddings: `(B, D)` float embeddings.
        margin: relaxation `m`.
        gamma: scale `gamma`.
        distance: a name accepted by `keras_dml.distances.get`; distances are
            turned into similarities (`-d`).
        references: what the anchors are paired with; the batch itself by
            default. The mean runs over the contributing anchors of all
            queries (across replicas: of the global batch).
        miner: a `keras_dml.miners.Miner` whose pairs replace the label
            masks (a triplet miner's (a, p) and (a, n) pairs).
        reducer: a `keras_dml.reducers.Reducer` of the `(B,)` per-anchor
            terms over the anchors with a positive and a negative pair;
            None: their mean (`MeanReducer()`; PML's default,
            `AvgNonZeroReducer()`, gives the same value unless a term
            underflows to 0).
        embedding_regularizer: a regularizer of `keras_dml.regularizers`
            whose value on `embeddings` is added to the loss.

    Returns:
        A scalar loss.
    """
    references = resolve_references(labels, embeddings, references)
    similarity = references.pairwise(embeddings, distance, kind="similarity")
    positive_mask, negative_mask = miners_lib.mined_pairs(miner, labels, embeddings, references)
    alpha_positive = ops.stop_gradient(ops.relu(1.0 + margin - similarity))
    alpha_negative = ops.stop_gradient(ops.relu(similarity + margin))
    positive_logits = -gamma * alpha_positive * (similarity - (1.0 - margin))
    negative_logits = gamma * alpha_negative * (similarity - margin)
    # With gamma = 256 the logits reach hundreds: only a shifted, masked
    # log-sum-exp keeps them (and their gradients) finite.
    per_anchor = ops.softplus(
        dml_ops.masked_logsumexp(negative_logits, negative_mask)
        + dml_ops.masked_logsumexp(positive_logits, positive_mask)
    )
    has_pairs = ops.logical_and(ops.any(positive_mask, axis=1), ops.any(negative_mask, axis=1))
    reducer = reducers_lib.MeanReducer() if reducer is None else reducer
    loss = references.mean(*reducer.reduce(per_anchor, has_pairs, labels))
    return regularizers_lib.add_embedding_regularizer(loss, embeddings, embedding_regularizer)


@keras.saving.register_keras_serializable(package="keras_dml")
class CircleLoss(MetricLoss):
    """Trains embeddings with the circle loss, weighting each pair by its distance from its optimum.

    Values agree with `keras.losses.Circle(gamma=..., margin=...)` on
    L2-normalised embeddings with the default `"sum_over_batch_size"`
    reduction: Keras also averages over the anchors with a positive and a
    negative (it masks out per-anchor losses that are exactly 0, which in
    float32 can also drop an anchor whose loss underflows, below about
    `1e-45`). Two differences: gradients, because Keras differentiates through
    the weights `alpha_p`, `alpha_n` while this loss (like the paper's code)
    treats them as constants; and the defaults, `margin=0.25, gamma=256`
    (paper) here against `margin=0.4, gamma=80` in Keras. Keras does not
    normalise its inputs; `distance="cosine"` here does.

    Args:
        margin: relaxation `m`; the optima are `1 + m` and `-m`, the decision
            margins `1 - m` and `m`. Defaults to `0.25`.
        gamma: scale `gamma`. Defaults to `256.0`.
        distance: `"cosine"` (default) or `"dot"`; a distance such as
            `"euclidean"` is used as the similarity `-d`.
        miner: a `keras_dml.miners.Miner` choosing the pairs (a triplet
            miner's (a, p) and (a, n) pairs); see the function.
        reducer: a `keras_dml.reducers.Reducer` of the per-element terms;
            None keeps the reduction described above.
        embedding_regularizer: a `keras_dml.regularizers` regularizer of
            the embeddings, added to the loss.
        cross_replica: under `tf.distribute`, compare each sample with the
            batches of all replicas, so that the loss equals the one of the
            global batch (a no-op elsewhere). Defaults to `True`.
        name: name of the loss instance.
        reduction: kept for Keras compatibility; the loss is already a scalar.
        dtype: dtype of the loss computation; defaults to `keras.backend.floatx()`.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> from keras_dml.losses.circle import CircleLoss
    >>> labels = np.array([0, 0, 1, 1])
    >>> embeddings = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]], "float32")
    >>> round(float(CircleLoss(margin=0.4, gamma=80.0)(labels, embeddings)), 3)
    49.664
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model.compile(optimizer="adam", loss=CircleLoss())

    Reference:
        Sun, Cheng, Zhang, Zhang, Zheng, Wang & Wei, "Circle Loss: A Unified
        Perspective of Pair Similarity Optimization", CVPR 2020.
    """

    supports_multi_label = True

    def __init__(
        self,
        margin: float = 0.25,
        gamma: float = 256.0,
        distance: str = "cosine",
        miner=None,
        reducer=None,
        embedding_regularizer=None,
        cross_replica: bool = True,
        name: str = "circle_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        if not gamma > 0:
            raise ValueError(f"`gamma` must be positive, got {gamma!r}.")
        super().__init__(
            circle_loss,
            name=name,
            reduction=reduction,
            dtype=dtype,
            cross_replica=cross_replica,
            margin=margin,
            gamma=gamma,
            distance=distance,
            miner=miners_lib.get(miner),
            reducer=reducers_lib.get(reducer),
            embedding_regularizer=regularizers_lib.get(embedding_regularizer),
        )
