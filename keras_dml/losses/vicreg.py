"""VICReg (Bardes, Ponce & LeCun, ICLR 2022): variance, invariance, covariance of two views.

Convention for the Keras loss, as for `NTXentLoss`: `y_pred` holds both views
stacked along the batch axis, `concat([view_1, view_2])` of shape `(2N, D)`;
rows `i` and `i + N` are two views of one input. Labels play no part; `y_true`
only has to have `N` or `2N` rows. For custom training steps call
`vicreg_loss(view_1, view_2)` directly.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_dml._checks import check_non_negative, check_positive
from keras_dml.losses.base import MetricLoss, validate_inputs
from keras_dml.losses.ntxent import checked_views, stacked_views


def _at_least_two_rows(arg, x):
    if x.shape[0] is not None and x.shape[0] < 2:
        raise ValueError(
            f"`{arg}` has {x.shape[0]} rows; VICReg's variance and covariance need a batch "
            "of at least 2."
        )


def _variance_term(x, epsilon):
    """`mean_d relu(1 - sqrt(var_d + epsilon)) / 2`, the unbiased variance over the batch."""
    n = ops.cast(ops.shape(x)[0], x.dtype)
    centred = x - ops.mean(x, axis=0, keepdims=True)
    variance = ops.sum(ops.square(centred), axis=0) / (n - 1.0)
    return ops.mean(ops.relu(1.0 - ops.sqrt(variance + epsilon))) / 2.0


def _covariance_term(x):
    """`sum_{d != e} C_de^2 / D`, `C` the unbiased covariance matrix of the batch."""
    n = ops.cast(ops.shape(x)[0], x.dtype)
    dim = ops.shape(x)[1]
    centred = x - ops.mean(x, axis=0, keepdims=True)
    covariance = ops.matmul(ops.transpose(centred), centred) / (n - 1.0)
    # `where`, not a product with (1 - I): an overflowed (Inf) diagonal times 0 is NaN.
    off_diagonal = ops.where(ops.eye(dim, dtype="bool"), ops.zeros_like(covariance), covariance)
    return ops.sum(ops.square(off_diagonal)) / ops.cast(dim, x.dtype)


def vicreg_loss(embeddings_a, embeddings_b, invariance_lambda: float = 25.0,
                variance_mu: float = 25.0, covariance_v: float = 1.0, epsilon: float = 1e-4):
    """`lambda s(Z, Z') + mu [v(Z) + v(Z')] + nu [c(Z) + c(Z')]` on two views.

    - invariance `s`: the mean over rows and dimensions of `(z - z')^2`;
    - variance `v(Z)`: `mean_d relu(1 - sqrt(Var(z_d) + epsilon)) / 2`
      (unbiased variance over the batch; the `/ 2` as in
      pytorch-metric-learning, averaging the two views' terms);
    - covariance `c(Z)`: the sum of the squared off-diagonal entries of the
      (unbiased) covariance matrix, divided by `D`.

    Args:
        embeddings_a: `(N, D)` embeddings of the first view, `N >= 2`.
        embeddings_b: `(N, D)` embeddings of the second view.
        invariance_lambda: weight `lambda` of the invariance term (25).
        variance_mu: weight `mu` of the variance terms (25).
        covariance_v: weight `nu` of the covariance terms (1).
        epsilon: added to the variance before the square root (1e-4).

    Returns:
        A scalar loss.

    Raises:
        ValueError: naming the argument, for a wrong rank, views of different
            shapes, fewer than 2 rows, or NaN/Inf values.

    Example:

    >>> import numpy as np
    >>> from keras_dml.losses.vicreg import vicreg_loss
    >>> view_1 = np.array([[1.0, 0.0], [-1.0, 0.0]], "float32")
    >>> view_2 = np.array([[1.0, 0.5], [-1.0, -0.5]], "float32")
    >>> round(float(vicreg_loss(view_1, view_2)), 4)
    12.1426

    Reference:
        Bardes, Ponce & LeCun, "VICReg: Variance-Invariance-Covariance
        Regularization for Self-Supervised Learning", ICLR 2022.
    """
    a, b = checked_views(embeddings_a, embeddings_b, _at_least_two_rows)
    invariance = ops.mean(ops.square(a - b))
    variance = _variance_term(a, epsilon) + _variance_term(b, epsilon)
    covariance = _covariance_term(a) + _covariance_term(b)
    return invariance_lambda * invariance + variance_mu * variance + covariance_v * covariance


def _vicreg_from_stacked_views(labels, embeddings, **options):
    """`vicreg_loss` on `y_pred = concat([view_1, view_2])`; the labels are ignored."""
    del labels
    view_1, view_2 = ops.split(embeddings, 2, axis=0)
    return vicreg_loss(view_1, view_2, **options)


@keras.saving.register_keras_serializable(package="keras_dml")
class VICRegLoss(MetricLoss):
    """Self-supervised: two views of an input agree, and each dimension keeps its variance.

    `y_pred` must be both views stacked along the batch axis,
    `concat([view_1, view_2])` of shape `(2N, D)` (rows `i` and `i + N` are
    views of one input, as for `NTXentLoss`); `y_true` is not used beyond a
    shape check: give it `N` or `2N` rows. No negatives are needed: the
    variance term keeps every dimension's standard deviation near 1 and the
    covariance term decorrelates the dimensions, which prevents collapse
    (see `vicreg_loss`). Each replica scores its own batch under
    `tf.distribute` (no cross-replica form).

    Args:
        invariance_lambda: weight of the invariance (mean squared error)
            term. Defaults to `25` (paper and PML).
        variance_mu: weight of the variance terms. Defaults to `25`.
        covariance_v: weight of the covariance terms. Defaults to `1`.
        epsilon: numerical floor of the variance (PML's `eps`). Defaults to
            `1e-4`.
        name: name of the loss instance.
        reduction: kept for Keras compatibility; the loss is already a scalar.
        dtype: dtype of the loss computation; defaults to `keras.backend.floatx()`.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> from keras_dml.losses.vicreg import VICRegLoss
    >>> view_1 = np.array([[1.0, 0.0], [-1.0, 0.0]], "float32")
    >>> view_2 = np.array([[1.0, 0.5], [-1.0, -0.5]], "float32")
    >>> round(float(VICRegLoss()(np.zeros(4), np.concatenate([view_1, view_2]))), 4)
    12.1426

    Reference:
        Bardes, Ponce & LeCun, "VICReg: Variance-Invariance-Covariance
        Regularization for Self-Supervised Learning", ICLR 2022.
    """

    def __init__(
        self,
        invariance_lambda: float = 25.0,
        variance_mu: float = 25.0,
        covariance_v: float = 1.0,
        epsilon: float = 1e-4,
        name: str = "vicreg_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        super().__init__(
            _vicreg_from_stacked_views,
            name=name,
            reduction=reduction,
            dtype=dtype,
            invariance_lambda=check_non_negative(invariance_lambda, "invariance_lambda"),
            variance_mu=check_non_negative(variance_mu, "variance_mu"),
            covariance_v=check_non_negative(covariance_v, "covariance_v"),
            epsilon=check_positive(epsilon, "epsilon"),
        )

    def call(self, y_true, y_pred):
        y_true, y_pred = stacked_views(y_true, y_pred)
        labels, embeddings = validate_inputs(y_true, y_pred)
        if embeddings.shape[0] is not None and embeddings.shape[0] < 4:
            raise ValueError(
                f"`y_pred` has {embeddings.shape[0]} rows, {embeddings.shape[0] // 2} per view; "
                "VICReg's variance and covariance need at least 2 inputs (4 rows)."
            )
        return self.compute(labels, embeddings)
