"""NT-Xent / InfoNCE (SimCLR): each sample must pick its other view out of the batch.

Convention for the Keras loss: `y_pred` holds both views stacked along the
batch axis, `concat([view_1, view_2])` of shape `(2N, D)`, so that rows `i`
and `i + N` are the positive pair and the other `2N - 2` rows are negatives.
Labels play no part; `y_true` only has to have `N` or `2N` rows (pass zeros or
instance ids). For custom training steps (e.g. LoCo's local units), call
`nt_xent_loss(view_1, view_2)` directly.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_dml import distances
from keras_dml import miners as miners_lib
from keras_dml import ops as dml_ops
from keras_dml import reducers as reducers_lib
from keras_dml._checks import all_finite, check_positive
from keras_dml.losses.base import (
    MetricLoss,
    References,
    embeddings_matrix,
    label_masks,
    resolve_references,
    validate_inputs,
)
from keras_dml.losses.supcon import supcon_loss


def checked_views(embeddings_a, embeddings_b, check_rows=None):
    """Validates two `(N, D)` views of one batch; returns them as float tensors.

    Half-precision and integer inputs become float32; `embeddings_b` takes
    `embeddings_a`'s dtype. The one check of two views, shared by NT-Xent and
    VICReg.

    Args:
        embeddings_a: the first view, `(N, D)`.
        embeddings_b: the second view, same shape.
        check_rows: `check_rows(arg, x)` raises `ValueError` for a view whose
            number of rows the loss cannot use; by default an empty view is
            refused.

    Raises:
        ValueError: for a wrong rank, different shapes, a batch size refused
            by `check_rows`, or NaN/Inf values (eagerly; in a graph the
            values are not checked).
    """
    check_rows = check_rows or _refuse_empty
    views = []
    for arg, x in (("embeddings_a", embeddings_a), ("embeddings_b", embeddings_b)):
        x = embeddings_matrix(x, arg)
        check_rows(arg, x)
        if all_finite(x) is False:
            raise ValueError(f"`{arg}` contains NaN or Inf.")
        views.append(x)
    a, b = views
    if None not in a.shape and None not in b.shape and tuple(a.shape) != tuple(b.shape):
        raise ValueError(
            "`embeddings_a` and `embeddings_b` must be two views of the same batch with the "
            f"same shape, got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    if a.dtype != b.dtype:
        b = ops.cast(b, a.dtype)
    return a, b


def _refuse_empty(arg, x):
    if x.shape[0] == 0:
        raise ValueError(f"`{arg}` is an empty batch; NT-Xent needs at least one pair.")


def nt_xent_loss(embeddings_a, embeddings_b, temperature: float = 0.1):
    """Scores how well each sample picks out its other view among the `2N - 1` others.

    With `z = l2_normalize(concat([embeddings_a, embeddings_b]))` (2N rows)
    and `s_ij = z_i . z_j / temperature`, anchor `i` has the positive
    `p(i) = i + N (mod 2N)` and
    `loss_i = -log( exp(s_ip) / sum_{k != i} exp(s_ik) )`;
    the result is the mean of `loss_i` over all `2N` anchors (SimCLR's
    symmetric loss, both views serving as anchors).

    Args:
        embeddings_a: `(N, D)` embeddings of the first view.
        embeddings_b: `(N, D)` embeddings of the second view; row `i` is the
            same instance as row `i` of `embeddings_a`.
        temperature: softmax temperature `tau > 0`. Defaults to `0.1`.

    Returns:
        A scalar float32 loss (float64 for float64 inputs).

    Raises:
        ValueError: naming the argument, for a wrong rank, views of different
            shapes, an empty batch, NaN/Inf values or `temperature <= 0`.

    Example:

    >>> import numpy as np
    >>> from keras_dml.losses.ntxent import nt_xent_loss
    >>> view_1 = np.array([[1.0, 0.0], [0.0, 1.0]], "float32")
    >>> view_2 = np.array([[1.0, 0.1], [0.1, 1.0]], "float32")
    >>> round(float(nt_xent_loss(view_1, view_2, temperature=0.5)), 4)
    0.2899

    Reference:
        Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive
        Learning of Visual Representations", ICML 2020.
    """
    check_positive(temperature, "temperature")
    a, b = checked_views(embeddings_a, embeddings_b)
    n = ops.shape(a)[0]
    logits = distances.cosine_similarity(ops.concatenate([a, b], axis=0)) / temperature
    # Rows i and i + N share an instance id, so the label masks mark exactly the other view.
    instance_ids = ops.tile(ops.arange(n, dtype="int32"), [2])
    positive_mask, _ = label_masks(instance_ids)
    not_self = ops.logical_not(ops.cast(ops.eye(2 * n), "bool"))
    log_prob = dml_ops.masked_log_softmax(logits, not_self, axis=1)
    return -ops.mean(dml_ops.masked_sum(log_prob, positive_mask, axis=1))


def _nt_xent_from_stacked_views(
    labels,
    embeddings,
    *,
    temperature: float = 0.1,
    miner=None,
    reducer=None,
    references: References | None = None,
):
    """`nt_xent_loss` on `y_pred = concat([view_1, view_2])`.

    `labels` are the instance ids of the rows, local to this replica (`i`
    for rows `i` and `i + N`). With references (the gathered batches of all
    replicas) the references' labels are those ids shifted by each replica's
    row offset: every anchor's positive is then its other view and its
    negatives are the other `2N_global - 2` rows, the NT-Xent loss of the
    global batch (the order of the rows does not matter to it). The mean
    runs over all `2N_global` anchors. With a `miner` or a `reducer`, see
    `_mined_nt_xent`.
    """
    if references is not None:
        labels = ops.convert_to_tensor(labels)
        labels = labels + ops.cast(references.query_offset, labels.dtype)
    if miner is not None or reducer is not None:
        return _mined_nt_xent(labels, embeddings, temperature, miner, reducer, references)
    if references is not None:
        # NT-Xent is SupCon with instance ids as labels and no temperature scaling.
        return supcon_loss(
            labels,
            embeddings,
            temperature=temperature,
            base_temperature=temperature,
            references=references,
        )
    # With an unknown static batch, `split` still fails at run time on an odd batch (TF)
    # instead of silently dropping a row.
    view_1, view_2 = ops.split(embeddings, 2, axis=0)
    return nt_xent_loss(view_1, view_2, temperature=temperature)


def _mined_nt_xent(instance_ids, embeddings, temperature, miner, reducer, references):
    """NT-Xent over a miner's pairs of the stacked `2N` rows, labelled by instance id.

    Each mined positive pair `(i, p)` (without a miner: each row and its other
    view) gives `-log( exp(s_ip) / (exp(s_ip) + sum_{n in N(i)} exp(s_in)) )`,
    `N(i)` the mined negatives of anchor `i` (PML's `NTXentLoss` with
    `indices_tuple`); these per-pair terms are reduced by `reducer` (None:
    their mean). A pair without any mined negative gives 0.
    """
    references = resolve_references(instance_ids, embeddings, references)
    logits = references.pairwise(embeddings, "cosine", kind="similarity") / temperature
    positive_mask, negative_mask = miners_lib.mined_pairs(
        miner, instance_ids, embeddings, references
    )
    negative_lse = dml_ops.masked_logsumexp(logits, negative_mask, axis=1, keepdims=True)
    # -log(e^s / (e^s + e^lse)) = softplus(lse - s); an empty row's stand-in lse gives 0.
    terms = ops.softplus(negative_lse - logits)
    reducer = reducers_lib.MeanReducer() if reducer is None else reducer
    return references.mean(*reducer.reduce(terms, positive_mask, instance_ids))


@keras.saving.register_keras_serializable(package="keras_dml")
class NTXentLoss(MetricLoss):
    """Trains embeddings so that two augmented views of one input are closer than any other pair.

    `y_pred` must be both views stacked along the batch axis,
    `concat([view_1, view_2])` of shape `(2N, D)`: rows `i` and `i + N` are a
    positive pair, and each anchor's negatives are the other `2N - 2` rows.
    Similarities are cosines divided by `temperature`; the loss is the
    cross-entropy of picking the positive, averaged over all `2N` anchors.
    `y_true` is not used beyond a shape check: give it `N` rows (one per input,
    as `fit` does when the model builds both views itself) or `2N` rows (one
    per row of `y_pred`), e.g. zeros or instance ids.

    Two ways to get the stacked views:

    - in the model: apply random augmentation twice to the same inputs, run
      both through one encoder and `keras.ops.concatenate(..., axis=0)` the
      outputs (see the example);
    - in the input pipeline: batch first, then map each batch `x` to
      `concat([augment(x), augment(x)])` and `y` to `concat([ids, ids])`.

    Args:
        temperature: softmax temperature `tau > 0`; SimCLR uses 0.1 to 0.5
            depending on the batch size. Defaults to `0.1`.
        miner: a `keras_dml.miners.Miner`, run on the stacked `2N` rows with
            the instance ids as labels (the two views of an input are the
            only positives): the loss then runs over the mined positive pairs,
            each against its anchor's mined negatives (PML's `NTXentLoss`
            with `indices_tuple`; a triplet miner's pairs count once each).
        reducer: a `keras_dml.reducers.Reducer` of the per-positive-pair
            terms; None: their mean.
        cross_replica: under `tf.distribute`, each anchor's negatives are the
            rows of all replicas (`2N_global - 2`, SimCLR's large-batch
            setting), and the loss equals the one of the global batch; a
            no-op elsewhere. Defaults to `True`.
        name: name of the loss instance.
        reduction: kept for Keras compatibility; the loss is already a scalar.
        dtype: dtype of the loss computation; defaults to `keras.backend.floatx()`.
            The softmax is computed in float32 for half-precision inputs.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> from keras_dml.losses.ntxent import NTXentLoss
    >>> view_1 = np.array([[1.0, 0.0], [0.0, 1.0]], "float32")
    >>> view_2 = np.array([[1.0, 0.1], [0.1, 1.0]], "float32")
    >>> y_pred = np.concatenate([view_1, view_2])  # rows 0 & 2 and 1 & 3 are pairs
    >>> round(float(NTXentLoss(temperature=0.5)(np.zeros(4), y_pred)), 4)
    0.2899

    Building the two views inside the model, one shared encoder:

    >>> encoder = keras.Sequential([keras.layers.Dense(16, "relu"), keras.layers.Dense(4)])
    >>> augment = keras.layers.GaussianNoise(0.1)
    >>> inputs = keras.Input((8,))
    >>> views = keras.ops.concatenate([encoder(augment(inputs)), encoder(augment(inputs))], axis=0)
    >>> model = keras.Model(inputs, views)
    >>> model.compile(optimizer="adam", loss=NTXentLoss(temperature=0.1))
    >>> x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    >>> history = model.fit(x, np.zeros(32), batch_size=8, epochs=1, verbose=0)

    Reference:
        Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive
        Learning of Visual Representations", ICML 2020.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        miner=None,
        reducer=None,
        cross_replica: bool = True,
        name: str = "nt_xent_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        check_positive(temperature, "temperature")
        super().__init__(
            _nt_xent_from_stacked_views,
            name=name,
            reduction=reduction,
            dtype=dtype,
            cross_replica=cross_replica,
            temperature=temperature,
            miner=miners_lib.get(miner),
            reducer=reducers_lib.get(reducer),
        )

    def call(self, y_true, y_pred):
        y_true, y_pred = stacked_views(y_true, y_pred)
        _, embeddings = validate_inputs(y_true, y_pred)
        # Rows i and i + N are one instance; these ids find the other view
        # among the gathered replica batches too.
        instance_ids = ops.tile(ops.arange(ops.shape(embeddings)[0] // 2, dtype="int32"), [2])
        return self.compute(instance_ids, embeddings, instance_labels=True)


def stacked_views(y_true, y_pred):
    """Checks `y_pred = concat([view_1, view_2])` and gives `y_true` one row per view.

    `y_true` may have one row per input (it is repeated for the second view) or
    one per view. Returns `(y_true, y_pred)` as tensors.

    Raises:
        ValueError: for an odd number of rows in `y_pred`, or a `y_true` with
            neither `N` nor `2N` rows.
    """
    y_true = ops.convert_to_tensor(y_true)
    y_pred = ops.convert_to_tensor(y_pred)
    n_true = y_true.shape[0] if len(y_true.shape) else None
    n_pred = y_pred.shape[0] if len(y_pred.shape) else None
    if n_pred is not None and n_pred % 2:
        raise ValueError(
            "`y_pred` must stack two views, concat([view_1, view_2]), so its batch size must "
            f"be even; got {n_pred} rows."
        )
    if n_true is not None and n_pred is not None and n_true != n_pred:
        if 2 * n_true != n_pred:
            raise ValueError(
                f"`y_true` has {n_true} rows but `y_pred` has {n_pred}; with two stacked "
                f"views `y_true` must have {n_pred // 2} (one per input) or {n_pred} rows "
                "(one per view)."
            )
        # One label per input covers both of its views.
        y_true = ops.concatenate([y_true, y_true], axis=0)
    return y_true, y_pred
