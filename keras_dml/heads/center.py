"""Center loss: a softmax head plus a pull of each embedding towards its class centre."""

from __future__ import annotations

import keras
from keras import ops

from keras_dml._checks import check_positive, is_number
from keras_dml.heads.base import CosineHead


def center_loss(labels, embeddings, centers):
    """`mean_i ½ ‖x_i - c_{y_i}‖²`, with the centres taken as constants.

    Args:
        labels: `(B,)` int labels.
        embeddings: `(B, D)` float embeddings.
        centers: `(D, C)` class centres, one column per class.

    Returns:
        A scalar. Its gradient reaches `embeddings` only: the centres move by
        `center_update`, not by the optimizer.
    """
    own_center = ops.take(ops.transpose(ops.stop_gradient(centers)), labels, axis=0)
    return 0.5 * ops.mean(ops.sum(ops.square(embeddings - own_center), axis=1))


def center_update(labels, embeddings, centers, alpha: float):
    """The centres after one step of the paper's rule `c_j ← c_j - α Δc_j`.

    `Δc_j = Σ_{i: y_i = j} (c_j - x_i) / (1 + n_j)`, `n_j` the number of
    samples of class j in the batch; classes absent from the batch do not
    move. Gradients are stopped: this is a state update.

    Args:
        labels: `(B,)` int labels.
        embeddings: `(B, D)` float embeddings.
        centers: `(D, C)` current centres.
        alpha: the centre learning rate α in [0, 1].

    Returns:
        `(D, C)` new centres.
    """
    embeddings = ops.stop_gradient(embeddings)
    centers = ops.stop_gradient(centers)
    one_hot = ops.one_hot(labels, ops.shape(centers)[1], dtype=embeddings.dtype)  # (B, C)
    counts = ops.sum(one_hot, axis=0)  # (C,)
    class_sums = ops.matmul(ops.transpose(embeddings), one_hot)  # (D, C)
    delta = (centers * counts - class_sums) / (1.0 + counts)
    return centers - alpha * delta


@keras.saving.register_keras_serializable(package="keras_dml")
class CenterLoss(CosineHead):
    """Use this head to train a softmax classifier whose classes are also compact around centres.

    Training (`head(embeddings, labels)`) returns plain softmax logits
    `x·W + b` (for `MarginModel`'s cross-entropy) and adds
    `weight · ½ mean_i ‖x_i - c_{y_i}‖²` with `add_loss`. The centres `c` are
    not trained by the optimizer: on every training call (`training=True`)
    they move towards the batch's class means by the paper's rule

        c_j ← c_j - α Σ_{i: y_i = j} (c_j - x_i) / (1 + n_j),

    after the loss has been computed with the old centres. They are
    non-trainable weights (`head.centers`, `(embedding_dim, num_classes)`),
    saved with the model; on JAX the update flows through `MarginModel`'s
    stateless call like AdaCos's scale. `head(embeddings)` returns the
    softmax logits only. Unlike the cosine heads, neither the embeddings nor
    the classifier are normalised (the paper's setting); `head.kernel` is the
    classifier `W`.

    The paper writes the centre term as a sum over the batch; the official
    Caffe layer averages it over the batch, as here. That layer also hands
    `Δc_j` to the solver as the centres' gradient, so its α is the solver's
    learning rate; here α is applied directly, as the paper's rule states,
    and the optimizer never touches the centres.

    Args:
        num_classes: number of training classes C.
        alpha: the centre learning rate α (0.5 in the paper's face model).
        weight: the weight λ of the centre term (0.003 for faces in the paper;
            larger, e.g. 0.01–0.1, for L2-normalised embeddings whose
            distances are small).
        use_bias: give the softmax classifier a bias.
        kernel_initializer: initializer of the classifier `kernel`
            `(embedding_dim, num_classes)`.
        centers_initializer: initializer of `centers` (zeros).
        **kwargs: `keras.layers.Layer` arguments.

    Returns:
        `(batch, num_classes)` float32 logits.

    Example:

    >>> import numpy as np
    >>> head = CenterLoss(num_classes=3, alpha=0.5, weight=0.1)
    >>> x = np.random.rand(6, 4).astype("float32")
    >>> logits = head(x, np.array([0, 0, 1, 1, 2, 2]), training=True)
    >>> tuple(logits.shape), len(head.losses)
    ((6, 3), 1)
    >>> bool(np.any(np.asarray(head.centers) != 0))
    True

    Reference: Wen et al., "A Discriminative Feature Learning Approach for
    Deep Face Recognition", ECCV 2016; code: ydwen/caffe-face.
    """

    def __init__(
        self,
        num_classes: int,
        alpha: float = 0.5,
        weight: float = 0.003,
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        centers_initializer="zeros",
        **kwargs,
    ):
        kwargs.pop("centers_per_class", None)
        super().__init__(num_classes, kernel_initializer=kernel_initializer, **kwargs)
        if not is_number(alpha) or not 0 <= alpha <= 1:
            raise ValueError(f"`alpha` must be a number in [0, 1], got {alpha!r}.")
        self.alpha = float(alpha)
        self.weight = check_positive(weight, "weight")
        self.use_bias = bool(use_bias)
        self.centers_initializer = keras.initializers.get(centers_initializer)

    def build(self, embeddings_shape, labels_shape=None):
        super().build(embeddings_shape, labels_shape)
        dim = int(embeddings_shape[-1])
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.num_classes,), initializer="zeros")
        self.centers = self.add_weight(
            name="centers",
            shape=(dim, self.num_classes),
            initializer=self.centers_initializer,
            trainable=False,
            aggregation="mean",
        )

    def call(self, embeddings, labels=None, training=None):
        embeddings = ops.cast(self._check_embeddings(embeddings), "float32")
        logits = ops.matmul(embeddings, ops.cast(self.kernel, "float32"))
        if self.bias is not None:
            logits = logits + ops.cast(self.bias, "float32")
        if labels is not None:
            labels = self._check_labels(labels, embeddings)
            centers = ops.cast(ops.convert_to_tensor(self.centers), "float32")
            self.add_loss(self.weight * center_loss(labels, embeddings, centers))
            if training:
                self.centers.assign(center_update(labels, embeddings, centers, self.alpha))
        return logits

    def get_config(self) -> dict:
        config = super().get_config()
        config.pop("centers_per_class")
        config.update(
            {
                "alpha": self.alpha,
                "weight": self.weight,
                "use_bias": self.use_bias,
                "centers_initializer": keras.initializers.serialize(self.centers_initializer),
            }
        )
        return config
