"""Proxy heads: one learned proxy per class stands in for the samples of that class.

`ProxyNCA` returns logits for `MarginModel`'s softmax cross-entropy (in the
bounded ProxyNCA++ form by default). `ProxyAnchor`'s loss is not a softmax
cross-entropy: the head returns margin-adjusted logits and names its own loss
through `default_loss()`, which `MarginModel.compile()` uses when no `loss`
is given. Both losses are ordinary Keras losses over `(labels, head logits)`,
so they are stored in the compile config and survive `.keras` save/load.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_dml import distributed
from keras_dml import ops as dml_ops
from keras_dml._checks import check_positive, is_number
from keras_dml.heads.base import CosineHead


def _sparse_labels(y_true, num_classes: int):
    """Keras casts `y_true` to the loss dtype: back to int, and the class mask."""
    labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
    return labels, ops.cast(ops.one_hot(labels, num_classes, dtype="int32"), "bool")


@keras.saving.register_keras_serializable(package="keras_dml")
class ProxyNCALoss(keras.losses.Loss):
    """The original ProxyNCA loss on proxy logits: the positive is left out of the denominator.

    Per sample, `-z_y + log Σ_{j≠y} exp(z_j)` for logits `z_j = -d(x, p_j) / T`.
    Unlike softmax cross-entropy it has no lower bound at 0: it goes on
    rewarding a larger gap between the positive and the negatives, and falls
    without limit as the temperature `T` falls (seed 003). `ProxyNCA`
    uses it only with `exclude_positive=True`.

    Args:
        name: loss name.
        reduction: Keras reduction over the per-sample values.
        dtype: compute dtype (float32 by default).

    Example:

    >>> import numpy as np
    >>> logits = np.array([[0.0, -2.0, -2.0]], "float32")
    >>> round(float(ProxyNCALoss()(np.array([0]), logits)), 4)
    -1.3069

    Reference: Movshovitz-Attias et al., "No Fuss Distance Metric Learning
    using Proxies", ICCV 2017.
    """

    def __init__(self, name="proxy_nca_loss", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        labels, positive = _sparse_labels(y_true, ops.shape(y_pred)[-1])
        target = ops.take_along_axis(y_pred, ops.expand_dims(labels, 1), axis=1)[:, 0]
        return dml_ops.masked_logsumexp(y_pred, ops.logical_not(positive), axis=-1) - target

    def get_config(self) -> dict:
        return {"name": self.name, "reduction": self.reduction, "dtype": self.dtype}


@keras.saving.register_keras_serializable(package="keras_dml")
class ProxyAnchorLoss(keras.losses.Loss):
    """The Proxy-Anchor loss on `ProxyAnchor`'s margin-adjusted logits.

    With `z_{i,p} = α (cos θ_{i,p} - δ)` where `y_i = p` and
    `α (cos θ_{i,p} + δ)` elsewhere (what `ProxyAnchor(embeddings, labels)`
    returns), the loss is

        1/|P⁺| Σ_{p ∈ P⁺} log(1 + Σ_{i: y_i = p} exp(-z_{i,p}))
        + 1/C Σ_p log(1 + Σ_{i: y_i ≠ p} exp(z_{i,p})),

    `P⁺` the classes present in the batch. Each proxy is an anchor weighing
    all the batch's samples at once, so the value is a batch scalar: sample
    weights scale it by their mean.

    Args:
        name: loss name.
        reduction: Keras reduction; the loss is already a scalar.
        dtype: compute dtype (float32 by default).

    Example:

    >>> import numpy as np
    >>> z = np.array([[5.0, -5.0], [-5.0, 5.0]], "float32")  # each sample on its proxy
    >>> round(float(ProxyAnchorLoss()(np.array([0, 1]), z)), 4)
    0.0134

    Reference: Kim et al., "Proxy Anchor Loss for Deep Metric Learning",
    CVPR 2020; code: tjddus9597/Proxy-Anchor-CVPR2020.
    """

    def __init__(self, name="proxy_anchor_loss", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def __call__(self, y_true, y_pred, sample_weight=None):
        loss = super().__call__(y_true, y_pred, sample_weight=sample_weight)
        # A batch scalar: Keras divides by the replica count only when it
        # reduces per-sample values itself (with a sample weight).
        return loss if sample_weight is not None else distributed.scale_for_replicas(loss)

    def call(self, y_true, y_pred):
        # Under tf.distribute every replica scores the gathered global batch
        # (a proxy's terms span all its samples); the gather's backward pass
        # returns each replica its rows' gradient. A no-op elsewhere.
        y_true, y_pred = distributed.gather(y_true), distributed.gather(y_pred)
        num_classes = ops.shape(y_pred)[-1]
        _, positive = _sparse_labels(y_true, num_classes)
        # log(1 + Σ exp(...)) per proxy (column); an empty column gives exactly 0.
        positive_terms = dml_ops.masked_logsumexp(-y_pred, positive, axis=0, add_one=True)
        negative_terms = dml_ops.masked_logsumexp(
            y_pred, ops.logical_not(positive), axis=0, add_one=True
        )
        with_positives = dml_ops.masked_count(ops.any(positive, axis=0), dtype=y_pred.dtype)
        return ops.sum(positive_terms) / ops.maximum(with_positives, 1.0) + ops.mean(
            negative_terms
        )

    def get_config(self) -> dict:
        return {"name": self.name, "reduction": self.reduction, "dtype": self.dtype}


@keras.saving.register_keras_serializable(package="keras_dml")
class ProxyNCA(CosineHead):
    """Use this head to learn embeddings against one proxy per class instead of sampled triplets.

    Logits are `z_j = -‖x̂ - p̂_j‖² / T` (normalised embedding and proxy,
    squared distance, temperature T), with or without labels. The original
    ProxyNCA loss `-z_y + log Σ_{j≠y} exp(z_j)` leaves the positive out of the
    denominator, which makes it unbounded below (seed 003; Teh et al. 2020).
    By default this head follows ProxyNCA++'s fix: the positive is kept, so
    `MarginModel`'s softmax cross-entropy on these logits is the loss and is
    ≥ 0, and the temperature T = 1/9 sharpens it (T = 1 is the original
    setting). `exclude_positive=True` gives the original loss through
    `default_loss()` (`ProxyNCALoss`). Proxies benefit from a larger learning
    rate (`MarginModel.compile(centers_optimizer=...)`).

    Since `‖x̂ - p̂‖² = 2 - 2 cos θ`, the logits are `(2 cos θ - 2) / T`: a
    normalised softmax with scale 2/T, shifted by a constant.

    Args:
        num_classes: number of training classes C.
        temperature: the temperature T (1/9, ProxyNCA++).
        exclude_positive: use the original, unbounded ProxyNCA loss.
        kernel_initializer: initializer of the proxies `kernel`
            `(embedding_dim, num_classes)`.
        **kwargs: `keras.layers.Layer` arguments.

    Returns:
        `(batch, num_classes)` float32 logits.

    Example:

    >>> import numpy as np
    >>> head = ProxyNCA(num_classes=4)
    >>> logits = head(np.random.rand(8, 16).astype("float32"), np.arange(8) % 4)
    >>> tuple(logits.shape), head.default_loss() is None
    ((8, 4), True)

    Reference: Movshovitz-Attias et al., "No Fuss Distance Metric Learning
    using Proxies", ICCV 2017; Teh et al., "ProxyNCA++: Revisiting and
    Revitalizing Proxy Neighborhood Component Analysis", ECCV 2020.
    """

    def __init__(
        self,
        num_classes: int,
        temperature: float = 1.0 / 9.0,
        exclude_positive: bool = False,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        kwargs.pop("centers_per_class", None)
        super().__init__(num_classes, kernel_initializer=kernel_initializer, **kwargs)
        self.temperature = check_positive(temperature, "temperature")
        self.exclude_positive = bool(exclude_positive)

    def logits(self, similarity, labels=None, training=None):
        del labels, training  # no margin: the same logits for training and inference
        return (2.0 * similarity - 2.0) / self.temperature

    def default_loss(self):
        """`ProxyNCALoss()` with `exclude_positive=True`, else None (softmax cross-entropy)."""
        return ProxyNCALoss() if self.exclude_positive else None

    def get_config(self) -> dict:
        config = super().get_config()
        config.pop("centers_per_class")
        config.update(
            {"temperature": self.temperature, "exclude_positive": self.exclude_positive}
        )
        return config


@keras.saving.register_keras_serializable(package="keras_dml")
class ProxyAnchor(CosineHead):
    """Use this head for the strong proxy baseline: each proxy pulls and pushes the whole batch.

    Training logits (`head(embeddings, labels)`) are `α (cos θ_{i,p} - δ)`
    for the sample's own proxy and `α (cos θ_{i,p} + δ)` for the others;
    `head(embeddings)` returns `α cos θ`. The loss is not a softmax
    cross-entropy: `default_loss()` returns `ProxyAnchorLoss()`, which
    `MarginModel.compile()` picks when no `loss` is given. The paper trains
    the proxies 100x faster than the backbone
    (`MarginModel.compile(centers_optimizer=...)`).

    Args:
        num_classes: number of training classes C.
        scale: the scale α (32).
        margin: the margin δ (0.1).
        kernel_initializer: initializer of the proxies `kernel`
            `(embedding_dim, num_classes)` (the official code uses a
            Kaiming-normal init; any spread-out init works after normalising).
        **kwargs: `keras.layers.Layer` arguments.

    Returns:
        `(batch, num_classes)` float32 logits.

    Example:

    >>> import keras, numpy as np
    >>> from keras_dml.models import MarginModel
    >>> backbone = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model = MarginModel(backbone, ProxyAnchor(num_classes=3))
    >>> model.compile(optimizer="adam", centers_optimizer=1e-1)  # loss: ProxyAnchorLoss
    >>> type(model.loss).__name__
    'ProxyAnchorLoss'
    >>> x, y = np.random.rand(24, 8).astype("float32"), np.arange(24) % 3
    >>> history = model.fit(x, y, epochs=1, verbose=0)

    Reference: Kim et al., "Proxy Anchor Loss for Deep Metric Learning",
    CVPR 2020.
    """

    def __init__(
        self,
        num_classes: int,
        scale: float = 32.0,
        margin: float = 0.1,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        kwargs.pop("centers_per_class", None)
        super().__init__(num_classes, kernel_initializer=kernel_initializer, **kwargs)
        self.scale = check_positive(scale, "scale")
        if not is_number(margin) or margin < 0:
            raise ValueError(f"`margin` must be a number >= 0, got {margin!r}.")
        self.margin = float(margin)

    def logits(self, similarity, labels=None, training=None):
        if labels is not None:
            sign = 1.0 - 2.0 * self._one_hot(labels, similarity.dtype)  # -1 on the target
            similarity = similarity + sign * self.margin
        return self.scale * similarity

    def default_loss(self):
        """The loss `MarginModel.compile()` uses for this head: `ProxyAnchorLoss()`."""
        return ProxyAnchorLoss()

    def get_config(self) -> dict:
        config = super().get_config()
        config.pop("centers_per_class")
        config.update({"scale": self.scale, "margin": self.margin})
        return config
