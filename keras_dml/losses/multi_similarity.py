"""Multi-similarity loss with its pair mining (Wang et al., CVPR 2019)."""

from __future__ import annotations

import keras
from keras import ops

from keras_dml import distances
from keras_dml import miners as miners_lib
from keras_dml import ops as dml_ops
from keras_dml import reducers as reducers_lib
from keras_dml import regularizers as regularizers_lib
from keras_dml.losses.base import MetricLoss, References, resolve_references


def multi_similarity_loss(
    labels,
    embeddings,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    epsilon: float = 0.1,
    distance: str | distances.Distance = "cosine",
    references: References | None = None,
    miner: miners_lib.Miner | None = None,
    reducer: reducers_lib.Reducer | None = None,
    embedding_regularizer=None,
):
    """Weights each anchor's informative pairs by their self- and relative similarities.

    For anchor `i` with similarities `S_ij`, positives `P_i` (same label,
    `j != i`) and negatives `N_i`, pairs are first mined:

    - a positive is kept when `S_ip - epsilon < max_{n in N_i} S_in`,
    - a negative is kept when `S_in + epsilon > min_{p in P_i} S_ip`,

    and then

    `loss_i = 1/alpha * log(1 + sum_{P'_i} exp(-alpha (S_ip - base)))
    + 1/beta * log(1 + sum_{N'_i} exp(beta (S_in - base)))`.

    As in the official implementation, an anchor whose mined positives or
    mined negatives are empty contributes 0 (the paper's formula would still
    count its non-empty term), and the sum is divided by the batch size `B`
    (not by the number of contributing anchors). The official code drops
    self-pairs by discarding similarities above `1 - 1e-5`, which also
    discards exact duplicates; here only the anchor itself is excluded.

    Args:
        labels: `(B,)` int32 class labels.
        embeddings: `(B, D)` float embeddings.
        alpha: scale of the positive term (`scale_pos` in the official code).
        beta: scale of the negative term (`scale_neg`).
        base: similarity threshold `lambda` (`thresh`).
        epsilon: mining margin (`margin` in the official code).
        distance: a name accepted by `keras_dml.distances.get`; distances are
            turned into similarities (`-d`).
        references: what the anchors mine their pairs from; the batch itself
            by default. The sum runs over the anchors of all queries and is
            divided by their number (across replicas: the global batch size).
        miner: a `keras_dml.miners.Miner` whose pairs replace the built-in
            mining (then `epsilon` is unused). As in PML's
            `MultiSimilarityLoss` with a miner, each term then counts
            whenever its own pairs are non-empty (an anchor with mined
            positives but no mined negative adds its positive term), still
            divided by `B`.
        reducer: a `keras_dml.reducers.Reducer` of the `(B,)` per-anchor
            terms (0 for anchors that do not contribute); None: their sum
            divided by `B` (`MeanReducer()`).
        embedding_regularizer: a regularizer of `keras_dml.regularizers`
            whose value on `embeddings` is added to the loss.

    Returns:
        A scalar loss.
    """
    references = resolve_references(labels, embeddings, references)
    similarity = references.pairwise(embeddings, distance, kind="similarity")
    if miner is None:
        positive_mask, negative_mask = references.masks(labels)
        # Mining only selects pairs, so its thresholds carry no gradient.
        mining_similarity = ops.stop_gradient(similarity)
        hardest_negative = dml_ops.masked_max(mining_similarity, negative_mask, keepdims=True)
        hardest_positive = dml_ops.masked_min(mining_similarity, positive_mask, keepdims=True)
        mined_positive = ops.logical_and(
            positive_mask, mining_similarity - epsilon < hardest_negative
        )
        mined_negative = ops.logical_and(
            negative_mask, mining_similarity + epsilon > hardest_positive
        )
    else:
        mined_positive, mined_negative = miner.mine(labels, embeddings, references).pairs()

    positive_term = (
        dml_ops.masked_logsumexp(-alpha * (similarity - base), mined_positive, add_one=True) / alpha
    )
    negative_term = (
        dml_ops.masked_logsumexp(beta * (similarity - base), mined_negative, add_one=True) / beta
    )
    per_anchor = positive_term + negative_term
    if miner is None:
        contributes = ops.logical_and(
            ops.any(mined_positive, axis=1), ops.any(mined_negative, axis=1)
        )
        per_anchor = ops.where(contributes, per_anchor, ops.zeros_like(per_anchor))
    reducer = reducers_lib.MeanReducer() if reducer is None else reducer
    every_anchor = ops.ones(ops.shape(per_anchor), "bool")
    loss = references.mean(*reducer.reduce(per_anchor, every_anchor, labels))
    return regularizers_lib.add_embedding_regularizer(loss, embeddings, embedding_regularizer)


@keras.saving.register_keras_serializable(package="keras_dml")
class MultiSimilarityLoss(MetricLoss):
    """Trains embeddings with the multi-similarity loss, mining informative pairs in each batch.

    Each anchor keeps the positives that are less similar than its most similar
    negative plus `epsilon`, and the negatives that are more similar than its
    least similar positive minus `epsilon`; the kept pairs are weighted by
    soft-plus terms of scale `alpha` (positives) and `beta` (negatives) around
    the threshold `base`. The loss sums the per-anchor terms and divides by the
    batch size; anchors with no mined positive or no mined negative count 0,
    as in the authors' code. See `multi_similarity_loss` for the formula.

    Args:
        alpha: scale of the positive term. Defaults to `2.0`.
        beta: scale of the negative term. Defaults to `50.0`.
        base: similarity threshold `lambda`. Defaults to `0.5`.
        epsilon: mining margin. Defaults to `0.1`.
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
    >>> from keras_dml.losses.multi_similarity import MultiSimilarityLoss
    >>> labels = np.array([0, 0, 1, 1])
    >>> embeddings = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]], "float32")
    >>> round(float(MultiSimilarityLoss()(labels, embeddings)), 4)
    0.6791
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model.compile(optimizer="adam", loss=MultiSimilarityLoss())

    Reference:
        Wang, Han, Huang, Dong & Scott, "Multi-Similarity Loss with General Pair
        Weighting for Deep Metric Learning", CVPR 2019.
    """

    supports_multi_label = True

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        epsilon: float = 0.1,
        distance: str = "cosine",
        miner=None,
        reducer=None,
        embedding_regularizer=None,
        cross_replica: bool = True,
        name: str = "multi_similarity_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        for arg, value in (("alpha", alpha), ("beta", beta)):
            if not value > 0:
                raise ValueError(f"`{arg}` must be positive, got {value!r}.")
        super().__init__(
            multi_similarity_loss,
            name=name,
            reduction=reduction,
            dtype=dtype,
            cross_replica=cross_replica,
            alpha=alpha,
            beta=beta,
            base=base,
            epsilon=epsilon,
            distance=distance,
            miner=miners_lib.get(miner),
            reducer=reducers_lib.get(reducer),
            embedding_regularizer=regularizers_lib.get(embedding_regularizer),
        )
