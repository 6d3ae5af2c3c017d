"""S2SD: train a small embedding by distilling the batch similarities of larger ones.

Simultaneous Similarity-based Self-Distillation (Roth et al., ICML 2021) adds
auxiliary high-dimensional "target" embedding heads g_1..g_m next to the base
embedding head f during training. Every head is trained with the same metric
loss, and f also learns to reproduce the row-softmaxed cosine-similarity
matrix of each g (and optionally of the backbone features φ). Only backbone +
f are kept at test time, so the extra heads cost nothing at inference.

`similarity_distillation` is the distillation term as a plain function of two
embedding batches; `S2SD` is the `keras.Model` that trains it with
`compile()` and `fit()`.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from keras_dml import distributed
from keras_dml._checks import (
    check_non_negative,
    check_non_negative_int,
    check_positive,
    check_positive_int,
)
from keras_dml.distances import cosine_similarity
from keras_dml.layers.embedding import L2Normalize
from keras_dml.losses.base import check_labels_dtype
from keras_dml.models.base import BackboneModel, call_head, deserialize_parts, known_output_shape


def similarity_distillation(
    student_embeddings,
    teacher_embeddings,
    temperature: float = 1.0,
    cross_replica: bool = False,
):
    """Scores how far the student's batch similarities are from the teacher's; add it to a loss.

    With `D_s` and `D_t` the cosine-similarity matrices of the rows of the two
    batches (the diagonal included), and `σ` a row-wise softmax:

        L = T² · mean_i KL( σ(D_t[i] / T) ‖ σ(D_s[i] / T) )

    The teacher is a constant here (`stop_gradient`, the "†" of the paper):
    the loss moves the student towards the teacher, never the reverse. The
    `T²` factor, from the authors' code, keeps the gradient scale roughly
    independent of `T` (Hinton et al.'s convention). The two batches may have
    different widths; only their `(B, B)` similarity matrices are compared.

    Args:
        student_embeddings: `(B, D_s)` embeddings that receive the gradient.
        teacher_embeddings: `(B, D_t)` embeddings whose similarities are the
            target; they get no gradient.
        temperature: softmax temperature `T` > 0.
        cross_replica: under `tf.distribute`, compare each local row with the
            rows of all replicas (the columns of the global batch's
            similarity matrices) and average over the global batch, so that
            the value is the global batch's distillation; a no-op elsewhere.

    Returns:
        A float32 scalar, >= 0, zero when both batches have the same
        similarity matrix.

    Example:

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(6, 4)).astype("float32")
    >>> round(float(similarity_distillation(x, 3.0 * x)), 6)  # same cosines: no loss
    0.0
    >>> float(similarity_distillation(x, x[::-1])) > 0
    True

    Reference: Roth, Milbich, Ommer, Cohen & Ghassemi, "Simultaneous
    Similarity-based Self-Distillation for Deep Metric Learning", ICML 2021, eq. 3.
    """
    temperature = check_positive(temperature, "temperature")
    student = ops.convert_to_tensor(student_embeddings)
    teacher = ops.stop_gradient(ops.convert_to_tensor(teacher_embeddings))
    if len(student.shape) != 2 or len(teacher.shape) != 2:
        raise ValueError(
            "`student_embeddings` and `teacher_embeddings` must both have shape (batch, dim), "
            f"got {tuple(student.shape)} and {tuple(teacher.shape)}."
        )
    if student.shape[0] is not None and teacher.shape[0] is not None:
        if student.shape[0] != teacher.shape[0]:
            raise ValueError(
                f"The student batch has {student.shape[0]} rows and the teacher batch "
                f"{teacher.shape[0]}; distillation compares the same samples, so they must match."
            )
    across_replicas = cross_replica and distributed.replica_context() is not None
    if across_replicas:
        # Columns of every replica; the gather is differentiable, so the
        # student's other-replica columns send their gradient home.
        student_columns = distributed.gather(student)
        teacher_columns = distributed.gather(teacher)
    else:
        student_columns = teacher_columns = None
    # Similarities in float32: a float16 softmax over a large batch loses the
    # small probabilities that carry most of the ranking information.
    student_logits = ops.cast(cosine_similarity(student, student_columns), "float32") / temperature
    teacher_logits = ops.cast(cosine_similarity(teacher, teacher_columns), "float32") / temperature
    student_log_probs = ops.log_softmax(student_logits, axis=-1)
    teacher_log_probs = ops.log_softmax(teacher_logits, axis=-1)
    row_kl = ops.sum(ops.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
    if across_replicas:
        rows = ops.cast(ops.shape(row_kl)[0], row_kl.dtype)
        mean_kl = distributed.sum_over_replicas(ops.sum(row_kl)) / ops.maximum(
            distributed.sum_over_replicas(rows), 1.0
        )
    else:
        mean_kl = ops.mean(row_kl)
    # Rounding can leave a tiny negative KL when the two rows are equal.
    return ops.maximum(mean_kl, 0.0) * (temperature**2)


@keras.saving.register_keras_serializable(package="keras_dml")
class S2SD(BackboneModel):
    """Wrap a backbone to train a compact embedding with S2SD; compile with any metric loss and fit.

    Architecture: the backbone maps inputs to features φ of shape `(B, F)`.
    The base head f is a `Dense(embedding_dim)` followed by L2 normalisation;
    this is the embedding used at test time. Each target head g_i is a
    two-layer MLP `Dense(d_i, relu) -> Dense(d_i)` followed by L2
    normalisation, also on φ. Per batch, with `L` the compiled loss:

        loss = ½ (L(f) + mean_i L(g_i))
               + γ · mean_i KL(σ(D_{g_i}/T) ‖ σ(D_f/T))      (g_i† : no gradient)
               + γ_φ · KL(σ(D_φ/T) ‖ σ(D_f/T))               (MSDF only; φ†)

    where `D` is the batch's cosine-similarity matrix and `σ` a row softmax
    (see `similarity_distillation`). The ½ and the mean over target heads
    follow the authors' code, so `distillation_weight=50` means what it means
    there. With `target_dims=()` and no feature distillation the loss is
    `L(f)` alone: the plain baseline.

    Gradient routing: by default (`distillation_into_backbone=False`) the KL
    terms train f's weights only; the backbone learns from the metric losses
    of f and of the target heads. The paper and its code also let the KL
    terms' gradient flow through f into the backbone
    (`distillation_into_backbone=True`). On a small backbone trained from
    scratch that routing makes S2SD worse than its own base loss (issue 14,
    BENCHMARKS.md): the KL's value is small (γ·KL is 1-3% of the loss at γ=50)
    but its gradient into the backbone is 7-11x the metric loss's,
    and since the detached targets g_i(φ) are computed from the same
    backbone, the backbone reduces the KL by moving φ to where f's and the
    g_i's similarity matrices agree (all samples alike) rather than where
    classes separate; f's and the targets' metric losses then stall.
    The target heads' own metric losses train the backbone when φ is at
    least as wide as the widest head (`targets_into_backbone="auto"`, the
    default); on a narrower φ they cost MAP@R against the plain model in
    paired runs, so there the heads see φ held constant and the backbone
    trains on f's metric loss alone, as in the plain model.

    Variants, chosen by the arguments (the paper's names):

    - DSD: one target head, e.g. `target_dims=(2048,)`;
    - MSD: several target heads (the default);
    - MSDF: several target heads and `feature_distillation=True`.

    Training: `compile(optimizer, loss=...)` with one loss, e.g.
    `keras_dml.MultiSimilarityLoss()`, applied to `(labels, embeddings)` of
    every head, and `fit(x, y)` with integer labels; no sample weights (the
    metric losses score a batch as a whole). With `base_head` (a
    `keras_dml.heads` margin head such as `ArcFace(num_classes)`) every head
    gets its own copy of the margin head and the loss, by default
    `SparseCategoricalCrossentropy(from_logits=True)`, is applied to its
    logits instead. Each term is logged as a metric: `base_loss`,
    `target_{d}_loss` per target head, `distillation` (the mean KL over target
    heads, before γ) and `feature_distillation` (before γ_φ).

    Inference: `model(x)`, `predict` and `embedding_model()` use backbone + f
    only; the target heads add no inference cost. `model(x, training=True)`
    returns `{"embeddings": ..., "features": ...}`, which `compute_loss`
    needs; `evaluate` runs the backbone again to compute the same terms.

    Backends: the loss is written in `keras.ops` inside `compute_loss`, with
    Keras's own `train_step`, so training runs on TensorFlow and JAX. Under
    `tf.distribute` (e.g. `MirroredStrategy`), with `cross_replica=True` the
    distillation compares each replica's rows with the whole global batch,
    and a compiled keras-dml metric loss gathers the replicas' batches too
    (its own `cross_replica`): a step then equals the single-device step on
    the global batch. With `cross_replica=False` each replica distils within
    its own sub-batch.

    Defaults (paper: Roth et al., ICML 2021; code: github.com/MLforHealth/S2SD,
    the repository the paper links, `parameters.py` and `criteria/s2sd.py`):
    `target_dims=(512, 1024, 1536, 2048)` as in the code's default and the
    paper's MSD setup; `temperature=1` and `distillation_weight=50` (code
    defaults, used in all its sample runs); `feature_distillation_weight`
    defaults to `distillation_weight` (the code's 50) and
    `feature_distillation_delay=1000` training steps (the code's default;
    scale it to your schedule, as it was set for ~150 epochs of CUB200).
    Two defaults depart from the paper: `distillation_into_backbone=False`
    and `targets_into_backbone="auto"` (see "Gradient routing" above; "auto"
    is the paper's routing whenever φ is as wide as the heads). The paper's
    exact configuration is `S2SD(backbone, distillation_into_backbone=True,
    targets_into_backbone=True)`, which is what models saved before those
    arguments existed load with.

    Args:
        backbone: a Keras model or layer mapping inputs to `(batch, F)`
            features φ (pooled, not yet an embedding), ideally wider than
            every target head, as a ResNet's 2048-d pooled features are (on
            a narrower φ the target heads do not train the backbone, see
            `targets_into_backbone`).
        embedding_dim: width of the base embedding f used at test time.
        target_dims: widths of the target heads g_i; `()` for none. The
            paper's are 4-16x its 128-d f; keep that ratio for other widths.
        temperature: softmax temperature T of the distillation.
        distillation_weight: γ, the weight of the mean distillation from the
            target heads.
        feature_distillation: also distil from the backbone features φ (MSDF).
        feature_distillation_weight: γ_φ; defaults to `distillation_weight`.
        feature_distillation_delay: number of training steps before the
            feature distillation is switched on (it is logged before that).
        distillation_warmup: number of training steps over which γ ramps
            linearly from 0 to its value (step s uses γ·min(1, (s+1)/N); the
            same factor multiplies γ_φ). Defaults to 1000: in paired runs on
            narrow-φ digits, 1-D signals and glyphs it kept S2SD at or above the
            loss alone where distilling at full weight from the first step
            (`0`, the paper's) fell below it in some seeds (issue 14,
            BENCHMARKS.md). On a long run (the paper's ~8000 steps on CUB-200)
            it is the first eighth. The γ and warm-up sweeps behind the default
            are in BENCHMARKS.md (issue 14).
        base_head: optional margin head applied to f's embeddings with the
            labels; each target head gets a fresh copy of it (same config).
        cross_replica: under `tf.distribute`, distil the similarity matrices
            of the global batch (all replicas' rows as columns) rather than
            each replica's own; a no-op elsewhere. Defaults to `True`.
        distillation_into_backbone: let the distillation terms' gradient
            flow through f into the backbone, as in the paper and its code.
            Defaults to `False`: the distillation trains f's weights only
            (f is computed a second time on φ held constant), so the backbone
            gets the metric losses' gradients alone and S2SD cannot pull it
            below the plain model on small from-scratch backbones.
        targets_into_backbone: let the target heads' metric losses train the
            backbone (`True`, the paper's), or compute the target heads on φ
            held constant (`False`, `stop_gradient`: with
            `distillation_into_backbone=False` only f's metric loss then
            trains the backbone, as in the plain model). `"auto"` (the
            default) is `True` when φ is at least as wide as the widest
            target head (a ResNet's 2048-d pooled features under the paper's
            512-2048-d heads) and `False` when φ is narrower, where the target
            heads' gradient cost MAP@R against the plain model in paired runs
            (issue 14, BENCHMARKS.md). `targets_into_backbone_resolved` tells
            which one a built model uses.
        **kwargs: `keras.Model` arguments (`name`, ...).

    Example:

    >>> import keras, numpy as np
    >>> import keras_dml
    >>> backbone = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, "relu")])
    >>> model = S2SD(backbone, embedding_dim=8, target_dims=(32, 64))
    >>> model.compile(optimizer="adam", loss=keras_dml.MultiSimilarityLoss())
    >>> x = np.random.rand(64, 16).astype("float32")
    >>> y = np.arange(64) % 4
    >>> history = model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    >>> sorted(history.history)
    ['base_loss', 'distillation', 'loss', 'target_32_loss', 'target_64_loss']
    >>> model.predict(x, verbose=0).shape
    (64, 8)

    Reference: Roth, Milbich, Ommer, Cohen & Ghassemi, "Simultaneous
    Similarity-based Self-Distillation for Deep Metric Learning", ICML 2021.
    """

    def __init__(
        self,
        backbone: keras.layers.Layer,
        embedding_dim: int = 128,
        target_dims: Sequence[int] = (512, 1024, 1536, 2048),
        temperature: float = 1.0,
        distillation_weight: float = 50.0,
        feature_distillation: bool = False,
        feature_distillation_weight: float | None = None,
        feature_distillation_delay: int = 1000,
        distillation_warmup: int = 1000,
        base_head: keras.layers.Layer | None = None,
        cross_replica: bool = True,
        distillation_into_backbone: bool = False,
        targets_into_backbone: bool | str = "auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.cross_replica = bool(cross_replica)
        self.distillation_into_backbone = bool(distillation_into_backbone)
        if not (isinstance(targets_into_backbone, bool) or targets_into_backbone == "auto"):
            raise ValueError(
                f"`targets_into_backbone` must be True, False or 'auto', got "
                f"{targets_into_backbone!r}."
            )
        self.targets_into_backbone = targets_into_backbone
        # Resolved from φ's width when the heads are built ("auto").
        self._targets_into_backbone = (
            None if targets_into_backbone == "auto" else targets_into_backbone
        )
        if not isinstance(backbone, keras.layers.Layer):
            raise ValueError(f"`backbone` must be a Keras model or layer, got {type(backbone)}.")
        if base_head is not None and not isinstance(base_head, keras.layers.Layer):
            raise ValueError(f"`base_head` must be a keras_dml head layer, got {type(base_head)}.")
        self.embedding_dim = check_positive_int(embedding_dim, "embedding_dim")
        if isinstance(target_dims, (int, np.integer)):
            target_dims = (target_dims,)
        self.target_dims = tuple(check_positive_int(d, "target_dims") for d in target_dims)
        if len(set(self.target_dims)) != len(self.target_dims):
            raise ValueError(
                f"`target_dims` must not repeat a width (heads are named by it), got "
                f"{self.target_dims}."
            )
        self.temperature = check_positive(temperature, "temperature")
        self.distillation_weight = check_non_negative(distillation_weight, "distillation_weight")
        self.feature_distillation = bool(feature_distillation)
        self.feature_distillation_weight = check_non_negative(
            distillation_weight if feature_distillation_weight is None
            else feature_distillation_weight,
            "feature_distillation_weight",
        )
        self.feature_distillation_delay = check_non_negative_int(
            feature_distillation_delay, "feature_distillation_delay"
        )
        self.distillation_warmup = check_non_negative_int(
            distillation_warmup, "distillation_warmup"
        )

        self.backbone = backbone
        self.embedding_head = keras.layers.Dense(self.embedding_dim, name="embedding")
        # The package's one L2 normalisation (`layers.L2Normalize`: no overflow
        # for large rows, where Keras's `UnitNormalization` returns zeros), taken
        # in float32 under mixed precision.
        unit_dtype = _float32_under_mixed_precision()
        self.embedding_normalization = L2Normalize(
            name="embedding_normalization", dtype=unit_dtype
        )
        self.target_heads = [
            keras.Sequential(
                [
                    keras.layers.Dense(dim, activation="relu", name=f"target_{dim}_hidden"),
                    keras.layers.Dense(dim, name=f"target_{dim}_output"),
                    L2Normalize(
                        name=f"target_{dim}_normalization", dtype=unit_dtype
                    ),
                ],
                name=f"target_{dim}",
            )
            for dim in self.target_dims
        ]
        self.base_head = base_head
        self.target_margin_heads = []
        if base_head is not None:
            # Each target embedding has its own width, so it needs its own
            # centres: a fresh head built from the same config (the authors'
            # code creates one criterion instance per target head too).
            for dim in self.target_dims:
                config = base_head.get_config()
                config["name"] = f"{base_head.name}_target_{dim}"
                self.target_margin_heads.append(base_head.__class__.from_config(config))
        # Used when `compile()` got no loss and a margin head gives logits.
        self._head_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        self.base_loss_tracker = keras.metrics.Mean(name="base_loss")
        self.target_loss_trackers = [
            keras.metrics.Mean(name=f"target_{dim}_loss") for dim in self.target_dims
        ]
        self.distillation_tracker = (
            keras.metrics.Mean(name="distillation") if self.target_dims else None
        )
        self.feature_distillation_tracker = None
        self.feature_distillation_step = None
        self._training_step = None
        if self.feature_distillation:
            self.feature_distillation_tracker = keras.metrics.Mean(name="feature_distillation")
        if self.feature_distillation or self.distillation_warmup:
            # A model variable rather than `optimizer.iterations`: under JAX
            # the optimizer's state is not visible inside `compute_loss`. It
            # exists only when a delay or a warm-up reads it, so that models
            # without either keep the variables they always had.
            self._training_step = self.add_weight(
                name=(
                    "feature_distillation_step" if self.feature_distillation
                    else "distillation_step"
                ),
                shape=(),
                dtype="int32",
                initializer="zeros",
                trainable=False,
                aggregation="only_first_replica",
            )
            if self.feature_distillation:
                self.feature_distillation_step = self._training_step

        output_shape = known_output_shape(backbone, "(batch, F)")
        if output_shape is not None:
            self._build_heads(output_shape)
            self.built = True

    # -- building ---------------------------------------------------------------

    def build(self, input_shape):
        self._record_input_shape(input_shape)
        if not self.backbone.built:
            self.backbone.build(input_shape)
        self._build_heads(self.backbone.compute_output_shape(input_shape))
        self.built = True

    def _build_heads(self, feature_shape):
        feature_shape = tuple(feature_shape)
        if len(feature_shape) != 2 or feature_shape[-1] is None:
            raise ValueError(
                "`backbone` must output features of shape (batch, F) with a known F (pool "
                f"feature maps first), got shape {feature_shape}."
            )
        self._targets_into_backbone = self._resolve_targets_into_backbone(feature_shape[-1])
        for layer in (self.embedding_head, *self.target_heads):
            if not layer.built:
                layer.build(feature_shape)
        embedding_shape = (feature_shape[0], self.embedding_dim)
        if not self.embedding_normalization.built:
            self.embedding_normalization.build(embedding_shape)
        if self.base_head is not None:
            heads = [self.base_head, *self.target_margin_heads]
            for head, dim in zip(heads, (self.embedding_dim, *self.target_dims), strict=True):
                if not head.built:
                    head.build((feature_shape[0], dim))

    def _resolve_targets_into_backbone(self, feature_dim) -> bool:
        """`targets_into_backbone` as a bool, for features φ that are `feature_dim` wide.

        "auto" is True when φ is at least as wide as the widest target head. The one
        place of that rule: `build` stores the answer; a loss computed before `build`
        asks here.
        """
        if self._targets_into_backbone is not None:
            return self._targets_into_backbone
        return feature_dim >= max(self.target_dims, default=0)

    # -- forward ----------------------------------------------------------------

    def _features_and_embeddings(self, inputs, training=None):
        features = self.backbone(inputs, training=training)
        embeddings = self.embedding_normalization(self.embedding_head(features))
        return features, embeddings

    def call(self, inputs, training=None):
        features, embeddings = self._features_and_embeddings(inputs, training=training)
        if training:
            # `compute_loss` needs φ as well; Keras's train_step passes this
            # output straight to it, so the backbone runs once per step.
            return {"embeddings": embeddings, "features": features}
        return embeddings

    # -- training ---------------------------------------------------------------

    def compute_loss_terms(self, x, y, training: bool = False) -> dict:
        """Every term of the S2SD loss for one batch, before weighting, as a dict of scalars.

        Keys: `base_loss`, `target_{d}_loss` per target head, `distillation`
        (mean over target heads) when there are target heads, and
        `feature_distillation` when it is on. Useful to inspect the terms or
        their gradients; `fit` combines them as in the class docstring.

        Args:
            x: a batch of inputs.
            y: `(B,)` integer class labels.
            training: run the backbone and heads in training mode.
        """
        features, embeddings = self._features_and_embeddings(x, training=training)
        return self._loss_terms(features, embeddings, _class_labels(y), training)

    def _loss_terms(self, features, embeddings, labels, training):
        terms = {"base_loss": self._branch_loss(labels, embeddings, self.base_head, training)}
        # With `targets_into_backbone=False` the target heads see φ held
        # constant: their metric losses train their own weights only.
        into = self._resolve_targets_into_backbone(features.shape[-1])
        target_inputs = features if into else ops.stop_gradient(features)
        target_embeddings = [head(target_inputs, training=training) for head in self.target_heads]
        margin_heads = self.target_margin_heads or [None] * len(self.target_heads)
        branches = zip(self.target_dims, target_embeddings, margin_heads, strict=True)
        for dim, target, head in branches:
            terms[f"target_{dim}_loss"] = self._branch_loss(labels, target, head, training)
        student = embeddings
        if not self.distillation_into_backbone and (target_embeddings or self.feature_distillation):
            # The same f, computed on φ held constant: the distillation's gradient
            # reaches f's weights only, and the backbone learns from the metric losses.
            student = self.embedding_normalization(
                self.embedding_head(ops.stop_gradient(features))
            )
        if target_embeddings:
            terms["distillation"] = ops.mean(
                ops.stack(
                    [
                        similarity_distillation(
                            student, target, self.temperature, self.cross_replica
                        )
                        for target in target_embeddings
                    ]
                )
            )
        if self.feature_distillation:
            terms["feature_distillation"] = similarity_distillation(
                student, features, self.temperature, self.cross_replica
            )
        return terms

    def _loss_function(self):
        loss = self.loss
        if loss is None:
            if self.base_head is None:
                raise ValueError(
                    "S2SD needs a metric loss: `model.compile(optimizer, "
                    "loss=keras_dml.MultiSimilarityLoss())`."
                )
            return self._head_loss
        if isinstance(loss, str):
            return keras.losses.get(loss)
        if isinstance(loss, (list, tuple, dict)) or not callable(loss):
            raise ValueError(
                f"S2SD applies one loss to every head; `compile(loss=...)` got {loss!r}."
            )
        return loss

    def _branch_loss(self, labels, embeddings, head, training):
        """The compiled loss of one head's embeddings (through its margin head, if any)."""
        loss_fn = self._loss_function()
        extra = []
        predictions = embeddings
        if head is not None:
            predictions, extra = call_head(head, embeddings, labels, training)
        value = _per_replica_loss(loss_fn, labels, predictions)
        for term in extra:
            value = value + ops.cast(ops.sum(term), value.dtype)
        return value

    def _total_loss(self, terms):
        base = ops.cast(terms["base_loss"], "float32")
        ramp = self._warmup_ramp()
        if self.target_dims:
            targets = ops.stack(
                [ops.cast(terms[f"target_{dim}_loss"], "float32") for dim in self.target_dims]
            )
            total = 0.5 * (base + ops.mean(targets))
            total = total + self.distillation_weight * ramp * terms["distillation"]
        else:
            total = base
        if self.feature_distillation:
            switched_on = ops.cast(
                ops.greater_equal(self._training_step, self.feature_distillation_delay),
                "float32",
            )
            total = total + (
                self.feature_distillation_weight * switched_on * ramp
                * terms["feature_distillation"]
            )
        return total

    def _warmup_ramp(self):
        """min(1, (step + 1) / distillation_warmup): the fraction of γ used at this step."""
        if not self.distillation_warmup:
            return 1.0
        step = ops.cast(self._training_step, "float32")
        return ops.minimum(1.0, (step + 1.0) / float(self.distillation_warmup))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if y is None:
            raise ValueError("`y` (integer class labels) is required to train an S2SD model.")
        if sample_weight is not None:
            raise ValueError(
                "S2SD does not support `sample_weight`: its metric losses score the batch as a "
                "whole."
            )
        labels = _class_labels(y)
        if isinstance(y_pred, dict):
            features, embeddings = y_pred["features"], y_pred["embeddings"]
        else:
            # `evaluate` calls the model in inference mode, which returns only
            # the embeddings; φ is needed for the target heads.
            features, embeddings = self._features_and_embeddings(x, training=False)
        terms = self._loss_terms(features, embeddings, labels, training)
        total = self._total_loss(terms)
        for loss in self.losses:  # regularisers of the backbone and heads
            total = total + ops.cast(ops.sum(loss), total.dtype)
        if training and self._training_step is not None:
            self._training_step.assign_add(1)

        batch_size = ops.shape(labels)[0]
        self.base_loss_tracker.update_state(terms["base_loss"], sample_weight=batch_size)
        for dim, tracker in zip(self.target_dims, self.target_loss_trackers, strict=True):
            tracker.update_state(terms[f"target_{dim}_loss"], sample_weight=batch_size)
        if self.distillation_tracker is not None:
            self.distillation_tracker.update_state(terms["distillation"], sample_weight=batch_size)
        if self.feature_distillation_tracker is not None:
            self.feature_distillation_tracker.update_state(
                terms["feature_distillation"], sample_weight=batch_size
            )
        # Every term above is this replica's own value. Keras sums gradients
        # over replicas and multiplies the logged loss back, so the returned
        # total is divided by the number of replicas (as Keras losses do).
        return total / float(_replicas_in_sync())

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if isinstance(y_pred, dict):
            y_pred = y_pred["embeddings"]
        return super().compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    # -- inference --------------------------------------------------------------

    def _embedding_outputs(self, inputs):
        # Backbone + f: the target heads are training-only.
        return self.embedding_normalization(self.embedding_head(self.backbone(inputs)))

    def embed(self, x, batch_size: int | None = None, verbose: int = 0) -> np.ndarray:
        """Embeddings of `x` from backbone + f, as a NumPy array."""
        return self.predict(x, batch_size=batch_size, verbose=verbose)

    @property
    def targets_into_backbone_resolved(self) -> bool | None:
        """Whether the target heads' metric losses train the backbone (None before `build`)."""
        return self._targets_into_backbone

    # -- serialisation ------------------------------------------------------------

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "backbone": keras.saving.serialize_keras_object(self.backbone),
                "embedding_dim": self.embedding_dim,
                "target_dims": list(self.target_dims),
                "temperature": self.temperature,
                "distillation_weight": self.distillation_weight,
                "feature_distillation": self.feature_distillation,
                "feature_distillation_weight": self.feature_distillation_weight,
                "feature_distillation_delay": self.feature_distillation_delay,
                "distillation_warmup": self.distillation_warmup,
                "cross_replica": self.cross_replica,
                "distillation_into_backbone": self.distillation_into_backbone,
                "targets_into_backbone": self.targets_into_backbone,
                "base_head": (
                    None
                    if self.base_head is None
                    else keras.saving.serialize_keras_object(self.base_head)
                ),
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        # Models saved before the argument existed distilled into the backbone.
        config.setdefault("distillation_into_backbone", True)
        # ... and let the target heads train the backbone.
        config.setdefault("targets_into_backbone", True)
        # ... and distilled at full weight from the first step (no step variable).
        config.setdefault("distillation_warmup", 0)
        return cls(**deserialize_parts(config, ("backbone", "base_head"), custom_objects))


# -- helpers ------------------------------------------------------------------


def _float32_under_mixed_precision():
    """`"float32"` when the global policy computes in half precision, else None (the policy)."""
    if keras.config.dtype_policy().compute_dtype in ("float16", "bfloat16"):
        return "float32"
    return None


def _class_labels(y):
    # Float labels are accepted when they are whole numbers: Keras itself
    # hands `compute_loss` float labels when it builds a distributed model.
    check_labels_dtype(y, "y")
    return ops.cast(ops.reshape(ops.convert_to_tensor(y), (-1,)), "int32")


def _replicas_in_sync() -> int:
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


def _per_replica_loss(loss_fn, labels, predictions):
    """The loss of this replica's batch, not divided by the number of replicas.

    `keras.losses.Loss.__call__` divides a mean loss by the replica count
    under `tf.distribute` (keras-dml's metric losses too). Calling `call` and
    averaging here gives every term the same scale, and `compute_loss`
    divides the total once. A keras-dml metric loss with `cross_replica=True`
    returns the global batch's loss here.
    """
    if isinstance(loss_fn, keras.losses.Loss):
        predictions = ops.convert_to_tensor(predictions, dtype=loss_fn.dtype)
        values = loss_fn.call(labels, predictions)
        reduce = ops.sum if loss_fn.reduction == "sum" else ops.mean
    else:
        values = loss_fn(labels, predictions)
        reduce = ops.mean
    values = ops.convert_to_tensor(values)
    if len(values.shape):
        values = reduce(values)
    return ops.cast(values, "float32")
