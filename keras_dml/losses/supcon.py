"""Supervised contrastive loss (SupCon, Khosla et al. 2020): InfoNCE with label positives."""

from __future__ import annotations

import keras
from keras import ops

from keras_dml import miners as miners_lib
from keras_dml import ops as dml_ops
from keras_dml import reducers as reducers_lib
from keras_dml._checks import check_positive
from keras_dml.losses.base import (
    MetricLoss,
    References,
    check_multi_label,
    resolve_references,
    validate_inputs,
)


def supcon_loss(
    labels,
    embeddings,
    *,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    references: References | None = None,
    multi_label: str = "any",
    miner=None,
    reducer=None,
):
    """Pulls every same-label sample towards each anchor against all other samples of the batch.

    With `z` the L2-normalised embeddings, `s_ij = z_i . z_j / temperature`
    and `P(i)` the samples with anchor `i`'s label other than `i` itself
    (the paper's L_out):
    `loss_i = -(temperature / base_temperature) * (1 / |P(i)|)
    * sum_{p in P(i)} log( exp(s_ip) / sum_{k != i} exp(s_ik) )`.
    The result is the mean of `loss_i` over the anchors with `|P(i)| >= 1`,
    and 0 (with zero gradient) when no anchor has a positive.

    The official code averages over every anchor, counting an anchor without
    positives as 0; here such anchors are left out of the mean, so the value
    does not shrink with the number of singleton labels. Both agree whenever
    each anchor has a positive, as with two or more views per instance.

    Args:
        labels: `(B,)` integer class labels. For `V` views of `N` instances,
            stack the views (`B = V * N`) and repeat the labels `V` times;
            with instance ids as labels, this is the self-supervised SimCLR
            loss (`nt_xent_loss` times `temperature / base_temperature`).
        embeddings: `(B, D)` float embeddings, normalised here.
        temperature: softmax temperature `tau > 0`. Defaults to `0.07`.
        base_temperature: `tau_base > 0`; the loss is scaled by
            `tau / tau_base`, as in the official code, so that its gradient
            magnitude does not depend on `tau`. Defaults to `0.07`.
        references: the samples each anchor's softmax runs over; the batch
            itself by default. The mean runs over the anchors with a positive
            among all queries (across replicas: the global batch).
        multi_label: with multi-hot `(B, C)` labels, `P(i)` holds the samples
            sharing a label with `i`; `"any"` averages their log-probabilities
            equally, `"jaccard"` weighs each by the Jaccard overlap of the
            label sets (a weighted mean). Both equal the single-label loss
            for one label per sample.
        miner: a `keras_dml.miners.Miner`: `P(i)` holds anchor `i`'s mined
            positives and the softmax runs over its mined positives and
            negatives only (PML's `SupConLoss` with `indices_tuple`; a triplet
            miner's (a, p) and (a, n) pairs). Single-label batches only.
        reducer: a `keras_dml.reducers.Reducer` of the per-anchor losses
            `loss_i` over the anchors with a positive; None: their mean.
            `AvgNonZeroReducer()` is PML's default (it also leaves out an
            anchor whose only softmax term is its one positive, loss 0).

    Returns:
        A scalar float32 loss (float64 for float64 inputs).
    """
    check_positive(temperature, "temperature")
    check_positive(base_temperature, "base_temperature")
    check_multi_label(multi_label)
    labels, embeddings = validate_inputs(
        labels, embeddings, "labels", "embeddings", multi_label=True
    )
    references = resolve_references(labels, embeddings, references)
    logits = references.pairwise(embeddings, "cosine", kind="similarity") / temperature
    if miner is None:
        positive_mask, _ = references.masks(labels)
        candidates = references.not_self(ops.shape(labels)[0])
    else:
        positive_mask, negative_mask = miners_lib.mined_pairs(
            miner, labels, embeddings, references
        )
        candidates = ops.logical_or(positive_mask, negative_mask)
    log_prob = dml_ops.masked_log_softmax(logits, candidates, axis=1)
    if multi_label == "jaccard":
        weights = references.jaccard(labels)
        weight_sum = dml_ops.masked_sum(weights, positive_mask, axis=1)
        mean_log_prob_positive = dml_ops.masked_sum(weights * log_prob, positive_mask, axis=1) / (
            ops.where(weight_sum > 0, weight_sum, ops.ones_like(weight_sum))
        )
    else:
        mean_log_prob_positive = dml_ops.masked_mean(log_prob, positive_mask, axis=1)
    has_positive = ops.any(positive_mask, axis=1)
    scale = temperature / base_temperature
    reducer = reducers_lib.MeanReducer() if reducer is None else reducer
    total, count = reducer.reduce(-scale * mean_log_prob_positive, has_positive, labels)
    return references.mean(total, count)


@keras.saving.register_keras_serializable(package="keras_dml")
class SupConLoss(MetricLoss):
    """Trains embeddings so that each sample is closer to all samples of its class than to others.

    Every sample is an anchor; its positives are the other samples with the
    same label and the softmax runs over all other samples of the batch, on
    cosine similarities divided by `temperature` (the paper's L_out). The loss
    is the mean over anchors with at least one positive, scaled by
    `temperature / base_temperature`; a batch without any positive pair gives
    0. Any number of views works: stack them along the batch axis and repeat
    the labels.

    Args:
        temperature: softmax temperature `tau > 0`. Defaults to `0.07`.
        base_temperature: the loss is multiplied by `tau / base_temperature`
            (official code). Defaults to `0.07`.
        multi_label: `"any"` (default) or `"jaccard"`: how the positives of
            multi-hot `(B, C)` labels are weighted (see `supcon_loss`).
        miner: a `keras_dml.miners.Miner`; each anchor's softmax then runs over
            its mined pairs only (see `supcon_loss`). Single-label batches only.
        reducer: a `keras_dml.reducers.Reducer` of the per-anchor losses;
            None: their mean (`AvgNonZeroReducer()`: PML's default).
        cross_replica: under `tf.distribute`, compare each sample with the
            batches of all replicas, so that the loss equals the one of the
            global batch (a no-op elsewhere). Defaults to `True`.
        name: name of the loss instance.
        reduction: kept for Keras compatibility; the loss is already a scalar.
        dtype: dtype of the loss computation; defaults to `keras.backend.floatx()`.
            The softmax is computed in float32 for half-precision inputs.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> from keras_dml.losses.supcon import SupConLoss
    >>> labels = np.array([0, 0, 0, 1])  # the last sample has no positive: only a negative
    >>> embeddings = np.array([[1.0, 0.0], [1.0, 0.1], [0.9, 0.3], [0.0, 1.0]], "float32")
    >>> round(float(SupConLoss(temperature=0.5, base_temperature=0.5)(labels, embeddings)), 4)
    0.7868
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model.compile(optimizer="adam", loss=SupConLoss())

    Reference:
        Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020.
    """

    supports_multi_label = True

    def __init__(
        self,
        temperature: float = 0.07,
        base_temperature: float = 0.07,
        multi_label: str = "any",
        miner=None,
        reducer=None,
        cross_replica: bool = True,
        name: str = "supcon_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        check_positive(temperature, "temperature")
        check_positive(base_temperature, "base_temperature")
        check_multi_label(multi_label)
        super().__init__(
            supcon_loss,
            name=name,
            reduction=reduction,
            dtype=dtype,
            cross_replica=cross_replica,
            temperature=temperature,
            base_temperature=base_temperature,
            multi_label=multi_label,
            miner=miners_lib.get(miner),
            reducer=reducers_lib.get(reducer),
        )
