"""Export embedding and retrieval models as SavedModels that TensorFlow Serving loads.

Signatures written (all take one batch of raw model inputs named `inputs`,
batch dimension dynamic):

`export_embedding_model`:

| signature | outputs | ops |
| --- | --- | --- |
| `serving_default` | `embeddings` (float32, L2-normalised) | stock |

`export_retrieval_model`:

| signature | outputs | ops |
| --- | --- | --- |
| `serving_default` | `retrieve_scann` if `use_scann=True`, else `retrieve_exact` | |
| `retrieve_exact` | `ids`, `scores`: matmul + `tf.math.top_k` | stock |
| `retrieve_scann` | `ids`, `scores`: the ScaNN searcher (`use_scann=True` only) | ScaNN |
| `embed` | `embeddings` (float32, L2-normalised) | stock |

An empty batch returns `(0, k)` ids and scores from every retrieval
signature; a batch whose inputs or embeddings hold NaN or Inf raises
`tf.errors.InvalidArgumentError` naming `inputs`.

`ids` are the index's ids (int64 or string) and `scores` follow the index's
convention: inner products (descending) for `"dot"`, squared distances
(ascending) for `"squared_l2"`.

A stock TensorFlow Serving binary loads every export made with
`use_scann=False`. With `use_scann=True` the SavedModel contains ScaNN's custom
ops (`Scann>TensorsToScann`, `Scann>ScannSearchBatched`), so the whole model,
`retrieve_exact` included, needs a server built with ScaNN's ops; in Python,
`import scann` before `tf.saved_model.load`.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from keras_dml._checks import is_integer
from keras_dml._numpy_ops import NORM_EPSILON
from keras_dml.index.base import Index

SERVING_SIGNATURE = "serving_default"
EMBED_SIGNATURE = "embed"
EXACT_SIGNATURE = "retrieve_exact"
SCANN_SIGNATURE = "retrieve_scann"
INPUT_NAME = "inputs"


def _input_spec(model, input_signature: tf.TensorSpec | None) -> tf.TensorSpec:
    """Returns the serving input spec: the model's input with a dynamic batch."""
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "Exporting traces `model` with TensorFlow: set KERAS_BACKEND=tensorflow, or save "
            f"the model as .keras and reload it under TensorFlow (backend is "
            f"{keras.backend.backend()!r})."
        )
    if input_signature is not None:
        if not isinstance(input_signature, tf.TensorSpec):
            raise ValueError(
                f"`input_signature` must be a tf.TensorSpec, got {type(input_signature).__name__}."
            )
        return tf.TensorSpec(input_signature.shape, input_signature.dtype, name=INPUT_NAME)
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise ValueError(
            "`model` has no known input shape: build it on `keras.Input` or pass "
            "`input_signature=tf.TensorSpec((None, ...), dtype)`."
        )
    if len(inputs) != 1:
        raise ValueError(
            f"`model` must take a single input tensor, it takes {len(inputs)}; wrap it in a "
            "model with one input."
        )
    shape = (None, *tuple(inputs[0].shape)[1:])
    return tf.TensorSpec(shape, tf.as_dtype(inputs[0].dtype), name=INPUT_NAME)


def _embedding_fn(model):
    """Returns `x -> model(x)` as float32 `(batch, dim)`, checking the output."""

    def embed(x):
        y = model(x, training=False)
        if isinstance(y, (list, tuple, dict)):
            raise ValueError(
                "`model` must return one embedding tensor (batch, dim), got a "
                f"{type(y).__name__} of outputs."
            )
        if y.shape.rank != 2:
            raise ValueError(
                f"`model` must return embeddings of shape (batch, dim), got {y.shape}."
            )
        return tf.cast(y, tf.float32)

    return embed


def _checked_finite(inputs, embeddings):
    """`embeddings`, after run-time checks that `inputs` and `embeddings` hold no NaN or Inf.

    A failed check raises `tf.errors.InvalidArgumentError` naming `inputs`:
    a NaN query would otherwise come back with real ids and NaN scores, or
    crash ScaNN's kernel.
    """
    checks = []
    if inputs.dtype.is_floating:
        checks.append(tf.debugging.Assert(
            tf.reduce_all(tf.math.is_finite(inputs)), ["`inputs` contains NaN or Inf."]
        ))
    checks.append(tf.debugging.Assert(
        tf.reduce_all(tf.math.is_finite(embeddings)),
        ["The embeddings of `inputs` contain NaN or Inf."],
    ))
    with tf.control_dependencies(checks):
        return tf.identity(embeddings)


def _normalized(x):
    # The floor of `keras_dml.distances.l2_normalize`: zero rows stay zero.
    return tf.math.l2_normalize(x, axis=-1, epsilon=NORM_EPSILON)


def _save(module: tf.Module, path: str, signatures: dict) -> None:
    """Saves `module`, tracking exactly the variables the signatures read."""
    captured, seen = [], set()
    for fn in signatures.values():
        for variable in fn.get_concrete_function().variables:
            if id(variable) not in seen:
                seen.add(id(variable))
                captured.append(variable)
    # The traced functions capture the tf.Variables under Keras's variable
    # wrappers. Listing those very objects on the root (as Keras's
    # ExportArchive does) lets the TFLite converter freeze them into constants.
    module.captured_variables = captured
    tf.saved_model.save(module, path, signatures=signatures)


def export_embedding_model(model, path: str, input_signature: tf.TensorSpec | None = None) -> None:
    """Writes a SavedModel whose `serving_default` maps raw inputs to L2-normalised embeddings.

    The SavedModel uses only stock TensorFlow ops, so TensorFlow Serving,
    `tf.saved_model.load` and `saved_model_cli run` all load it; the batch
    dimension is dynamic. Signature: input `inputs`, output `embeddings`
    (float32, `(batch, dim)`).

    Args:
        model: a built Keras model with one input, returning `(batch, dim)`
            embeddings (TensorFlow backend).
        path: directory to write; existing SavedModel files are overwritten.
        input_signature: the input `tf.TensorSpec` (use `None` for the batch
            dimension) when `model` has no `inputs` (a subclassed model).

    Raises:
        ValueError: if the input shape is unknown, or `model` has several
            inputs or does not return one `(batch, dim)` tensor.

    Example:

    ```python
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32)])
    keras_dml.export.export_embedding_model(model, "/tmp/embedder/1")
    served = tf.saved_model.load("/tmp/embedder/1").signatures["serving_default"]
    served(inputs=tf.zeros((2, 64)))["embeddings"].shape  # (2, 32)
    ```
    """
    spec = _input_spec(model, input_signature)
    embed = _embedding_fn(model)
    module = tf.Module()

    @tf.function(input_signature=[spec], autograph=False)
    def serve(inputs):
        return {"embeddings": _normalized(embed(inputs))}

    module.serve = serve
    _save(module, path, {SERVING_SIGNATURE: serve})


def _ids_array(index: Index) -> np.ndarray:
    ids = index.ids
    if ids.dtype.kind == "U":
        # tf.string holds bytes; ids come back UTF-8 encoded.
        return np.array([value.encode("utf-8") for value in ids.tolist()], dtype=object)
    return ids.astype(np.int64)


def export_retrieval_model(
    model,
    index: Index,
    path: str,
    k: int = 10,
    use_scann: bool = False,
    input_signature: tf.TensorSpec | None = None,
) -> None:
    """Writes one SavedModel that embeds raw inputs and returns the top-`k` index ids and scores.

    Signatures (input `inputs`; outputs `ids` `(batch, k)` and `scores`
    `(batch, k)`, best first, as `index.search` returns them):

    - `retrieve_exact`: the index's vectors stored as a variable, a matrix
      product and `tf.math.top_k`. Stock ops only.
    - `retrieve_scann` (with `use_scann=True`): the index's ScaNN searcher,
      rebuilt inside the graph from its serialised assets with
      `scann.scann_ops`; returns what `index.search` returns.
    - `serving_default`: `retrieve_scann` with `use_scann=True`, else
      `retrieve_exact`.
    - `embed`: output `embeddings`, the L2-normalised embedding.

    With `use_scann=False` stock TensorFlow Serving serves the model. With
    `use_scann=True` the server must be built with ScaNN's ops, and Python
    must `import scann` before `tf.saved_model.load`.

    Args:
        model: a built Keras model with one input returning `(batch, dim)`
            embeddings; the same model whose embeddings filled `index`.
        index: an `ExactIndex` or `ScaNNIndex` (a `ScaNNIndex` for
            `use_scann=True`). Queries are normalised as the index does.
        path: directory to write.
        k: number of neighbours returned, fixed at export time.
        use_scann: also export the ScaNN searcher and serve it by default.
        input_signature: the input `tf.TensorSpec` when `model` has no
            `inputs`.

    Raises:
        ValueError: if `index` is empty or not an index, `k` is not in
            `[1, len(index)]`, `use_scann=True` without a `ScaNNIndex`, or the
            model's input or output is unsupported.

    Example:

    ```python
    index = keras_dml.index.ScaNNIndex()
    index.add(embedder.predict(gallery_images), ids=gallery_ids)
    keras_dml.export.export_retrieval_model(embedder, index, "/tmp/retriever/1", k=10)
    served = tf.saved_model.load("/tmp/retriever/1").signatures["serving_default"]
    result = served(inputs=query_images)  # {"ids": (batch, 10), "scores": (batch, 10)}
    ```
    """
    from keras_dml.index.scann_index import ScaNNIndex

    if not isinstance(index, Index):
        raise ValueError(f"`index` must be a keras_dml.index index, got {type(index).__name__}.")
    if len(index) == 0:
        raise ValueError("`index` is empty: add embeddings before exporting.")
    if not is_integer(k) or not 1 <= k <= len(index):
        raise ValueError(f"`k` must be an integer in [1, {len(index)}], got {k!r}.")
    k = int(k)
    if use_scann and not isinstance(index, ScaNNIndex):
        raise ValueError(f"`use_scann=True` needs a ScaNNIndex, got {type(index).__name__}.")
    spec = _input_spec(model, input_signature)
    embed = _embedding_fn(model)
    module = tf.Module()
    module.index_embeddings = tf.Variable(index.embeddings, trainable=False)
    module.index_ids = tf.Variable(_ids_array(index), trainable=False)
    dot = index.distance == "dot"
    if not dot:
        vectors = index.embeddings
        module.index_squared_norms = tf.Variable(
            np.einsum("ij,ij->i", vectors, vectors), trainable=False
        )

    def queries_of(inputs):
        queries = _checked_finite(inputs, embed(inputs))
        return _normalized(queries) if index.normalize else queries

    @tf.function(input_signature=[spec], autograph=False)
    def embed_signature(inputs):
        return {"embeddings": _normalized(embed(inputs))}

    @tf.function(input_signature=[spec], autograph=False)
    def retrieve_exact(inputs):
        queries = queries_of(inputs)
        products = tf.matmul(queries, module.index_embeddings, transpose_b=True)
        if dot:
            scores, rows = tf.math.top_k(products, k=k)
        else:
            distances = (
                tf.reduce_sum(tf.square(queries), axis=1, keepdims=True)
                - 2.0 * products
                + module.index_squared_norms[tf.newaxis, :]
            )
            negated, rows = tf.math.top_k(-tf.maximum(distances, 0.0), k=k)
            scores = -negated
        return {"ids": tf.gather(module.index_ids, rows), "scores": scores}

    module.embed = embed_signature
    module.retrieve_exact = retrieve_exact
    signatures = {
        SERVING_SIGNATURE: retrieve_exact,
        EXACT_SIGNATURE: retrieve_exact,
        EMBED_SIGNATURE: embed_signature,
    }
    if use_scann:
        retrieve_scann = _scann_signature(module, index, spec, k, queries_of)
        module.retrieve_scann = retrieve_scann
        signatures[SERVING_SIGNATURE] = retrieve_scann
        signatures[SCANN_SIGNATURE] = retrieve_scann
    _save(module, path, signatures)


def _scann_signature(module: tf.Module, index, spec: tf.TensorSpec, k: int, queries_of):
    """Stores the ScaNN searcher's assets on `module` and returns its search function."""
    from scann.scann_ops.py import scann_ops

    assets = index.scann_assets()
    variables = {}
    for name, value in assets.items():
        if name == "dataset" and np.array_equal(value, index.embeddings):
            # ScaNN's rescoring copy is exactly the index's vectors: store them once.
            variables[name] = module.index_embeddings
        else:
            variables[name] = tf.Variable(value, trainable=False, shape=tf.TensorShape(None))
    module.scann_assets = variables
    pre_reorder, leaves = index.search_args(k)
    all_leaves = index.resolved_params(k)["num_leaves"] or -1

    def search(queries):
        # Without a shared_name the kernel builds the searcher on the first
        # call and keeps it, so later requests only search.
        handle = scann_ops.tensors_to_scann(
            variables["dataset"],
            variables["scann_config"],
            variables["serialized_partitioner"],
            variables["datapoint_to_token"],
            variables["ah_codebook"],
            variables["hashed_dataset"],
            variables["int8_dataset"],
            variables["int8_multipliers"],
            variables["dp_norms"],
        )
        parallel = tf.shape(queries)[0] > 1
        rows, scores = scann_ops.scann_search_batched(
            handle, queries, k, pre_reorder, leaves, parallel
        )
        # Queries whose searched leaves held fewer than k points come back
        # NaN-padded; search every leaf for those, as `ScaNNIndex.search` does.
        incomplete = tf.reduce_any(tf.math.is_nan(scores), axis=1)

        def search_all_leaves():
            full_rows, full_scores = scann_ops.scann_search_batched(
                handle, queries, k, pre_reorder, all_leaves, parallel
            )
            return (
                tf.where(incomplete[:, tf.newaxis], full_rows, rows),
                tf.where(incomplete[:, tf.newaxis], full_scores, scores),
            )

        return tf.cond(tf.reduce_any(incomplete), search_all_leaves, lambda: (rows, scores))

    @tf.function(input_signature=[spec], autograph=False)
    def retrieve_scann(inputs):
        queries = queries_of(inputs)
        # ScaNN's kernel fails on an empty batch; the answer is (0, k).
        rows, scores = tf.cond(
            tf.shape(queries)[0] > 0,
            lambda: search(queries),
            lambda: (tf.zeros((0, k), tf.int32), tf.zeros((0, k), tf.float32)),
        )
        return {"ids": tf.gather(module.index_ids, rows), "scores": scores}

    return retrieve_scann
