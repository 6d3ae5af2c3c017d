"""`export_run(run_dir, tflite)`: a TFLite file (and a fresh SavedModel) of a run's embedding."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from keras_dml.runs import rundir
from keras_dml.runs.data import batches, load_run_data
from keras_dml.runs.embed import load_keras_model, tflite_embed_fn
from keras_dml.runs.errors import RunError
from keras_dml.runs.rundir import RunDir
from keras_dml.runs.train import require_tensorflow

# `export_run`'s precisions, by the artefact name `evaluate_run(using=...)` takes.
TFLITE_ARTEFACTS = {"float32": "tflite", "float16": "tflite-float16", "int8": "tflite-int8"}


@dataclasses.dataclass
class ExportResult:
    """What `export_run` wrote, and how its TFLite embeddings agree with Keras's.

    Attributes:
        path: the TFLite file.
        saved_model: the embedding SavedModel, written again.
        artefact: the TFLite file's name for `evaluate_run(using=...)`.
        size_kib: the TFLite file's size.
        cosine: per test image of one batch, the cosine similarity of the
            TFLite and Keras embeddings.
    """

    path: str
    saved_model: str
    artefact: str
    size_kib: float
    cosine: np.ndarray


def export_run(run_dir: str, tflite: str = "float32") -> ExportResult:
    """Exports the run's embedding model as TFLite (`float32`, `float16`, `int8`) and SavedModel.

    int8 is calibrated on training images. Each file is written beside its
    final path and swapped in, then stamped with the run id.

    Raises:
        RunError: Keras not on TensorFlow; a missing, half-written or
            foreign `embedding.keras`.

    Example:

    >>> from keras_dml.runs import export_run
    >>> result = export_run("runs/digits", tflite="int8")  # doctest: +SKIP
    >>> result.artefact, result.cosine.mean() > 0.98  # doctest: +SKIP
    ('tflite-int8', True)
    """
    from keras_dml.export import export_embedding_model, export_tflite

    require_tensorflow("keras-dml export")
    run = RunDir(run_dir)
    config = run.train_config()
    run_id = config.run_id
    model_path = run.artefact("keras")
    if not os.path.exists(model_path):
        raise RunError(f"{model_path} does not exist; run keras-dml train again")
    rundir.check_stamp(model_path, config, "run keras-dml train again")
    embedder = rundir.load_artefact(model_path, load_keras_model)
    data = load_run_data(config)
    name = TFLITE_ARTEFACTS[tflite]
    path = run.artefact(name)
    quantization = None if tflite == "float32" else tflite

    def write_saved_model(target):
        export_embedding_model(embedder, target)
        if run_id:
            rundir.stamp(target, run_id)

    def write_tflite(target):
        export_tflite(embedder, target, quantization=quantization,
                      representative_data=data.representative if tflite == "int8" else None)

    rundir.replace_file(run.saved_model, write_saved_model)
    rundir.replace_file(path, write_tflite)
    if run_id:
        rundir.stamp(path, run_id)
    sample = next(iter(batches(data.unseen_x)))
    reference = np.asarray(embedder.predict_on_batch(sample))
    exported = tflite_embed_fn(path)(sample)
    cosine = np.sum(reference * exported, axis=1) / np.maximum(
        np.linalg.norm(reference, axis=1) * np.linalg.norm(exported, axis=1), 1e-12)
    return ExportResult(path=path, saved_model=run.saved_model, artefact=name,
                        size_kib=os.path.getsize(path) / 1024, cosine=cosine)
