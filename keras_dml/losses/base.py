"""What every metric loss shares: input checks, label masks, references and the Loss base class.

A metric loss is a plain function `fn(labels, embeddings, **options)` that
returns a scalar, wrapped by a small `MetricLoss` subclass whose constructor
stores `options`, so that `get_config()` lists exactly them (Keras's own
`LossFunctionWrapper` pattern).

Queries and references: every anchor row of `embeddings` (a query) is
compared with a set of references, by default the batch itself. A pair or
triplet loss also takes `references=References(...)`, e.g. the batches of
all replicas (`gather_references`, what `cross_replica=True` does under
`tf.distribute`) or a memory of past batches; the loss is then the one of the
queries against those references, and `References.mean` turns sums over the
queries into the loss of the whole (global) batch.
"""

from __future__ import annotations

import contextvars
import dataclasses
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_dml import distances as distances_lib
from keras_dml import distributed

# Re-exported: these checks lived here before `keras_dml._checks`.
from keras_dml._checks import (  # noqa: F401
    all_finite,
    check_labels_dtype,
    check_positive,
    concrete_value,
    is_whole_number,
    labels_vector,
)
from keras_dml._checks import dtype_name as _dtype_name

# Set while a loss class runs its function on inputs it has validated: the function's
# own `validate_inputs` then keeps its shape checks and skips the value checks.
_VALUES_CHECKED = contextvars.ContextVar("keras_dml_values_checked", default=False)
# Set while `MetricLoss.__call__` runs on labels whose dtype and (concrete) values it
# checked before Keras cast them: `validate_inputs` does not check them again.
_LABELS_CHECKED = contextvars.ContextVar("keras_dml_labels_checked", default=False)


def validate_inputs(
    labels,
    embeddings,
    labels_arg: str = "y_true",
    embeddings_arg: str = "y_pred",
    multi_label: bool = False,
):
    """Checks ranks, batch sizes and values; returns `(labels (B,) int32, embeddings (B, D) float)`.

    Half-precision embeddings are computed in float32. With
    `multi_label=True`, labels of shape `(B, C)` with `C > 1` are multi-hot
    label sets (see `label_masks`) and are returned as `(B, C)` int32;
    `(B,)` and `(B, 1)` labels are class labels as always.

    Raises:
        ValueError: naming the argument, for a wrong rank, mismatched batch
            sizes, non-integer labels, an empty batch or NaN/Inf embeddings.
            Eagerly and for static shapes it is raised here; inside a
            TensorFlow graph (`model.fit`) the value checks raise
            `tf.errors.InvalidArgumentError` with the same message when the
            step runs, and under JAX's `jit` a `JaxRuntimeError` holding the
            `ValueError` (see `_run_time_checks`).
    """
    if not _LABELS_CHECKED.get():
        check_labels_dtype(labels, labels_arg)
    embeddings = embeddings_matrix(embeddings, embeddings_arg)
    n_embeddings = embeddings.shape[0]
    if is_multi_hot(labels):
        labels = multi_hot_matrix(labels, labels_arg, n_embeddings, embeddings_arg, multi_label)
    else:
        labels = labels_vector(labels, labels_arg, n_embeddings, embeddings_arg)
    if n_embeddings == 0:
        raise ValueError(_EMPTY_BATCH.format(arg=embeddings_arg))
    if _VALUES_CHECKED.get():
        # A loss class checked these values already (under its own argument names):
        # once per step, and under JAX no second callback racing the first.
        return ops.cast(labels, "int32"), embeddings
    # Eagerly one reduction, read as a scalar (no copy of the embeddings to the host);
    # in a graph, assertion ops. The batch size is static eagerly: checked above.
    finite = all_finite(embeddings)
    if finite is None:
        labels, embeddings = _run_time_checks(labels, embeddings, labels_arg, embeddings_arg)
    elif not finite:
        raise ValueError(_NON_FINITE.format(arg=embeddings_arg))
    labels = ops.cast(labels, "int32")
    return labels, embeddings


def embeddings_matrix(embeddings, arg: str = "y_pred"):
    """`embeddings` as a float tensor of rank 2 (float32 for half-precision or integer inputs).

    Raises:
        ValueError: naming `arg`, unless the shape is `(batch, dim)`.
    """
    embeddings = ops.convert_to_tensor(embeddings)
    if ops.dtype(embeddings) in ("float16", "bfloat16") or "float" not in ops.dtype(embeddings):
        embeddings = ops.cast(embeddings, "float32")
    if len(embeddings.shape) != 2:
        raise ValueError(
            f"`{arg}` must be embeddings of shape (batch, dim), got shape "
            f"{tuple(embeddings.shape)}."
        )
    return embeddings


def is_multi_hot(labels) -> bool:
    """Whether `labels` are multi-label: rank 2 with more than one (static) column.

    `(B,)` and `(B, 1)` labels are one class label per sample; `(B, C)` with
    `C > 1` are multi-hot label sets (`labels[i, c] != 0`: sample `i` has
    label `c`).
    """
    shape = getattr(labels, "shape", None)
    if shape is None:
        shape = np.shape(labels)
    return len(shape) == 2 and shape[1] is not None and shape[1] > 1


def multi_hot_matrix(labels, arg="y_true", rows=None, rows_arg="y_pred", supported=True):
    """Checks `(B, C)` multi-hot labels; returns them as a tensor (dtype unchanged)."""
    labels = ops.convert_to_tensor(labels)
    if not supported:
        raise ValueError(
            f"`{arg}` has shape {tuple(labels.shape)}: multi-hot (batch, classes) labels are "
            "accepted only by the losses that support multi-label batches (ContrastiveLoss, "
            "MultiSimilarityLoss, CircleLoss, SupConLoss, TripletLoss, TripletSemiHardLoss, "
            "TripletHardLoss); this one needs one class label per sample, shape (batch,)."
        )
    n_labels = labels.shape[0]
    if n_labels is not None and rows is not None and n_labels != rows:
        raise ValueError(
            f"`{arg}` has {n_labels} label rows but `{rows_arg}` has {rows} embeddings; they "
            "must match."
        )
    return labels


def multi_hot(label_lists, num_classes: int):
    """Padded label lists `(B, L)` (-1 = padding) as multi-hot labels `(B, num_classes)` int32.

    The format every multi-label loss and `keras_dml.evaluation.retrieval_metrics`
    take. Works on NumPy arrays and on tensors (e.g. in a `tf.data` map).

    Example:

    >>> import numpy as np
    >>> np.asarray(multi_hot(np.array([[0, 2], [1, -1]]), 3)).tolist()
    [[1, 0, 1], [0, 1, 0]]
    """
    lists = ops.cast(ops.convert_to_tensor(label_lists), "int32")
    if len(lists.shape) != 2:
        raise ValueError(
            f"`label_lists` must have shape (batch, max_labels), got {tuple(lists.shape)}."
        )
    one_hot = ops.one_hot(ops.where(lists >= 0, lists, num_classes), num_classes + 1)
    return ops.cast(ops.max(one_hot[..., :num_classes], axis=1), "int32")


_EMPTY_BATCH = "`{arg}` is an empty batch; a metric loss needs pairs."
_NON_FINITE = "`{arg}` contains NaN or Inf."
_FRACTIONAL = "`{arg}` must hold integer class labels, got non-integer values."


def _whole_numbers(labels):
    """Scalar bool: every (float) label is a finite whole number."""
    return ops.all(is_whole_number(labels))


def _raise_unless(finite, whole, labels_arg, embeddings_arg):
    # Host side of the JAX check (`jax.debug.callback`).
    if not bool(finite):
        raise ValueError(_NON_FINITE.format(arg=embeddings_arg))
    if not bool(whole):
        raise ValueError(_FRACTIONAL.format(arg=labels_arg))


def _run_time_checks(labels, embeddings, labels_arg, embeddings_arg):
    """The value checks of `validate_inputs` for values known only when the step runs.

    - TensorFlow graphs (`tf.function`, what `model.fit` runs): assertion ops
      on which the returned tensors depend; a failure raises
      `tf.errors.InvalidArgumentError` whose message names the argument. (XLA
      drops assertions: with `jit_compile=True` a NaN input still makes the
      loss NaN, see `propagate_non_finite`.)
    - JAX (`jax.jit`): a `jax.debug.callback` raises the `ValueError` on the
      host; `fit` reports it as a `JaxRuntimeError` whose message holds it.
      The batch size is static there, so an empty batch was already refused.
    - Other backends run eagerly: the values were checked directly.
    """
    backend = keras.backend.backend()
    float_labels = "float" in _dtype_name(labels)
    if backend == "tensorflow":
        import tensorflow as tf

        if not tf.is_tensor(embeddings) or isinstance(embeddings, keras.KerasTensor):
            return labels, embeddings
        checks = [
            tf.debugging.assert_greater(
                tf.shape(embeddings)[0], 0, message=_EMPTY_BATCH.format(arg=embeddings_arg)
            ),
            tf.debugging.Assert(
                tf.reduce_all(tf.math.is_finite(embeddings)),
                [_NON_FINITE.format(arg=embeddings_arg)],
            ),
        ]
        if float_labels:
            checks.append(
                tf.debugging.Assert(_whole_numbers(labels), [_FRACTIONAL.format(arg=labels_arg)])
            )
        with tf.control_dependencies(checks):
            return tf.identity(labels), tf.identity(embeddings)
    if backend == "jax":
        import functools

        import jax

        if not isinstance(embeddings, jax.core.Tracer):
            return labels, embeddings
        whole = _whole_numbers(labels) if float_labels else True
        jax.debug.callback(
            functools.partial(_raise_unless, labels_arg=labels_arg, embeddings_arg=embeddings_arg),
            ops.all(ops.isfinite(embeddings)),
            whole,
        )
    return labels, embeddings


def propagate_non_finite(loss, embeddings):
    """`loss`, or NaN when `embeddings` hold a NaN or Inf.

    A loss built from masked reductions can turn a NaN embedding into a
    finite value (a masked-out NaN); this keeps NaN in, NaN out, so that
    `keras.callbacks.TerminateOnNaN` and the logs show it wherever the
    run-time checks cannot raise (XLA).
    """
    finite = ops.all(ops.isfinite(embeddings))
    return ops.where(finite, loss, ops.cast(float("nan"), loss.dtype))


def self_pair_mask(num_queries, num_references, query_offset=0):
    """Boolean `(B, R)` mask, True at `(i, i + query_offset)`: each query paired with itself.

    Query `i` is reference `i + query_offset` when the queries are a slice of
    the references (a replica's rows inside the gathered global batch). The
    index wraps around modulo `num_references`, as in a ring buffer (the
    rows a cross-batch memory has just written may wrap past its end).
    """
    rows = ops.expand_dims(ops.arange(num_queries, dtype="int32"), 1)
    columns = ops.expand_dims(ops.arange(num_references, dtype="int32"), 0)
    position = ops.mod(rows + ops.cast(query_offset, "int32"), ops.cast(num_references, "int32"))
    return ops.equal(columns, position)


def shared_labels(labels, ref_labels):
    """`(B, R)` float32 numbers of labels each query shares with each reference.

    For `(B,)` class labels, 1 where the labels are equal; for `(B, C)`
    multi-hot labels, the size of the intersection of the label sets (a
    matrix product, O(B·R·C)).
    """
    if is_multi_hot(labels):
        queries = ops.cast(ops.not_equal(labels, 0), "float32")
        refs = ops.cast(ops.not_equal(ref_labels, 0), "float32")
        return ops.matmul(queries, ops.transpose(refs))
    same = ops.equal(ops.expand_dims(labels, 1), ops.expand_dims(ref_labels, 0))
    return ops.cast(same, "float32")


def jaccard_overlap(labels, ref_labels=None):
    """`(B, R)` Jaccard overlap `|L_i & L_j| / |L_i | L_j|` of the label sets.

    For `(B,)` class labels it is 1 for equal labels and 0 otherwise; two
    samples without any label overlap 0.

    Example:

    >>> import numpy as np
    >>> overlap = np.asarray(jaccard_overlap(np.array([[1, 1, 0], [0, 1, 1]])), "float64")
    >>> overlap.round(3).tolist()
    [[1.0, 0.333], [0.333, 1.0]]
    """
    refs = labels if ref_labels is None else ref_labels
    shared = shared_labels(labels, refs)
    if not is_multi_hot(labels):
        return shared
    sizes = ops.sum(ops.cast(ops.not_equal(labels, 0), "float32"), axis=1)
    ref_sizes = ops.sum(ops.cast(ops.not_equal(refs, 0), "float32"), axis=1)
    union = ops.expand_dims(sizes, 1) + ops.expand_dims(ref_sizes, 0) - shared
    return shared / ops.maximum(union, 1.0)


MULTI_LABEL_MODES = ("any", "jaccard")


def check_multi_label(value) -> str:
    """`value` if it is a multi-label mode (`"any"` or `"jaccard"`), else `ValueError`."""
    if value not in MULTI_LABEL_MODES:
        raise ValueError(f"`multi_label` must be one of {MULTI_LABEL_MODES}, got {value!r}.")
    return value


def label_masks(labels, ref_labels=None, query_offset=None):
    """Boolean `(B, R)` masks of positive and negative pairs.

    Multi-label batches: with `(B, C)` multi-hot labels (and `(R, C)`
    reference labels) a pair is positive when the two samples share at least
    one label and negative when they share none; a sample without any label
    is a negative of every other. Single-label `(B,)` labels given as one-hot
    rows give exactly the masks of the class labels.

    Args:
        labels: `(B,)` int labels of the anchors (queries), or `(B, C)`
            multi-hot label sets.
        ref_labels: `(R,)` (or `(R, C)`) labels of the references; defaults
            to `labels`, in which case an anchor is never its own positive.
        query_offset: with `ref_labels`, the index of query 0 among the
            references when the queries are a slice of them (query `i` is
            reference `i + query_offset`); that self-pair is then no positive.
            None (the default with `ref_labels`): queries and references are
            different samples.

    Returns:
        `(positive_mask, negative_mask)`.

    Example:

    >>> import numpy as np
    >>> pos, neg = label_masks(np.array([1, 1]), np.array([0, 1, 1]), query_offset=1)
    >>> np.asarray(pos).tolist()
    [[False, False, True], [False, True, False]]
    """
    refs = labels if ref_labels is None else ref_labels
    if is_multi_hot(labels):
        same = shared_labels(labels, refs) > 0
    else:
        same = ops.equal(ops.expand_dims(labels, 1), ops.expand_dims(refs, 0))
    negative = ops.logical_not(same)
    not_self = None
    if ref_labels is None:
        n = ops.shape(labels)[0]
        not_self = ops.logical_not(ops.cast(ops.eye(n), "bool"))
    elif query_offset is not None:
        is_self = self_pair_mask(ops.shape(labels)[0], ops.shape(refs)[0], query_offset)
        not_self = ops.logical_not(is_self)
    if not_self is not None:
        same = ops.logical_and(same, not_self)
        if is_multi_hot(labels):
            # A sample without labels shares none with itself: not its own negative either.
            negative = ops.logical_and(negative, not_self)
    return same, negative


@dataclasses.dataclass(frozen=True)
class References:
    """The samples a metric loss compares its queries with, and how it averages over queries.

    Attributes:
        labels: `(R,)` int32 labels of the references.
        embeddings: `(R, D)` float embeddings of the references.
        query_offset: index of query 0 among the references when the queries
            are a slice of them (query `i` is reference `i + query_offset`,
            a pair that is never used); None when they are other samples
            (e.g. a memory of past batches).
        across_replicas: True when the references are the gathered batches
            of all `tf.distribute` replicas: `mean` then sums its numerator
            and denominator over the replicas, so that every replica's loss
            is the loss of the global batch.
        valid: optional `(R,)` bool, False at references that do not exist
            yet (the empty slots of a cross-batch memory that has not filled
            up): they are neither positives nor negatives of any query. None:
            all are valid.

    Example: two queries against three references, the queries being
    references 0 and 1 (`query_offset=0`; by default every loss uses
    `References.of_batch(labels, embeddings)`, the batch against itself).

    >>> import numpy as np
    >>> from keras_dml.losses.contrastive import contrastive_loss
    >>> labels = np.array([0, 1], "int32")
    >>> emb = np.array([[0.0, 0.0], [0.0, 0.5]], "float32")
    >>> refs = References(np.array([0, 1, 0], "int32"), np.array([[0, 0], [0, 0.5], [0, 0.1]],
    ...                   "float32"), query_offset=0)
    >>> # positive pairs: (q0, r2) at 0.1; negatives: (q0, r1), (q1, r0) at 0.5, (q1, r2) at 0.4
    >>> round(float(contrastive_loss(labels, emb, references=refs)), 4)
    0.6333
    """

    labels: Any
    embeddings: Any
    query_offset: Any = None
    across_replicas: bool = False
    valid: Any = None
    # The references are the query batch itself: `pairwise` keeps the exact
    # `y=None` numerics of `keras_dml.distances`.
    _is_query_batch: bool = dataclasses.field(default=False, repr=False)

    @classmethod
    def of_batch(cls, labels, embeddings) -> References:
        """The batch as its own references (the default of every loss)."""
        return cls(labels, embeddings, query_offset=0, _is_query_batch=True)

    def masks(self, labels):
        """`(positive, negative)` `(B, R)` masks of the queries with `labels`."""
        if self._is_query_batch:
            return label_masks(labels)
        positive, negative = label_masks(labels, self.labels, query_offset=self.query_offset)
        if self.valid is not None:
            valid = ops.expand_dims(ops.cast(self.valid, "bool"), 0)
            positive, negative = ops.logical_and(positive, valid), ops.logical_and(negative, valid)
        return positive, negative

    def jaccard(self, labels):
        """`(B, R)` Jaccard overlap of the queries' label sets with the references' ones."""
        if self._is_query_batch:
            return jaccard_overlap(labels)
        return jaccard_overlap(labels, self.labels)

    def not_self(self, num_queries):
        """`(B, R)` bool, False where a query meets itself or an invalid reference.

        All True without `query_offset` and `valid`.
        """
        num_refs = ops.shape(self.embeddings)[0]
        if self.query_offset is None:
            result = ops.ones((num_queries, num_refs), dtype="bool")
        else:
            result = ops.logical_not(self_pair_mask(num_queries, num_refs, self.query_offset))
        if self.valid is not None:
            result = ops.logical_and(result, ops.expand_dims(ops.cast(self.valid, "bool"), 0))
        return result

    def pairwise(self, embeddings, distance: str | distances_lib.Distance, kind: str = "distance"):
        """The `(B, R)` matrix between queries and references, as a distance or a similarity.

        Args:
            embeddings: `(B, D)` query embeddings.
            distance: a name or `Distance` of `keras_dml.distances`.
            kind: `"distance"` (smaller is closer: `1 - cos`, `-dot`) or
                `"similarity"` (larger is closer: `-d` for distances).
        """
        measure = distances_lib.get(distance)
        convert = measure.distance if kind == "distance" else measure.similarity
        if self._is_query_batch:
            return convert(embeddings)
        values = convert(embeddings, self.embeddings)
        if self.query_offset is not None and measure.zero_self:
            # As `y=None` zeroes the diagonal: rounding cannot leave a tiny
            # self-distance (and sqrt's steep slope) at the queries' own rows.
            is_self = self_pair_mask(ops.shape(values)[0], ops.shape(values)[1], self.query_offset)
            values = values * (1.0 - ops.cast(is_self, values.dtype))
        return values

    def gather_rows(self, values):
        """Per-query values `(B, ...)` of every reference: across replicas, all replicas' rows.

        For a loss whose pair term needs something computed per row for the
        reference as well (lifted structure's log-sum-exp over a row's
        negatives). Only defined when the references are the query batch or
        the replicas' gathered batches.
        """
        if self._is_query_batch:
            return values
        if not self.across_replicas:
            raise ValueError(
                "This loss needs per-row values of its references, which only the batch itself "
                "or the gathered replica batches provide."
            )
        return distributed.gather(values)

    def mean(self, total, count):
        """`total / max(count, 1)`: a mean over queries, pairs or triplets of the (global) batch.

        `total` sums the per-query, per-pair or per-triplet terms of these
        queries and `count` counts them. Across replicas both are summed
        over the replicas first, so every replica returns the global-batch
        loss (numerator and denominator of a ratio are summed separately:
        averaging the replicas' means would weight them wrongly).
        """
        count = ops.cast(count, total.dtype)
        if self.across_replicas:
            total = distributed.sum_over_replicas(total)
            count = distributed.sum_over_replicas(ops.stop_gradient(count))
        return total / ops.maximum(count, 1.0)

    def weighted_mean(self, total, weight):
        """`total / weight`, 0 where `weight` is 0: a mean with fractional pair weights.

        Like `mean`, summed over the replicas first; unlike `mean` the
        denominator is not clipped at 1 (Jaccard weights may sum to less).
        """
        weight = ops.cast(weight, total.dtype)
        if self.across_replicas:
            total = distributed.sum_over_replicas(total)
            weight = distributed.sum_over_replicas(ops.stop_gradient(weight))
        return total / ops.where(weight > 0, weight, ops.ones_like(weight))

    def mean_over_queries(self, per_query):
        """The mean of a `(B,)` per-query term over all queries (of all replicas)."""
        return self.mean(ops.sum(per_query), ops.shape(per_query)[0])


def resolve_references(labels, embeddings, references: References | None) -> References:
    """`references`, or the batch itself when None."""
    if references is None:
        return References.of_batch(labels, embeddings)
    if not isinstance(references, References):
        raise ValueError(
            f"`references` must be a keras_dml.losses.base.References, got {type(references)}."
        )
    return references


def gather_references(labels, embeddings, instance_labels: bool = False) -> References | None:
    """The batches of all `tf.distribute` replicas as references; None outside a multi-replica run.

    The embeddings are gathered differentiably (see `keras_dml.distributed`),
    the labels as constants.

    Args:
        labels: `(B,)` int32 labels of this replica.
        embeddings: `(B, D)` float embeddings of this replica.
        instance_labels: the labels are ids local to the replica (0..B-1, e.g.
            NT-Xent's instance ids): each replica's ids are shifted by its row
            offset, so they stay distinct across replicas.

    Returns:
        `References` with `query_offset` the position of this replica's rows
        and `across_replicas=True`, or None.
    """
    if distributed.replica_context() is None:
        return None
    offset = distributed.local_row_offset(ops.shape(labels)[0])
    if instance_labels:
        labels = labels + ops.cast(offset, labels.dtype)
    return References(
        labels=distributed.gather(ops.stop_gradient(labels)),
        embeddings=distributed.gather(embeddings),
        query_offset=offset,
        across_replicas=True,
    )


class MetricLoss(keras.losses.Loss):
    """Base class: a `keras.losses.Loss` around a metric-loss function.

    Subclasses call `super().__init__(fn, name=..., reduction=..., dtype=...,
    cross_replica=..., **options)`; `call` validates `y_true`/`y_pred` and
    returns `fn(labels, embeddings, **options)`, a scalar. `get_config`
    returns the options, so every subclass round-trips through `from_config`
    and `.keras` files without writing its own. The options are the single
    store of the settings: each reads as an attribute (`loss.margin`) and
    assigning one raises `AttributeError` (build a new loss instead); a
    `distance` name is stored canonical (`"L2"` -> `"euclidean"`).

    Multi-label batches: a subclass with `supports_multi_label = True` (its
    pairs come only from `References.masks`) also takes multi-hot
    `(B, C)` labels: positives share a label, negatives share none (see
    `label_masks`). Others raise a `ValueError` for such labels.

    Under `tf.distribute` (TensorFlow backend):

    - The value is divided by the number of replicas, as Keras does for its
      own mean losses: Keras sums the replicas' gradients (and multiplies the
      logged loss back), but it divides only losses it reduces from
      per-sample values, never an already-scalar loss. Without this a metric
      loss under `MirroredStrategy` would train with N times the gradient.
    - With `cross_replica=True` (for losses whose `fn` takes `references=`),
      the embeddings and labels of all replicas are gathered and every local
      query is compared with the whole global batch; the means inside `fn`
      sum their numerators and denominators over the replicas. The loss and
      its gradient then equal those of a single device on the global batch
      (each replica still back-propagates only through its own rows; the
      gather's backward pass routes the other replicas' gradients to them).
      Outside a multi-replica context, and on JAX and torch, this is a no-op.
    """

    def __init__(
        self,
        fn,
        name: str | None = None,
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
        cross_replica: bool | None = None,
        **options: Any,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if isinstance(options.get("distance"), str):
            # Stored by its canonical name; an unknown name fails here, not at the first batch.
            options["distance"] = distances_lib.get(options["distance"]).name
        self.fn = fn
        self._options = options
        # None: the loss has no cross-replica form (not listed in its config).
        self.cross_replica = None if cross_replica is None else bool(cross_replica)

    # The options are the one store of a loss's settings (what `fn` reads and
    # `get_config` writes); they read as attributes and cannot be assigned.

    def __getattr__(self, name):
        options = self.__dict__.get("_options")
        if options is not None and name in options:
            return options[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value):
        options = self.__dict__.get("_options")
        if options is not None and name in options:
            raise AttributeError(
                f"`{name}` of {type(self).__name__} is read-only: a loss keeps the options it "
                f"was built with. Build a new one, e.g. `{type(self).__name__}.from_config("
                f"{{**loss.get_config(), {name!r}: ...}})`."
            )
        super().__setattr__(name, value)

    @property
    def options(self) -> dict:
        """A copy of the loss's options (its constructor arguments other than the Keras ones)."""
        return dict(self._options)

    def __call__(self, y_true, y_pred, sample_weight=None):
        # Keras casts y_true to the loss dtype before `call`; check the labels first,
        # once (`validate_inputs` in `call` then skips them).
        check_labels_dtype(y_true, "y_true")
        token = _LABELS_CHECKED.set(True)
        try:
            loss = super().__call__(y_true, y_pred, sample_weight=sample_weight)
        finally:
            _LABELS_CHECKED.reset(token)
        if sample_weight is None:
            # With a sample weight the value was broadcast to per-sample values
            # and Keras's own reduction already divided it.
            loss = distributed.scale_for_replicas(loss)
        return loss

    # Whether the loss takes multi-hot `(B, C)` labels (multi-label batches): true for
    # the losses whose pairs come only from `References.masks`.
    supports_multi_label: bool = False

    def call(self, y_true, y_pred):
        labels, embeddings = validate_inputs(
            y_true, y_pred, multi_label=self.supports_multi_label
        )
        return self.compute(labels, embeddings)

    def compute(
        self,
        labels,
        embeddings,
        instance_labels: bool = False,
        references: References | None = None,
    ):
        """`fn` on validated inputs, with the other replicas' batches as references if enabled.

        Not divided by the number of replicas (models that combine several
        terms, like `S2SD`, call this and divide once).

        Args:
            labels: `(B,)` int32 labels.
            embeddings: `(B, D)` float embeddings.
            instance_labels: the labels are replica-local instance ids (see
                `gather_references`).
            references: explicit references (e.g. a cross-batch memory,
                `keras_dml.layers.CrossBatchMemory`), used instead of the
                batch or the replicas' gathered batches; only for losses
                whose function takes `references=`.
        """
        options = dict(self._options)
        if references is not None:
            options["references"] = references
        elif self.cross_replica:
            references = gather_references(labels, embeddings, instance_labels=instance_labels)
            if references is not None:
                options["references"] = references
        token = _VALUES_CHECKED.set(True)
        try:
            loss = self.fn(labels, embeddings, **options)
        finally:
            _VALUES_CHECKED.reset(token)
        return propagate_non_finite(loss, embeddings)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({key: serialize_option(value) for key, value in self._options.items()})
        if self.cross_replica is not None:
            config["cross_replica"] = self.cross_replica
        return config


def serialize_option(value):
    """An option as it goes into a config: objects (a miner, a reducer, a regularizer) serialized.

    Numbers, strings, lists and None are kept as they are; anything with a
    `get_config` is written with `keras.saving.serialize_keras_object`, and
    the loss's constructor turns the dict back into the object
    (`keras_dml.miners.get`, `keras_dml.reducers.get`,
    `keras_dml.regularizers.get`).
    """
    if value is None or isinstance(value, (bool, int, float, str, list, tuple, dict)):
        return value
    if hasattr(value, "get_config"):
        return keras.saving.serialize_keras_object(value)
    return value
