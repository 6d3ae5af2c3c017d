"""Contrastive loss on the signal-to-noise-ratio distance (Yuan et al., CVPR 2019)."""

from __future__ import annotations

import keras
from keras import ops

from keras_dml import distances
from keras_dml import miners as miners_lib
from keras_dml import reducers as reducers_lib
from keras_dml.losses._pair_terms import mean_of_positive_terms
from keras_dml.losses.base import MetricLoss, References, resolve_references

# Floor of a query's variance: a constant embedding row has no signal.
_MIN_VARIANCE = 1e-12


def snr_distance(queries, references=None):
    """`(B, R)` signal-to-noise-ratio distances `var(x_j - x_i) / var(x_i)`.

    The variance runs over the embedding dimensions (the ratio does not
    depend on the degrees of freedom). Computed from the centred rows
    `c = x - mean(x)`: `var(x_j - x_i) / var(x_i) = |c_i - c_j|^2 / |c_i|^2`,
    so no `(B, R, D)` tensor is built.
    """
    queries = ops.convert_to_tensor(queries)
    centred = queries - ops.mean(queries, axis=1, keepdims=True)
    if references is None:
        squared = distances.squared_euclidean_distance(centred)
    else:
        references = ops.cast(references, centred.dtype)
        ref_centred = references - ops.mean(references, axis=1, keepdims=True)
        squared = distances.squared_euclidean_distance(centred, ref_centred)
    signal = ops.sum(ops.square(centred), axis=1, keepdims=True)
    return squared / ops.maximum(signal, _MIN_VARIANCE)


def snr_contrastive_loss(
    labels,
    embeddings,
    *,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    normalize: bool = True,
    miner=None,
    reducer=None,
    references: References | None = None,
):
    """Contrastive loss on the signal-to-noise-ratio distance.

    With `d_ij = var(x_j - x_i) / var(x_i)` (`snr_distance`; on
    L2-normalised embeddings with `normalize=True`, PML's default), a
    positive pair costs `relu(d - pos_margin)` and a negative pair
    `relu(neg_margin - d)`; the loss is the mean of the non-zero positive
    terms plus the mean of the non-zero negative terms (PML's
    `ContrastiveLoss` with `SNRDistance` and its default reducer).

    Args:
        labels: `(B,)` int32 class labels.
        embeddings: `(B, D)` float embeddings, `D >= 2`.
        pos_margin: SNR distance below which a positive pair costs nothing.
        neg_margin: SNR distance beyond which a negative pair costs nothing.
        normalize: L2-normalise the embeddings first.
        miner: a `keras_dml.miners.Miner`: only its pairs are used (PML's
            `indices_tuple`; a triplet miner's (a, p) and (a, n) pairs, each once).
        reducer: a `keras_dml.reducers.Reducer` of the per-element terms;
            None: the reduction described above.
        references: what the queries are paired with; the batch itself by default.

    Returns:
        A scalar loss; a part without pairs counts 0.
    """
    references = resolve_references(labels, embeddings, references)
    queries = distances.l2_normalize(embeddings) if normalize else embeddings
    if references._is_query_batch:
        matrix = snr_distance(queries)
    else:
        refs = references.embeddings
        matrix = snr_distance(queries, distances.l2_normalize(refs) if normalize else refs)
    positive, negative = miners_lib.mined_pairs(miner, labels, embeddings, references)
    return mean_of_positive_terms(
        references, ops.relu(matrix - pos_margin), positive, reducer, labels
    ) + mean_of_positive_terms(
        references, ops.relu(neg_margin - matrix), negative, reducer, labels
    )


@keras.saving.register_keras_serializable(package="keras_dml")
class SignalToNoiseRatioContrastiveLoss(MetricLoss):
    """Trains embeddings with the contrastive loss on signal-to-noise-ratio distances.

    pytorch-metric-learning's `SignalToNoiseRatioContrastiveLoss` (its
    `ContrastiveLoss` with `SNRDistance`: same defaults `pos_margin=0`,
    `neg_margin=1`, embeddings L2-normalised first, same averaging of the
    non-zero terms of each part). See `snr_contrastive_loss`.

    Args:
        pos_margin: SNR distance below which a positive pair costs nothing. Defaults to `0.0`.
        neg_margin: SNR distance beyond which a negative pair costs nothing. Defaults to `1.0`.
        normalize: L2-normalise the embeddings first. Defaults to `True`.
        miner: a `keras_dml.miners.Miner` choosing the pairs (see the function).
        reducer: a `keras_dml.reducers.Reducer` of the per-element terms (see the function).
        cross_replica: under `tf.distribute`, compare with all replicas' batches.
        name: name of the loss instance.
        reduction: kept for Keras compatibility; the loss is already a scalar.
        dtype: dtype of the loss computation.

    Example:

    >>> import numpy as np
    >>> from keras_dml.losses.snr_contrastive import SignalToNoiseRatioContrastiveLoss
    >>> labels = np.array([0, 0, 1, 1])
    >>> embeddings = np.array([[1.0, 0.0, 0.2], [0.6, 0.8, 0.1], [0.8, 0.6, 0.0],
    ...                        [0.0, 1.0, 0.3]], "float32")
    >>> round(float(SignalToNoiseRatioContrastiveLoss()(labels, embeddings)), 4)
    2.5853

    Reference:
        Yuan, Chen, Wang, Sun, Xie & Zhuang, "Signal-To-Noise Ratio: A Robust
        Distance Metric for Deep Metric Learning", CVPR 2019.
    """

    def __init__(
        self,
        pos_margin: float = 0.0,
        neg_margin: float = 1.0,
        normalize: bool = True,
        miner=None,
        reducer=None,
        cross_replica: bool = True,
        name: str = "snr_contrastive_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        super().__init__(
            snr_contrastive_loss,
            name=name,
            reduction=reduction,
            dtype=dtype,
            cross_replica=cross_replica,
            pos_margin=pos_margin,
            neg_margin=neg_margin,
            normalize=bool(normalize),
            miner=miners_lib.get(miner),
            reducer=reducers_lib.get(reducer),
        )
