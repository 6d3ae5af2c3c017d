"""SiameseModel: two inputs, one shared backbone, one distance out; trained on labelled pairs.

This is the Siamese network of Bromley et al. (1993) and Chopra, Hadsell and
LeCun (2005): a pair `(x_a, x_b)` goes through the same backbone (shared
weights), and the model outputs the distance between the two embeddings; the
contrastive loss pulls same-class pairs together and pushes other pairs
beyond a margin. `keras_dml.data.pairs.make_pairs` turns a labelled array
into such pairs.

Example:

>>> import keras, numpy as np
>>> from keras_dml.data.pairs import make_pairs
>>> from keras_dml.models.siamese import SiameseModel
>>> x, y = np.random.rand(64, 8).astype("float32"), np.arange(64) % 4
>>> backbone = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
>>> model = SiameseModel(backbone)
>>> model.compile(optimizer="adam")  # contrastive loss by default
>>> (x_a, x_b), same = make_pairs(x, y, num_pairs=128, seed=0)
>>> history = model.fit((x_a, x_b), same, epochs=1, verbose=0)
>>> model.predict((x_a[:3], x_b[:3]), verbose=0).shape
(3,)
"""

from __future__ import annotations

import keras
from keras import ops

from keras_dml import distances as distances_lib

# Pair building lives in keras_dml.data.pairs; importable from here as before.
from keras_dml.data.pairs import make_pair_indices, make_pairs  # noqa: F401

# Moved to keras_dml.losses.pair; importable from here as before.
from keras_dml.losses.pair import ContrastivePairLoss, contrastive_pair_loss  # noqa: F401
from keras_dml.models.base import BackboneModel, deserialize_parts, has_symbolic_io

# The distances a Siamese model can output: each is >= 0 and 0 for identical
# embeddings, which is what the contrastive margins are measured in.
SIAMESE_DISTANCES = tuple(
    name for name in distances_lib.NAMES if not distances_lib.get(name).is_similarity
)


def _siamese_distance_name(distance) -> str:
    name = distances_lib.builtin_name(distance, SIAMESE_DISTANCES)
    if name is None:
        raise ValueError(
            f"`distance` must be one of {SIAMESE_DISTANCES} (a distance, 0 for identical "
            f"embeddings), got {distance!r}; for cosine use 'angular' (1 - cos)."
        )
    return name


def paired_distance(embeddings_a, embeddings_b, distance: str = "euclidean"):
    """Computes the distance between row `i` of `embeddings_a` and row `i` of `embeddings_b`.

    Unlike `keras_dml.distances`, which returns all `N x M` pairs, this
    returns one value per row. The euclidean distance has a zero (not NaN)
    gradient where two embeddings coincide; half precision is computed in
    float32.

    Args:
        embeddings_a: `(B, D)` tensor.
        embeddings_b: `(B, D)` tensor.
        distance: `"euclidean"` (default), `"squared_euclidean"` or
            `"angular"` (`max(1 - cos, 0)`), or an alias such as `"L2"`.

    Returns:
        A `(B,)` tensor.

    Example:

    >>> import numpy as np
    >>> a = np.array([[3.0, 4.0], [1.0, 0.0]], "float32")
    >>> b = np.array([[0.0, 0.0], [1.0, 0.0]], "float32")
    >>> np.asarray(paired_distance(a, b)).tolist()
    [5.0, 0.0]
    """
    name = _siamese_distance_name(distance)
    a = ops.convert_to_tensor(embeddings_a)
    b = ops.convert_to_tensor(embeddings_b)
    if ops.dtype(a) != "float32" or ops.dtype(b) != "float32":
        a, b = ops.cast(a, "float32"), ops.cast(b, "float32")
    if name == "angular":
        cosine = ops.sum(distances_lib.l2_normalize(a) * distances_lib.l2_normalize(b), axis=-1)
        return ops.maximum(1.0 - ops.clip(cosine, -1.0, 1.0), 0.0)
    squared = ops.sum(ops.square(a - b), axis=-1)
    if name == "squared_euclidean":
        return squared
    return distances_lib.safe_sqrt(squared)


@keras.saving.register_keras_serializable(package="keras_dml")
class SiameseModel(BackboneModel):
    """Wrap one backbone into a two-input model that outputs the distance of each pair.

    `model((x_a, x_b))` embeds both inputs with the same backbone (one set of
    weights) and returns the `(batch,)` distances between the embeddings.
    Train it on pairs with `fit((x_a, x_b), same)`, `same` holding 1 for
    same-class pairs and 0 otherwise (`make_pairs` builds them); `compile()`
    uses `ContrastivePairLoss()` unless given another loss. For retrieval and
    export use the backbone alone: `model.embedding_model()`.

    Args:
        backbone: a Keras model (or layer) mapping one input to `(batch, dim)`
            embeddings.
        distance: the output distance: `"euclidean"` (default, as in the
            contrastive-loss papers), `"squared_euclidean"` or `"angular"`
            (`1 - cos`).
        **kwargs: `keras.Model` arguments (`name`, ...).

    Example:

    >>> import keras, numpy as np
    >>> backbone = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model = SiameseModel(backbone, distance="euclidean")
    >>> model.compile(optimizer="adam", loss=ContrastivePairLoss(neg_margin=2.0))
    >>> x_a, x_b = np.random.rand(16, 8), np.random.rand(16, 8)
    >>> history = model.fit((x_a, x_b), np.arange(16) % 2, epochs=1, verbose=0)
    >>> model.embed(x_a).shape
    (16, 4)

    Reference:
        Chopra, Hadsell & LeCun, "Learning a Similarity Metric
        Discriminatively, with Application to Face Verification", CVPR 2005.
    """

    _build_hint = "call it on a pair"

    def __init__(self, backbone: keras.layers.Layer, distance: str = "euclidean", **kwargs):
        super().__init__(**kwargs)
        if not isinstance(backbone, keras.layers.Layer):
            raise ValueError(f"`backbone` must be a Keras model or layer, got {type(backbone)}.")
        self.backbone = backbone
        self.distance = _siamese_distance_name(distance)
        if has_symbolic_io(backbone):
            # A functional backbone is built already, so is the model: it can
            # load weights before ever being called.
            self.built = True

    def build(self, input_shape):
        shape_a, _ = self._split(input_shape, "input_shape")
        if not isinstance(shape_a, (list, tuple)):
            raise ValueError(
                f"A SiameseModel takes a pair (x_a, x_b) of inputs, got one input of shape "
                f"{tuple(input_shape)}."
            )
        self._record_input_shape(shape_a)
        if not self.backbone.built:
            self.backbone.build(tuple(shape_a))
        self.built = True

    @staticmethod
    def _split(inputs, arg: str = "inputs"):
        if isinstance(inputs, dict):
            raise ValueError(f"`{arg}` must be a pair (x_a, x_b), got a dict.")
        if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
            raise ValueError(
                f"A SiameseModel takes a pair (x_a, x_b) of inputs, got {type(inputs).__name__}"
                + (f" of length {len(inputs)}." if isinstance(inputs, (list, tuple)) else ".")
            )
        return inputs[0], inputs[1]

    def call(self, inputs, training=None):
        x_a, x_b = self._split(inputs)
        if getattr(self, "_inference_input_shape", None) is None and getattr(
            x_a, "shape", None
        ) is not None:
            self._record_input_shape(x_a.shape)
        embeddings_a = self.backbone(x_a, training=training)
        embeddings_b = self.backbone(x_b, training=training)
        return paired_distance(embeddings_a, embeddings_b, self.distance)

    def compute_output_shape(self, input_shape):
        shape_a, _ = self._split(input_shape, "input_shape")
        return (shape_a[0],)

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, **kwargs):
        """Configures training; `loss` defaults to `ContrastivePairLoss()` on the distances.

        Args:
            optimizer: the optimizer.
            loss: a loss of `(same, distances)`.
            metrics: metrics of `(same, distances)`.
            **kwargs: other `keras.Model.compile` arguments.
        """
        if loss is None:
            loss = ContrastivePairLoss()
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)

    def _backbone_is_embedding_model(self) -> bool:
        # The pair and its distance are training-only: the backbone embeds one input.
        return has_symbolic_io(self.backbone)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            backbone=keras.saving.serialize_keras_object(self.backbone), distance=self.distance
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**deserialize_parts(config, ("backbone",), custom_objects))
