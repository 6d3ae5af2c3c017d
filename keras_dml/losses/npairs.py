"""Multi-class N-pair loss (Sohn, NeurIPS 2016): softmax cross-entropy over batch similarities.

Two entry points, because tensorflow-addons used the name for a loss on a
precomputed similarity matrix:

- `NPairsLoss` / `npairs_loss(labels, embeddings)` take embeddings, as every
  keras-dml loss does, and build the similarity matrix themselves.
- `npairs_loss_from_similarity(labels, similarity)` takes the `(B, B)`
  anchor-by-positive similarity matrix that `tfa.losses.npairs_loss(y_true,
  y_pred)` took and returns exactly its value.

Passing a similarity matrix to `NPairsLoss` would silently treat its rows as
embeddings; code migrated from `tfa.losses.NpairsLoss` must call
`npairs_loss_from_similarity` instead.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_dml import distances
from keras_dml import ops as dml_ops
from keras_dml.losses.base import (
    MetricLoss,
    References,
    resolve_references,
    validate_inputs,
)


def npairs_loss(
    labels,
    embeddings,
    *,
    l2_reg: float = 0.001,
    distance: str | distances.Distance = "dot",
    references: References | None = None,
    pairs: str = "all",
):
    """Classifies, for every anchor, which other samples of the batch share its label.

    Each anchor `i` takes a softmax over the similarities `s_ij` to every other
    sample `j != i` of the batch, and its target distribution spreads mass
    `1 / |P(i)|` over its positives `P(i)` (same label, `j != i`):
    `loss_i = -(1 / |P(i)|) * sum_{p in P(i)} log softmax_{j != i}(s_ij)[p]`.
    The loss is the mean of `loss_i` over the anchors that have a positive (0
    when none has), plus `l2_reg` times the mean squared L2 norm of the
    embeddings.

    Sohn builds each batch from N (anchor, positive) pairs of distinct classes
    and scores each anchor against the N positives only; using every sample
    as both anchor and candidate gives each anchor 2N - 1 candidates (2N - 2
    negatives) instead of N and works for any batch composition. For Sohn's
    anchor-by-positive form, call
    `npairs_loss_from_similarity(labels, anchors @ positives.T)`.

    Args:
        labels: `(B,)` integer class labels.
        embeddings: `(B, D)` float embeddings, not normalised for `"dot"`.
        l2_reg: weight of the mean squared embedding norm. With dot-product
            logits the cross-entropy keeps falling as the embeddings grow, so
            Sohn regularises their norm; `0.001` is the penalty that
            TensorFlow's original `tf.contrib` `npairs_loss` applied by default
            (`reg_lambda=0.002`, added as `0.25 * reg_lambda * (mean |anchor|^2
            + mean |positive|^2)`, i.e. `0.001` times the mean over both
            halves). Use `0.0` with `distance="cosine"`.
        distance: a name accepted by `keras_dml.distances.get`; distances are
            turned into similarities by negation.
        references: the candidates of each anchor's softmax; the batch itself
            by default. Both means (over anchors with a positive, and the
            regulariser's over samples) run over all queries (across
            replicas: the global batch).
        pairs: `"all"` (default): every sample is an anchor, as above.
            `"one_per_class"`: Sohn's form as pytorch-metric-learning's
            `NPairsLoss` builds it from a labelled batch: for each class with
            at least two samples, its first sample (in batch order) is the
            anchor and its second the positive; each anchor's softmax runs
            over the C positives (a `C x C` cross-entropy, target the
            diagonal), averaged over the C anchors. The other samples enter
            only the regulariser. Only with the batch as its own references
            (no `references`; under `tf.distribute`, `cross_replica=False`).

    Returns:
        A scalar float32 loss (float64 for float64 inputs).
    """
    labels, embeddings = validate_inputs(labels, embeddings, "labels", "embeddings")
    if pairs not in ("all", "one_per_class"):
        raise ValueError(f'`pairs` must be "all" or "one_per_class", got {pairs!r}.')
    if pairs == "one_per_class":
        if references is not None:
            raise ValueError(
                '`pairs="one_per_class"` pairs samples within the batch only; it takes no '
                "`references` (under tf.distribute, use `cross_replica=False`)."
            )
        loss = _one_pair_per_class_loss(labels, embeddings, distance)
        if l2_reg:
            loss = loss + l2_reg * ops.mean(ops.sum(ops.square(embeddings), axis=1))
        return loss
    references = resolve_references(labels, embeddings, references)
    similarity = references.pairwise(embeddings, distance, kind="similarity")
    positive_mask, _ = references.masks(labels)
    not_self = references.not_self(ops.shape(labels)[0])
    # -mean_p log softmax(s_i)[p] = logsumexp_{j != i} s_ij - mean_p s_ip: two row
    # reductions, no (B, R) log-probability matrix (nor its gradient) is built.
    log_normaliser = dml_ops.masked_logsumexp(similarity, not_self, axis=1)
    num_positives = dml_ops.masked_count(positive_mask, axis=1, dtype=similarity.dtype)
    positive_sum = dml_ops.masked_sum(similarity, positive_mask, axis=1)
    per_anchor = log_normaliser - positive_sum / ops.maximum(num_positives, 1.0)
    has_positive = num_positives > 0
    loss = references.mean(
        dml_ops.masked_sum(per_anchor, has_positive), dml_ops.masked_count(has_positive)
    )
    if l2_reg:
        loss = loss + l2_reg * references.mean_over_queries(ops.sum(ops.square(embeddings), axis=1))
    return loss


def _one_pair_per_class_loss(labels, embeddings, distance):
    """Cross-entropy of the `C x C` anchor-by-positive similarities, one pair per class.

    The pairs are found without any `(B, B)` tensor: each sample's class is
    named by the first position of its label in the sorted labels, and a
    segment minimum of the batch positions per class gives its first sample
    (the anchor), a second one its next sample (the positive). Static shapes
    for every backend (and XLA): the anchors, in batch order, fill `S` slots
    where `S` is the smallest of `B // 16`, `B // 4`, `B // 2` that holds the
    batch's C pairs (chosen at run time by `ops.switch`; no batch has more
    than `B // 2`), the unused slots masked out, so an M-per-class batch
    costs a `C x C` softmax, as in pytorch-metric-learning.
    """
    n = ops.shape(labels)[0]
    position = ops.arange(n, dtype="int32")
    klass = ops.cast(ops.searchsorted(ops.sort(labels), labels, side="left"), "int32")
    size = ops.segment_sum(ops.ones_like(position), klass, num_segments=n)
    has_pair = size >= 2  # classes are named by ids in [0, n); most ids are unused
    first = ops.segment_min(position, klass, num_segments=n)
    first = ops.where(has_pair, first, 0)
    is_first = ops.equal(position, ops.take(first, klass))
    second = ops.segment_min(ops.where(is_first, n, position), klass, num_segments=n)
    second = ops.where(has_pair, second, 0)
    # Classes with a pair first, in the batch order of their anchors.
    key = ops.cast(ops.where(has_pair, -first, -n - position), "float32")
    num_pairs = ops.sum(ops.cast(has_pair, "int32"))

    def loss_with(slots):
        def branch():
            _, chosen = ops.top_k(key, slots)
            valid = ops.take(has_pair, chosen)
            anchors = ops.take(embeddings, ops.take(first, chosen), axis=0)
            positives = ops.take(embeddings, ops.take(second, chosen), axis=0)
            logits = distances.get(distance).similarity(anchors, positives)
            columns = ops.logical_and(
                ops.expand_dims(valid, 0), ops.ones_like(logits, dtype="bool")
            )
            per_anchor = dml_ops.masked_logsumexp(logits, columns, axis=1) - ops.diagonal(logits)
            total = dml_ops.masked_sum(per_anchor, valid)
            return total / ops.maximum(dml_ops.masked_count(valid, dtype=total.dtype), 1.0)

        return branch

    if isinstance(n, int):
        sizes = sorted({max(n // 16, 1), max(n // 4, 1), max(n // 2, 1)})
    else:
        sizes = [ops.maximum(n // d, 1) for d in (16, 4, 2)]
    if len(sizes) == 1:
        return loss_with(sizes[0])()
    index = sum(ops.cast(num_pairs > size, "int32") for size in sizes[:-1])
    return ops.switch(index, [loss_with(size) for size in sizes])


@keras.saving.register_keras_serializable(package="keras_dml")
def npairs_loss_from_similarity(labels, similarity):
    """Computes tensorflow-addons' `npairs_loss(y_true, y_pred)` exactly, for migrating code.

    `similarity[i, j]` scores anchor `i` against positive `j`. Each row is a
    softmax over all `B` columns, the diagonal included, against targets that
    spread mass evenly over the columns with the anchor's label (so a row is
    never without a target); the loss is the mean cross-entropy over rows.
    Unlike `npairs_loss`, no regulariser is added.

    Args:
        labels: `(B,)` integer class labels (tfa's `y_true`).
        similarity: `(B, B)` float similarity matrix (tfa's `y_pred`), e.g.
            `anchors @ positives.T`.

    Returns:
        A scalar float32 loss (float64 for float64 inputs).

    Raises:
        ValueError: naming the argument, if `similarity` is not a square
            `(B, B)` matrix matching `labels`, is empty or holds NaN/Inf.

    Example:

    >>> import numpy as np
    >>> from keras_dml.losses.npairs import npairs_loss_from_similarity
    >>> labels = np.array([0, 1, 1])
    >>> similarity = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]], "float32")
    >>> round(float(npairs_loss_from_similarity(labels, similarity)), 4)
    0.6545

    In place of `tfa.losses.NpairsLoss()`, for a model whose output is the
    anchor-by-positive similarity matrix:

    >>> import keras
    >>> encoder = keras.layers.Dense(4)
    >>> anchors, positives = keras.Input((8,)), keras.Input((8,))
    >>> scores = keras.ops.matmul(encoder(anchors), keras.ops.transpose(encoder(positives)))
    >>> model = keras.Model([anchors, positives], scores)
    >>> model.compile(optimizer="adam", loss=npairs_loss_from_similarity)

    Reference:
        Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss
        Objective", NeurIPS 2016; tensorflow-addons `tfa.losses.npairs_loss`.
    """
    similarity = ops.convert_to_tensor(similarity)
    if len(similarity.shape) != 2 or (
        None not in similarity.shape and similarity.shape[0] != similarity.shape[1]
    ):
        raise ValueError(
            "`similarity` must be a square (batch, batch) anchor-by-positive matrix, got shape "
            f"{tuple(similarity.shape)}."
        )
    labels, similarity = validate_inputs(labels, similarity, "labels", "similarity")
    same = ops.cast(
        ops.equal(ops.expand_dims(labels, 1), ops.expand_dims(labels, 0)), similarity.dtype
    )
    targets = same / ops.sum(same, axis=1, keepdims=True)
    log_prob = ops.log_softmax(similarity, axis=1)
    return ops.mean(-ops.sum(targets * log_prob, axis=1))


@keras.saving.register_keras_serializable(package="keras_dml")
class NPairsLoss(MetricLoss):
    """Trains embeddings so that each sample's softmax over the batch picks out its own class.

    For every anchor, the similarities to all other samples of the batch form
    the logits of a softmax whose target is uniform over the anchor's
    positives (same label); the loss is the mean cross-entropy over anchors
    that have a positive, plus `l2_reg` times the mean squared embedding norm.
    Batches should hold at least two samples per class (e.g. N pairs of N
    classes); anchors without a positive are skipped, and a batch without any
    positive pair gives only the regulariser.

    This loss takes embeddings. tensorflow-addons' `NpairsLoss` took a
    `(B, B)` similarity matrix instead; for its exact numbers use
    `keras_dml.losses.npairs.npairs_loss_from_similarity`.

    Args:
        l2_reg: weight of the mean squared L2 norm of the embeddings. Dot-product
            logits can lower the cross-entropy just by growing the embeddings,
            so Sohn regularises their norm; the default `0.001` equals the
            default penalty of TensorFlow's original `tf.contrib` N-pair loss.
            Use `0.0` with `distance="cosine"`. Defaults to `0.001`.
        distance: similarity used as logits: `"dot"` (default, as in the
            paper), `"cosine"`, or a distance name (`"euclidean"`, ...) whose
            negation is used.
        cross_replica: under `tf.distribute`, compare each sample with the
            batches of all replicas, so that the loss equals the one of the
            global batch (a no-op elsewhere). Defaults to `True`.
        name: name of the loss instance.
        reduction: kept for Keras compatibility; the loss is already a scalar.
        dtype: dtype of the loss computation; defaults to `keras.backend.floatx()`.
            The softmax is computed in float32 for half-precision inputs.
        pairs: `"all"` (default: every sample is an anchor against all the
            others) or `"one_per_class"` (one (anchor, positive) pair per
            class, a `C x C` softmax, as pytorch-metric-learning's
            `NPairsLoss`; see `npairs_loss`). Needs `cross_replica=False`
            under `tf.distribute`.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> from keras_dml.losses.npairs import NPairsLoss
    >>> labels = np.array([0, 0, 1, 1])
    >>> embeddings = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]], "float32")
    >>> round(float(NPairsLoss(l2_reg=0.0)(labels, embeddings)), 4)
    0.5959
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model.compile(optimizer="adam", loss=NPairsLoss())

    Reference:
        Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss
        Objective", NeurIPS 2016.
    """

    def __init__(
        self,
        l2_reg: float = 0.001,
        distance: str = "dot",
        cross_replica: bool = True,
        name: str = "npairs_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
        pairs: str = "all",
    ):
        if l2_reg < 0:
            raise ValueError(f"`l2_reg` must be >= 0, got {l2_reg}.")
        if pairs not in ("all", "one_per_class"):
            raise ValueError(f'`pairs` must be "all" or "one_per_class", got {pairs!r}.')
        super().__init__(
            npairs_loss,
            name=name,
            reduction=reduction,
            dtype=dtype,
            cross_replica=cross_replica,
            l2_reg=l2_reg,
            distance=distance,
            pairs=pairs,
        )
