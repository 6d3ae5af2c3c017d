"""Collective operations that let a metric loss see every replica's batch under `tf.distribute`.

Metric losses improve with more negatives, and a data-parallel step holds the
other replicas' embeddings anyway. Under a `tf.distribute` strategy
(`MirroredStrategy`, `MultiWorkerMirroredStrategy`, `TPUStrategy`), the
losses of `keras_dml.losses` gather the embeddings and labels of all
replicas (`cross_replica=True`) and compare each local query with the whole
global batch. The gather is differentiable: its backward pass sums, over the
replicas, the gradient that every replica's loss sends to a reference row,
and hands each replica the slice of its own rows, so every replica
back-propagates only through its own forward pass and the summed update
equals the single-device gradient on the global batch.

Outside a replica context with more than one replica, and on the JAX and
torch backends, every function here is the identity (or a no-op): there the
loss already sees the whole batch it is given. (With JAX's
`keras.distribution.DataParallel`, the loss is computed on the sharded global
batch, so the global semantics come without any gather; several processes:
`keras_dml.multihost`, tested in `tests/test_multihost.py`.)

`prepare_multi_worker_fit` works around a Keras bug that stops `fit` under
`MultiWorkerMirroredStrategy`.

Example (no strategy active: nothing to gather):

>>> import numpy as np
>>> from keras_dml import distributed
>>> distributed.replica_context() is None
True
>>> np.asarray(distributed.gather(np.ones((2, 3), "float32"))).shape
(2, 3)
"""

from __future__ import annotations

import keras
from keras import ops


def _is_tensorflow() -> bool:
    return keras.backend.backend() == "tensorflow"


def replica_context():
    """The active `tf.distribute` replica context when it spans more than one replica, else None.

    None on other backends, in a cross-replica context (e.g. directly inside
    `strategy.scope()`, outside `strategy.run`), and with a single replica.
    """
    if not _is_tensorflow():
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync < 2:
        return None
    return context


def num_replicas_in_sync() -> int:
    """Replicas of the current `tf.distribute` strategy (1 on other backends or without one).

    This is the count Keras divides its mean losses by (it reads the
    current strategy, in replica and cross-replica context alike).
    """
    if not _is_tensorflow():
        return 1
    import tensorflow as tf

    return int(tf.distribute.get_strategy().num_replicas_in_sync)


def scale_for_replicas(value):
    """`value / num_replicas_in_sync()`, the scaling Keras applies to every mean loss.

    Keras sums gradients over replicas and multiplies the logged loss back,
    so a loss returns its replica's share. Keras itself only divides when it
    reduces per-sample values; a metric loss is already a scalar and is
    divided here.
    """
    replicas = num_replicas_in_sync()
    if replicas > 1:
        value = value * ops.cast(1.0 / replicas, value.dtype)
    return value


def gather(values):
    """Concatenates `values` of every replica along axis 0, in replica order.

    Differentiable: the gradient reaching a replica's rows is the sum of the
    gradients all replicas send them. The identity outside a multi-replica
    context.
    """
    context = replica_context()
    if context is None:
        return values
    return context.all_gather(values, axis=0)


def sum_over_replicas(values):
    """Sums `values` over the replicas (differentiable); the identity outside one."""
    context = replica_context()
    if context is None:
        return values
    return context.all_reduce("sum", values)


def local_row_offset(num_rows):
    """Index of this replica's first row in `gather(...)`: the rows of the replicas before it.

    Replicas may hold different numbers of rows (the last, partial batch of
    an epoch), so the offset is the sum of the gathered row counts of the
    lower replica ids. 0 outside a multi-replica context.
    """
    context = replica_context()
    if context is None:
        return 0
    import tensorflow as tf

    counts = context.all_gather(tf.reshape(tf.cast(num_rows, tf.int32), [1]), axis=0)
    replica_id = tf.cast(context.replica_id_in_sync_group, tf.int32)
    before = tf.range(tf.shape(counts)[0]) < replica_id
    return tf.reduce_sum(tf.where(before, counts, tf.zeros_like(counts)))


def prepare_multi_worker_fit(model, x, y=None):
    """Lets `fit` train under `MultiWorkerMirroredStrategy`: a workaround of a Keras bug.

    Keras 3's TensorFlow trainer cannot `fit` under `MultiWorkerMirroredStrategy`
    (keras-team/keras#20585): before training it
    reduces a distributed input batch to build the model
    (`_maybe_symbolic_build`), and after every step it reduces the scalar
    logs with `strategy.reduce("MEAN", value, axis=0)`, which fails for a
    0-d value. Call this on the compiled model, inside or outside
    `strategy.scope()`, before `fit`; it

    1. builds the model, its compiled loss and metrics (from one local
       batch `x`, `y`) and the optimizer under the model's strategy, then
       skips Keras's own build step in `fit`/`evaluate`;
    2. makes `train_step` and `test_step` return each log as a 1-element
       vector, which Keras's reduction turns back into the mean over replicas.

    It patches the instance only (private Keras attributes, tested with
    Keras 3.15 / TF 2.20 in `tests/test_multi_worker.py`); a model saved
    afterwards is a normal model. Not needed for `MirroredStrategy` on one
    machine, nor on the JAX backend.

    Args:
        model: a compiled `keras.Model` created under the strategy's scope.
        x: one batch of inputs (any batch size), e.g. `x_train[:8]`.
        y: the matching targets.

    Returns:
        `model`, ready for `fit`.
    """
    if not _is_tensorflow():
        raise RuntimeError("prepare_multi_worker_fit is for the TensorFlow backend.")
    if getattr(model, "_keras_dml_multi_worker", False):
        return model
    strategy = model.distribute_strategy
    with strategy.scope():
        model._symbolic_build(data_batch=(x, y, None))
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
    model._maybe_symbolic_build = lambda *args, **kwargs: None

    import tensorflow as tf

    def as_vectors(step):
        def wrapped(data):
            logs = step(data)
            return {key: tf.reshape(value, [1]) if tf.is_tensor(value) and value.shape.rank == 0
                    else value for key, value in logs.items()}
        return wrapped

    model.train_step = as_vectors(model.train_step)
    model.test_step = as_vectors(model.test_step)
    model._keras_dml_multi_worker = True
    return model
