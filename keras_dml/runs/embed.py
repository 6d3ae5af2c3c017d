"""Embedding with any artefact of a run: the Keras model, the SavedModel, a TFLite file.

`embed_fn(run_dir, using)` checks that the artefact belongs to the run (its
run id) and returns a function from an input batch to embeddings;
`embed_all` applies one to a whole split.
"""

from __future__ import annotations

import os

import keras
import numpy as np

from keras_dml.runs import rundir
from keras_dml.runs.config import TrainConfig, as_train_config
from keras_dml.runs.data import batches
from keras_dml.runs.errors import RunError
from keras_dml.runs.rundir import RunDir


def tflite_embed_fn(path: str):
    """A function mapping an input batch to the outputs of the TFLite model at `path`."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    source = interpreter.get_input_details()[0]
    target = interpreter.get_output_details()[0]
    shape = [None]

    def embed(batch):
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if shape[0] != batch.shape:
            interpreter.resize_tensor_input(source["index"], list(batch.shape))
            interpreter.allocate_tensors()
            shape[0] = batch.shape
        interpreter.set_tensor(source["index"], batch)
        interpreter.invoke()
        return np.array(interpreter.get_tensor(target["index"]))

    return embed


def load_keras_model(path: str) -> keras.Model:
    """A saved keras-dml model, uncompiled (its losses, heads and layers registered)."""
    import keras_dml.layers  # noqa: F401  (registers the layers the model uses)

    return keras.saving.load_model(path, compile=False)


def embed_fn(run_dir: str, using: str = "keras", config: TrainConfig | dict | None = None):
    """A function mapping an input batch to embeddings with one artefact of the run.

    Args:
        run_dir: a run directory.
        using: `keras`, `saved_model`, `tflite`, `tflite-float16` or
            `tflite-int8` (the keys of `rundir.MODEL_FILES`).
        config: the run's config (default: its `config.json`).

    Raises:
        RunError: the artefact is missing, from another run (its run id is
            not `config`'s) or unreadable; the message names the command
            that writes it again.
    """
    config = RunDir(run_dir).train_config() if config is None else as_train_config(config)
    path = RunDir(run_dir).artefact(using)
    if using.startswith("tflite-") or using == "tflite":
        precision = {"tflite": "float32", "tflite-float16": "float16", "tflite-int8": "int8"}
        fix = f"run: keras-dml export {run_dir} --tflite {precision[using]}"
    elif using == "saved_model":
        fix = f"run: keras-dml export {run_dir}"
    else:
        fix = "run keras-dml train again"
    if not os.path.exists(path):
        raise RunError(f"{path} does not exist; {fix}")
    rundir.check_stamp(path, config, fix)
    if using == "keras":
        model = rundir.load_artefact(path, load_keras_model, fix)
        return lambda batch: np.asarray(model.predict_on_batch(batch))
    if using == "saved_model":
        import tensorflow as tf

        def load(path):
            return tf.saved_model.load(path).signatures["serving_default"]

        serve = rundir.load_artefact(path, load, fix)
        return lambda batch: serve(inputs=tf.constant(batch, tf.float32))["embeddings"].numpy()
    return rundir.load_artefact(path, tflite_embed_fn, fix)


def embed_all(embed, x):
    """Embeddings of every input of `x` (array or dataset of batches).

    `embed` maps a batch to an array, or to a tuple of arrays (then so is the result).
    """
    chunks = [embed(batch) for batch in batches(x)]
    if not chunks:
        return np.zeros((0, 0), "float32")
    if isinstance(chunks[0], tuple):
        return tuple(np.concatenate(parts).astype("float32") for parts in zip(*chunks, strict=True))
    return np.concatenate(chunks).astype("float32")
