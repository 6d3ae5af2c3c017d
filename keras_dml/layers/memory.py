"""Cross-batch memory (XBM): a ring buffer of past embeddings and labels used as loss references.

Wang, Zhang, Huang & Scott, "Cross-Batch Memory for Embedding Learning",
CVPR 2020. The memory is a layer so that a model owns its variables: they
are saved with the model (`.keras`, checkpoints) and restored on load. The
training loop lives in `keras_dml.models.XBMModel`.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_dml import distributed
from keras_dml._checks import check_positive_int
from keras_dml.losses.base import References


@keras.saving.register_keras_serializable(package="keras_dml")
class CrossBatchMemory(keras.layers.Layer):
    """A queue of the last `memory_size` embeddings and labels, as references for a metric loss.

    `enqueue(labels, embeddings)` writes the batch (detached from the graph)
    at the write pointer, wrapping around, and returns `References` to the
    whole memory, the new batch included, exactly as pytorch-metric-learning's
    `CrossBatchMemory.forward` does before it computes its loss: each query
    is compared with every stored embedding except its own, just-written copy
    (`query_offset`), and, until the memory has filled up once, only the slots
    written so far are used (`valid`). Gradients flow only through the
    queries, never into the memory.

    Under `tf.distribute` every replica gathers the global batch and writes
    it in replica order, so all replicas hold the same memory (the variables
    use `aggregation="only_first_replica"`), and each replica's queries are
    the rows of its own batch inside the written block; the loss means then
    run over the global batch (`References.across_replicas`).

    The variables are float32 (embeddings) and int32 (labels, pointer,
    number of filled slots, number of writes and of calls), also under a mixed-precision
    policy: a half-precision batch is stored in float32.

    Multi-label batches: with `num_classes=C` the memory stores multi-hot
    `(B, C)` label sets (`labels` is `(M, C)`), and a loss that supports them
    (`ContrastiveLoss`, `MultiSimilarityLoss`, `CircleLoss`, `SupConLoss`,
    `TripletLoss`) pairs a query with every stored sample sharing one of its
    labels. PML's `CrossBatchMemory` stores one label per sample.

    Args:
        memory_size: number of stored embeddings `M`; must be at least the
            (global) batch size.
        embedding_dim: embedding dimension `D`; when None it is taken from
            the first `build` (the embeddings' shape).
        num_classes: None (default): one class label per sample; an int
            `C`: multi-hot `(B, C)` labels are stored.
        **kwargs: `keras.layers.Layer` arguments (`name`, ...).

    Example:

    >>> import numpy as np
    >>> from keras_dml.losses import ContrastiveLoss
    >>> memory = CrossBatchMemory(memory_size=6, embedding_dim=2)
    >>> loss = ContrastiveLoss()
    >>> labels = np.array([0, 0, 1, 1], "int32")
    >>> emb = np.array([[0, 1], [0, 0.8], [1, 0], [0.9, 0]], "float32")
    >>> refs = memory.enqueue(labels, emb)
    >>> round(float(loss.compute(labels, emb, references=refs)), 4)
    0.15
    >>> int(memory.size.numpy()), int(memory.pointer.numpy())
    (4, 4)
    >>> refs = memory.enqueue(labels, emb)  # 6 slots: wraps around
    >>> int(memory.size.numpy()), int(memory.pointer.numpy())
    (6, 2)
    """

    def __init__(
        self,
        memory_size: int,
        embedding_dim: int | None = None,
        num_classes: int | None = None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        memory_size = check_positive_int(memory_size, "memory_size")
        if embedding_dim is not None:
            embedding_dim = check_positive_int(embedding_dim, "embedding_dim")
        if num_classes is not None:
            num_classes = check_positive_int(num_classes, "num_classes")
        self.memory_size = memory_size
        self.embedding_dim = embedding_dim
        self.num_classes = num_classes
        if embedding_dim is not None:
            self.build((None, embedding_dim))

    def build(self, input_shape=None):
        if self.built:
            return
        if self.embedding_dim is None:
            if input_shape is None or input_shape[-1] is None:
                raise ValueError("CrossBatchMemory needs `embedding_dim` or a known input shape.")
            self.embedding_dim = int(input_shape[-1])
        elif input_shape is not None and input_shape[-1] not in (None, self.embedding_dim):
            raise ValueError(
                f"CrossBatchMemory holds {self.embedding_dim}-d embeddings, got shape "
                f"{tuple(input_shape)}."
            )

        def state(name, shape, dtype):
            return self.add_weight(
                name=name,
                shape=shape,
                dtype=dtype,
                initializer="zeros",
                trainable=False,
                aggregation="only_first_replica",
            )

        self.embeddings = state("embeddings", (self.memory_size, self.embedding_dim), "float32")
        label_shape = (self.memory_size,) if self.num_classes is None else (
            self.memory_size, self.num_classes)
        self.labels = state("labels", label_shape, "int32")
        # Next slot to write, and number of filled slots (min(writes, M)).
        self.pointer = state("pointer", (), "int32")
        self.size = state("size", (), "int32")
        # Number of `enqueue` calls that wrote to the memory, and of all calls
        # (training steps, warm-up included).
        self.writes = state("writes", (), "int32")
        self.steps = state("steps", (), "int32")
        self.built = True

    def call(self, embeddings):
        # The memory is not a transformation; as a layer it returns its input.
        return embeddings

    def references(self) -> References:
        """`References` to the current memory (no query is in it: `query_offset=None`)."""
        valid = ops.arange(self.memory_size, dtype="int32") < ops.convert_to_tensor(self.size)
        return References(
            labels=ops.convert_to_tensor(self.labels),
            embeddings=ops.convert_to_tensor(self.embeddings),
            valid=valid,
        )

    def enqueue(self, labels, embeddings, active=None) -> References:
        """Writes the (global) batch into the memory; returns references to the updated memory.

        Args:
            labels: `(B,)` int labels of this replica's batch.
            embeddings: `(B, D)` embeddings of this replica's batch (stored
                detached, as float32).
            active: optional scalar bool tensor; when False the memory is
                left unchanged (used for a warm-up) and the returned
                references are those of the unchanged memory.

        Returns:
            `References` to all `memory_size` slots, with `valid` marking the
            filled ones and `query_offset` the slot of this replica's first
            query; `across_replicas=True` under a multi-replica strategy.

        Raises:
            ValueError: when the batch is larger than the memory, its
                embedding dimension differs from `embedding_dim`, or its labels
                are multi-hot without `num_classes` (or class labels with it,
                or of another width).
        """
        embeddings = ops.cast(ops.stop_gradient(ops.convert_to_tensor(embeddings)), "float32")
        labels = ops.cast(ops.stop_gradient(ops.convert_to_tensor(labels)), "int32")
        if not self.built:
            self.build(embeddings.shape)
        if embeddings.shape[-1] is not None and embeddings.shape[-1] != self.embedding_dim:
            raise ValueError(
                f"CrossBatchMemory holds {self.embedding_dim}-d embeddings, got shape "
                f"{tuple(embeddings.shape)}."
            )
        self.check_labels(labels)
        across_replicas = distributed.replica_context() is not None
        local_rows = ops.shape(labels)[0]
        offset = distributed.local_row_offset(local_rows) if across_replicas else 0
        all_labels = distributed.gather(labels)
        all_embeddings = distributed.gather(embeddings)
        rows = all_embeddings.shape[0]
        if rows is not None and rows > self.memory_size:
            raise ValueError(
                f"The (global) batch of {rows} embeddings is larger than the memory "
                f"(memory_size={self.memory_size}); use memory_size >= batch size."
            )
        pointer = ops.convert_to_tensor(self.pointer)
        size = ops.convert_to_tensor(self.size)
        old_embeddings = ops.convert_to_tensor(self.embeddings)
        old_labels = ops.convert_to_tensor(self.labels)
        count = ops.shape(all_labels)[0]
        slots = ops.mod(pointer + ops.arange(count, dtype="int32"), self.memory_size)
        slots = ops.expand_dims(slots, 1)
        new_embeddings = ops.scatter_update(old_embeddings, slots, all_embeddings)
        new_labels = ops.scatter_update(old_labels, slots, all_labels)
        new_pointer = ops.mod(pointer + ops.cast(count, "int32"), self.memory_size)
        new_size = ops.minimum(size + ops.cast(count, "int32"), self.memory_size)
        query_offset = ops.mod(pointer + ops.cast(offset, "int32"), self.memory_size)
        if active is not None:
            active = ops.convert_to_tensor(active)
            new_embeddings = ops.where(active, new_embeddings, old_embeddings)
            new_labels = ops.where(active, new_labels, old_labels)
            new_pointer = ops.where(active, new_pointer, pointer)
            new_size = ops.where(active, new_size, size)
            writes = self.writes + ops.cast(active, "int32")
        else:
            writes = self.writes + 1
        self.embeddings.assign(new_embeddings)
        self.labels.assign(new_labels)
        self.pointer.assign(new_pointer)
        self.size.assign(new_size)
        self.writes.assign(writes)
        self.steps.assign(self.steps + 1)
        valid = ops.arange(self.memory_size, dtype="int32") < new_size
        return References(
            labels=new_labels,
            embeddings=new_embeddings,
            query_offset=query_offset,
            across_replicas=across_replicas,
            valid=valid,
        )

    def check_labels(self, labels):
        """Raises `ValueError` unless `labels` have the form this memory stores."""
        shape = tuple(labels.shape)
        if self.num_classes is None and len(shape) == 2 and shape[1] not in (None, 1):
            raise ValueError(
                f"Labels of shape {shape} are multi-hot label sets; this CrossBatchMemory stores "
                "one class label per sample. Build it with `num_classes=` (XBMModel(..., "
                "num_classes=C)) to store multi-hot labels."
            )
        if self.num_classes is not None and (len(shape) != 2 or shape[1] != self.num_classes):
            raise ValueError(
                f"This CrossBatchMemory stores multi-hot labels of width {self.num_classes}, "
                f"got labels of shape {shape}."
            )

    def reset(self) -> None:
        """Empties the memory (PML's `reset_queue`)."""
        variables = (self.embeddings, self.labels, self.pointer, self.size, self.writes, self.steps)
        for variable in variables:
            variable.assign(ops.zeros(variable.shape, variable.dtype))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"memory_size": self.memory_size, "embedding_dim": self.embedding_dim})
        if self.num_classes is not None:
            config["num_classes"] = self.num_classes
        return config
