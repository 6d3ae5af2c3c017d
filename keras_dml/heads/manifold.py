"""Manifold loss (Aziere & Todorovic, CVPR 2019): proxies compared through a random-walk manifold.

The proxies are learned weights, so the method is a head (a Keras loss cannot
own trainable weights): `Manifold` holds them and returns, per sample, its
manifold similarities to the proxies; `ManifoldLoss` (its `default_loss()`)
turns them into the loss.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_dml import ops as dml_ops
from keras_dml._checks import check_non_negative, is_number
from keras_dml.distances import cosine_similarity, l2_normalize
from keras_dml.heads.base import CosineHead


def _hinge_softplus(scores, targets, margin):
    """`log(1 + sum_{j != y, v_j >= 0} exp(v_j))`, `v_j = s_j - s_y + margin`, per row."""
    num = ops.shape(scores)[-1]
    is_target = ops.cast(ops.one_hot(targets, num, dtype="int32"), "bool")
    target = ops.sum(ops.where(is_target, scores, ops.zeros_like(scores)), axis=1, keepdims=True)
    violation = scores - target + margin
    mask = ops.logical_and(ops.logical_not(is_target), ops.stop_gradient(violation) >= 0)
    return dml_ops.masked_logsumexp(violation, mask, axis=1, add_one=True)


@keras.saving.register_keras_serializable(package="keras_dml")
class ManifoldLoss(keras.losses.Loss):
    """The manifold loss on `Manifold`'s outputs: intrinsic plus `lambda_c` times context.

    `y_pred` is `concat([F, G], axis=1)` of shape `(B, 2K)` (what
    `Manifold(embeddings, meta_classes)` returns): `F_ik` the manifold
    similarity of sample `i` to proxy `k`, `G_ik` the cosine between their
    rows of the manifold matrix. Per sample, with `y` its proxy,
    `l(s) = log(1 + sum_{k != y, v_k >= 0} exp(v_k))`, `v_k = s_k - s_y + margin`,
    and the loss is `l(F_i) + lambda_c l(G_i)`, averaged over the batch (as
    pytorch-metric-learning).

    Args:
        lambda_c: weight of the context term (`>= 0`, finite). Defaults to `1`.
        margin: the margin. Defaults to `5e-4`.
        name: loss name.
        reduction: Keras reduction of the per-sample values.
        dtype: compute dtype.

    Example:

    >>> import numpy as np
    >>> outputs = np.array([[0.9, 0.1, 0.9, 0.1]], "float32")  # F and G for 2 proxies
    >>> round(float(ManifoldLoss()(np.array([0]), outputs)), 4)
    0.0
    """

    def __init__(self, lambda_c: float = 1.0, margin: float = 5e-4, name="manifold_loss",
                 reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.lambda_c = _check_lambda_c(lambda_c)
        if not is_number(margin):
            raise ValueError(f"`margin` must be a number, got {margin!r}.")
        self.margin = float(margin)

    def call(self, y_true, y_pred):
        labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        intrinsic, context = ops.split(y_pred, 2, axis=1)
        return _hinge_softplus(intrinsic, labels, self.margin) + self.lambda_c * _hinge_softplus(
            context, labels, self.margin
        )

    def get_config(self) -> dict:
        return {"lambda_c": self.lambda_c, "margin": self.margin, "name": self.name,
                "reduction": self.reduction, "dtype": self.dtype}


def _check_lambda_c(value):
    value = check_non_negative(value, "lambda_c")
    if not np.isfinite(value):
        raise ValueError(f"`lambda_c` must be finite, got {value}.")
    return value


@keras.saving.register_keras_serializable(package="keras_dml")
class Manifold(CosineHead):
    """Use this head with `MarginModel` to learn embeddings against proxies on a data manifold.

    The batch's embeddings and the `K` proxies form a graph: affinities
    `A = exp(max(cos, 0) / 0.5)` with a zero diagonal, symmetrically
    normalised `S = D^-1/2 A D^-1/2`; a random walk with restart spreads them,
    `M = (1 - alpha) (I - alpha S)^-1`. For sample `i` the head returns
    `[M_{i, proxies}, cos(M_i, M_{proxy k})]`, shape `(B, 2K)`, and
    `default_loss()` (`ManifoldLoss`) pulls each sample towards its own
    proxy on both. Cost: one `(B + K)`-square matrix inverse per step.

    The labels are meta-class ids in `[0, K)`: the proxy each sample belongs
    to (e.g. its class label when `K` is the number of classes).
    pytorch-metric-learning draws them at random on every call unless given
    (`indices_tuple`); here they are always given (no hidden randomness), and
    with the same ids both agree.

    Args:
        num_proxies: the number of proxies K (>= 2; PML's default is 50).
        alpha: random-walk parameter in (0, 1). Defaults to `0.8`.
        lambda_c: weight of the context term (`>= 0`). Defaults to `1`.
        margin: the loss margin. Defaults to `5e-4`.
        kernel_initializer: initializer of the proxies `kernel`
            `(embedding_dim, K)`; defaults to a standard normal, as PML.
        **kwargs: `keras.layers.Layer` arguments.

    Returns:
        `(batch, 2K)` float32 manifold similarities, for `ManifoldLoss`.

    Example:

    >>> import numpy as np
    >>> head = Manifold(num_proxies=3)
    >>> outputs = head(np.random.rand(6, 4).astype("float32"), np.arange(6) % 3)
    >>> tuple(outputs.shape), type(head.default_loss()).__name__
    ((6, 6), 'ManifoldLoss')

    Reference: Aziere & Todorovic, "Ensemble Deep Manifold Similarity
    Learning using Hard Proxies", CVPR 2019.
    """

    def __init__(
        self,
        num_proxies: int = 50,
        alpha: float = 0.8,
        lambda_c: float = 1.0,
        margin: float = 5e-4,
        kernel_initializer=None,
        **kwargs,
    ):
        kwargs.pop("centers_per_class", None)
        kwargs.pop("num_classes", None)
        if kernel_initializer is None:
            kernel_initializer = keras.initializers.RandomNormal(stddev=1.0)
        super().__init__(num_proxies, kernel_initializer=kernel_initializer, **kwargs)
        if not is_number(alpha) or not 0.0 < alpha < 1.0:
            raise ValueError(f"`alpha` must be a number in (0, 1), got {alpha!r}.")
        self.alpha = float(alpha)
        self.lambda_c = _check_lambda_c(lambda_c)
        if not is_number(margin):
            raise ValueError(f"`margin` must be a number, got {margin!r}.")
        self.margin = float(margin)

    @property
    def num_proxies(self) -> int:
        return self.num_classes

    def call(self, embeddings, labels=None, training=None):
        embeddings = self._check_embeddings(embeddings)
        if labels is not None:
            self._check_labels(labels, embeddings)
        normalized = l2_normalize(embeddings)
        proxies = l2_normalize(ops.transpose(ops.convert_to_tensor(self.kernel)))
        nodes = ops.concatenate([normalized, ops.cast(proxies, normalized.dtype)], axis=0)
        n = ops.shape(nodes)[0]
        eye = ops.eye(n, dtype=nodes.dtype)
        affinity = ops.exp(ops.relu(cosine_similarity(nodes)) / 0.5) * (1.0 - eye)
        inv_sqrt_degree = ops.power(ops.sum(affinity, axis=1), -0.5)
        normalized_affinity = inv_sqrt_degree[:, None] * affinity * inv_sqrt_degree[None, :]
        manifold = (1.0 - self.alpha) * ops.inv(eye - self.alpha * normalized_affinity)
        batch = ops.shape(embeddings)[0]
        of_samples, of_proxies = manifold[:batch], manifold[batch:]
        intrinsic = of_samples[:, batch:]
        context = ops.matmul(l2_normalize(of_samples), ops.transpose(l2_normalize(of_proxies)))
        return ops.concatenate([intrinsic, context], axis=1)

    def compute_output_shape(self, embeddings_shape, labels_shape=None):
        return (embeddings_shape[0], 2 * self.num_classes)

    def default_loss(self):
        """`ManifoldLoss(lambda_c, margin)`, over this head's outputs."""
        return ManifoldLoss(lambda_c=self.lambda_c, margin=self.margin)

    def get_config(self) -> dict:
        config = super().get_config()
        config.pop("centers_per_class")
        config["num_proxies"] = config.pop("num_classes")
        config.update({"alpha": self.alpha, "lambda_c": self.lambda_c, "margin": self.margin})
        return config
