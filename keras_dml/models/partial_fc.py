"""Partial FC: a margin head's softmax computed shard by shard, for millions of classes.

With C in the millions (face recognition), the class centres `(D, C)` and,
worse, the `(B, C)` logits no longer fit one device. Partial FC (An et al.,
CVPR 2022) splits the centres along the class axis over S devices, computes
each shard's logits where its centres live, combines the softmax from
per-shard maxima and sums of exponentials, and optionally scores each sample
only against a random subset of each shard's centres (the positive centres
of the batch always kept).

`margin_softmax_cross_entropy` is that loss, in `keras.ops`: the centres are
viewed as `(D, S, C / S)` and every reduction over classes is done per shard
first (max, sum of exp), then over the S shards (a `(B, S)` array). Under a
JAX `keras.distribution` whose device mesh has a `"model"` axis (e.g.
`ModelParallel` with the head's kernel laid out `(None, "model")`), the
shard axis is constrained to that mesh axis, so XLA keeps each shard's
`(B, C / S)` logits on its own device: no device ever holds the `(B, C)`
logits (`tests/test_partial_fc.py` checks the partitioned program). Without
a distribution (any backend) it is the same loss computed on one device.

`PartialFCModel` is a `MarginModel` that trains with this loss.

Reference: An et al., "Killing Two Birds with One Stone: Efficient and
Robust Training of Face Recognition CNNs by Partial FC", CVPR 2022; code:
deepinsight/insightface `recognition/arcface_torch/partial_fc_v2.py`.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_dml.distances import l2_normalize
from keras_dml.heads.arcface import ArcFace, additive_angular_margin
from keras_dml.heads.base import CosineHead
from keras_dml.heads.cosface import CosFace
from keras_dml.losses.base import check_labels_dtype
from keras_dml.models.margin_model import MarginModel


def _mesh_axis(axis_name: str):
    """`(mesh, axis size, batch axis name)` of the active distribution, or None without one."""
    distribution = keras.distribution.distribution()
    mesh = getattr(distribution, "device_mesh", None)
    if mesh is None or axis_name not in mesh.axis_names:
        return None
    size = int(mesh.shape[list(mesh.axis_names).index(axis_name)])
    batch = getattr(distribution, "batch_dim_name", None)
    if batch not in mesh.axis_names or batch == axis_name:
        batch = None
    return mesh, size, batch


def _constrain(tensor, axes, mesh):
    if mesh is None:
        return tensor
    return keras.distribution.distribute_tensor(
        tensor, keras.distribution.TensorLayout(list(axes), mesh))


def _target_logit(head, cosine, labels):
    """The head's target logit from the target cosine, and its scale for the other classes."""
    if isinstance(head, ArcFace):
        margin = head._per_sample(head.margin, labels)
        if not isinstance(margin, float):
            margin = ops.cast(margin, cosine.dtype)
        return head.scale * additive_angular_margin(cosine, margin, head.easy_margin), head.scale
    if isinstance(head, CosFace):
        margin = head._per_sample(head.margin, labels)
        if not isinstance(margin, float):
            margin = ops.cast(margin, cosine.dtype)
        return head.scale * (cosine - margin), head.scale
    if type(head) is CosineHead:
        return cosine, 1.0
    raise ValueError(
        "margin_softmax_cross_entropy supports CosineHead, ArcFace and CosFace heads (one "
        f"centre per class), got {type(head).__name__}."
    )


def num_sampled_centers(num_classes: int, num_shards: int, sample_rate: float,
                        batch_size: int) -> int:
    """Centres kept per shard: `ceil(sample_rate * C / S)`, at least the batch size, at most C / S.

    Keeping at least B per shard leaves room for every positive class of the
    batch (a shard holds at most B of them), so positives are never dropped
    (the official code grows the sample instead; a static shape cannot).
    """
    per_shard = num_classes // num_shards
    if sample_rate >= 1.0:
        return per_shard
    return int(min(per_shard, max(math.ceil(sample_rate * per_shard), batch_size)))


def margin_softmax_cross_entropy(
    head,
    embeddings,
    labels,
    kernel=None,
    num_shards: int | None = None,
    sample_rate: float = 1.0,
    seed=None,
    model_axis: str = "model",
    return_sampled_classes: bool = False,
):
    """Per-sample cross-entropy of a margin head's logits, computed shard-wise (Partial FC).

    Equals `sparse_categorical_crossentropy(labels, head(embeddings, labels),
    from_logits=True)` when `sample_rate=1` (value and gradients; tested),
    but reduces over the classes shard by shard: per shard the max and the
    sum of `exp(logit - max)` of its `C / S` logits, then over the S shards.

    With `sample_rate < 1` each shard keeps `num_sampled_centers(...)`
    centres: all of its positive centres (classes in the batch) and random
    others; the softmax runs over the kept centres only, so the others get
    no gradient in this step (Partial FC's negative-centre sampling).

    Args:
        head: a `CosineHead`, `ArcFace` or `CosFace` with one centre per class.
        embeddings: `(B, D)` embeddings (normalised here).
        labels: `(B,)` integer labels.
        kernel: the centres `(D, C)`; default `head.kernel`.
        num_shards: S, dividing C. Default: the size of the active
            distribution's `model_axis` mesh axis, else 1.
        sample_rate: fraction of each shard's centres to score (1: all).
        seed: a `keras.random.SeedGenerator` or int for the sampling.
        model_axis: the mesh axis the class dimension is sharded over.
        return_sampled_classes: also return the `(S, k)` class ids scored.

    Returns:
        `(B,)` float32 losses (and the sampled class ids if asked).
    """
    if getattr(head, "centers_per_class", 1) != 1:
        raise ValueError("margin_softmax_cross_entropy needs one centre per class.")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"`sample_rate` must be in (0, 1], got {sample_rate}.")
    check_labels_dtype(labels, "labels")
    kernel = head.kernel if kernel is None else kernel
    kernel = ops.convert_to_tensor(kernel)
    num_classes = int(kernel.shape[1])
    dim = int(kernel.shape[0])
    placement = _mesh_axis(model_axis)
    mesh, batch_axis = (placement[0], placement[2]) if placement else (None, None)
    if num_shards is None:
        num_shards = placement[1] if placement else 1
    if num_classes % num_shards:
        raise ValueError(f"{num_classes} classes cannot be split into {num_shards} equal shards.")
    per_shard = num_classes // num_shards

    x = l2_normalize(ops.cast(embeddings, "float32"))
    labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
    batch_size = int(x.shape[0]) if x.shape[0] is not None else None

    centers = ops.cast(l2_normalize(kernel, axis=0), "float32")  # column-wise: shard-local
    sharded = _constrain(ops.reshape(centers, (dim, num_shards, per_shard)),
                         (None, model_axis, None), mesh)
    class_ids = ops.reshape(ops.arange(num_classes, dtype="int32"), (num_shards, per_shard))

    # The target cosine: B columns gathered (B x D, small), wherever they live.
    target_cos = ops.sum(x * ops.transpose(ops.take(centers, labels, axis=1)), axis=1)
    target_cos = ops.clip(target_cos, -1.0, 1.0)
    target_logit, scale = _target_logit(head, target_cos, labels)

    if sample_rate < 1.0:
        if batch_size is None:
            raise ValueError("Sampling needs a known batch size.")
        k = num_sampled_centers(num_classes, num_shards, sample_rate, batch_size)
        positive = ops.scatter(ops.expand_dims(labels, 1), ops.ones_like(labels, "float32"),
                               (num_classes,))
        positive = ops.reshape(ops.cast(positive > 0, "float32"), (num_shards, per_shard))
        noise = keras.random.uniform((num_shards, per_shard), seed=seed)
        # Positives score >= 2 and noise < 1: top-k keeps every positive first.
        _, picked = ops.top_k(_constrain(noise + 2.0 * positive, (model_axis, None), mesh), k)
        class_ids = ops.take_along_axis(class_ids, picked, axis=1)
        sharded = ops.take_along_axis(sharded, ops.expand_dims(picked, 0), axis=2)
        sharded = _constrain(sharded, (None, model_axis, None), mesh)

    cosine = ops.clip(ops.einsum("bd,dsk->bsk", x, sharded), -1.0, 1.0)
    cosine = _constrain(cosine, (batch_axis, model_axis, None), mesh)
    is_target = ops.expand_dims(class_ids, 0) == ops.reshape(labels, (-1, 1, 1))
    # Other classes' logits; the target's own entry is excluded here and added once below.
    logits = ops.where(is_target, -1e30, scale * cosine)
    shard_max = ops.max(logits, axis=2)                                         # (B, S)
    shard_sum = ops.sum(ops.exp(logits - ops.expand_dims(shard_max, 2)), axis=2)  # (B, S)
    top = ops.maximum(ops.max(shard_max, axis=1), target_logit)                 # (B,)
    total = (ops.sum(shard_sum * ops.exp(shard_max - ops.expand_dims(top, 1)), axis=1)
             + ops.exp(target_logit - top))
    losses = top + ops.log(total) - target_logit
    if return_sampled_classes:
        return losses, class_ids
    return losses


@keras.saving.register_keras_serializable(package="keras_dml")
class PartialFCModel(MarginModel):
    """A `MarginModel` trained with the shard-wise margin softmax of Partial FC.

    Shard the head's centres over devices with JAX's
    `keras.distribution.ModelParallel`, laying out the head's kernel along
    the class axis of a mesh axis named `"model"`:

    ```python
    mesh = keras.distribution.DeviceMesh((1, 4), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[f"{head.name}/kernel"] = (None, "model")
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch"))
    model = PartialFCModel(backbone, head, sample_rate=0.1)   # built after that
    ```

    The loss is `margin_softmax_cross_entropy` (mean over the batch, times
    `sample_weight` if given) plus the losses the backbone adds. Compiled
    metrics are not supported (they would need the full `(B, C)` logits).

    Args:
        backbone: maps inputs to `(batch, dim)` embeddings.
        head: `CosineHead`, `ArcFace` or `CosFace` (one centre per class).
        sample_rate: fraction of each shard's centres scored per step (1: all).
        num_shards: shards of the class axis; default the `"model"` mesh
            axis size of the active distribution, else 1.
        seed: seed of the centre sampling.
        **kwargs: `keras.Model` arguments.
    """

    def __init__(self, backbone, head, sample_rate: float = 1.0, num_shards: int | None = None,
                 seed: int | None = None, **kwargs):
        if not 0.0 < float(sample_rate) <= 1.0:
            raise ValueError(f"`sample_rate` must be in (0, 1], got {sample_rate}.")
        _target_logit(head, ops.zeros((1,)), ops.zeros((1,), "int32"))  # supported head?
        super().__init__(backbone, head, **kwargs)
        self.sample_rate = float(sample_rate)
        self.num_shards = num_shards
        self.seed = seed
        self.sampling_seed = keras.random.SeedGenerator(seed, name="sampling_seed")

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, **kwargs):
        if loss is not None or metrics:
            raise ValueError("PartialFCModel computes its own loss and supports no metrics.")
        super().compile(optimizer=optimizer, **kwargs)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if y is None:
            raise ValueError("`y` (integer class labels) is required to train a model.")
        losses = margin_softmax_cross_entropy(
            self.head, y_pred, y, num_shards=self.num_shards,
            sample_rate=self.sample_rate if training else 1.0, seed=self.sampling_seed)
        if sample_weight is not None:
            losses = losses * ops.cast(ops.reshape(sample_weight, (-1,)), losses.dtype)
        loss = ops.mean(losses)
        for extra in self.backbone.losses:
            loss = loss + ops.cast(ops.sum(extra), loss.dtype)
        return loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return self.get_metrics_result()

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"sample_rate": self.sample_rate, "num_shards": self.num_shards,
                       "seed": self.seed})
        return config
