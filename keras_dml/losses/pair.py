"""Losses on given pairs: a Siamese model's distances and same/different flags.

`ContrastivePairLoss` trains `keras_dml.models.SiameseModel` (which
re-exports it, as before); unlike the metric losses of this package, which
form every pair of a batch of labelled embeddings, it scores the pairs it is
given.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_dml.losses.contrastive import contrastive_hinges


def contrastive_pair_loss(
    same,
    distances,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    squared: bool = True,
):
    """Per-pair contrastive loss of a Siamese output: `z d^2 + (1 - z) max(0, m - d)^2`.

    A same pair (`z = 1`) costs `max(d - pos_margin, 0)`, a different pair
    `max(neg_margin - d, 0)`, both squared with `squared=True`. With the
    defaults this is Hadsell, Chopra and LeCun's (2006) form (`z = 1` marks a
    same pair, as in the paper). Unlike
    `keras_dml.losses.ContrastiveLoss`, which forms every pair of a batch of
    labelled embeddings, this scores given pairs.

    Args:
        same: `(B,)` 1 for same pairs, 0 for different pairs.
        distances: `(B,)` distances, e.g. a `SiameseModel`'s output.
        pos_margin: distance below which a same pair costs nothing.
        neg_margin: distance beyond which a different pair costs nothing.
        squared: square both hinge terms.

    Returns:
        `(B,)` per-pair losses.
    """
    distances = ops.reshape(distances, (-1,))
    same = ops.cast(ops.reshape(same, (-1,)), distances.dtype)
    positive, negative = contrastive_hinges(distances, pos_margin, neg_margin, squared)
    return same * positive + (1.0 - same) * negative


@keras.saving.register_keras_serializable(package="keras_dml")
class ContrastivePairLoss(keras.losses.Loss):
    """Trains a Siamese distance output so that same pairs are close and others a margin apart.

    `y_true` holds 1 for same pairs and 0 for different pairs, `y_pred` the
    pairs' distances; a pair costs `z * max(d - pos_margin, 0)^2 + (1 - z) *
    max(neg_margin - d, 0)^2` (unsquared hinges with `squared=False`), and
    the reduction (the mean by default) runs over pairs, so `sample_weight`
    weighs pairs.

    Args:
        pos_margin: distance below which a same pair costs nothing.
            Defaults to `0.0`.
        neg_margin: distance beyond which a different pair costs nothing;
            for L2-normalised embeddings the euclidean distance is at most 2.
            Defaults to `1.0`.
        squared: square both hinge terms (Hadsell et al. 2006). Defaults to
            `True`.
        name: name of the loss instance.
        reduction: a Keras reduction; defaults to the mean over pairs.
        dtype: dtype of the loss computation.

    Example:

    >>> import numpy as np
    >>> loss = ContrastivePairLoss(neg_margin=1.0)
    >>> float(loss(np.array([1.0, 0.0]), np.array([0.5, 0.25], "float32")))
    0.40625

    Reference:
        Hadsell, Chopra & LeCun, "Dimensionality Reduction by Learning an
        Invariant Mapping", CVPR 2006.
    """

    def __init__(
        self,
        pos_margin: float = 0.0,
        neg_margin: float = 1.0,
        squared: bool = True,
        name: str = "contrastive_pair_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin
        self.squared = squared

    def call(self, y_true, y_pred):
        return contrastive_pair_loss(
            y_true, y_pred, self.pos_margin, self.neg_margin, self.squared
        )

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            pos_margin=self.pos_margin, neg_margin=self.neg_margin, squared=self.squared
        )
        return config
