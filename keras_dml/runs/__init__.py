"""Runs: train an embedding into a run directory, then evaluate, search and export it.

The journey of the `keras-dml` command line, as library calls that print
nothing:

    from keras_dml.runs import TrainConfig, train_run, evaluate_run

    result = train_run(TrainConfig(dataset="digits", epochs=1), "runs/digits")
    print(result.metrics["unseen"]["map_at_r"], result.run.metrics)
    evaluate_run("runs/digits", using="tflite")

- `config`: `TrainConfig`, the typed options of a run (its `config.json`).
- `rundir`: `RunDir`, the one table of run-file names; run ids; atomic writes.
- `data`, `build`: the run's zero-shot split and its models.
- `train`: `train_run(config, out) -> TrainResult`.
- `evaluate`, `search`, `export`: `evaluate_run`, `search_run`, `export_run`.
- `metrics`, `report`: scores, the metrics table, plots, the artefact list.

Names are imported on first use: `keras_dml.runs.config` and
`keras_dml.runs.rundir` import neither Keras nor TensorFlow, so that the
command line checks its arguments before loading them.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "TrainConfig": "config",
    "RunDir": "rundir",
    "RunError": "errors",
    "RunData": "data",
    "load_run_data": "data",
    "build_training_model": "build",
    "TrainResult": "train",
    "train_run": "train",
    "EvaluateResult": "evaluate",
    "evaluate_run": "evaluate",
    "SearchResult": "search",
    "search_run": "search",
    "ExportResult": "export",
    "export_run": "export",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"keras_dml.runs.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module 'keras_dml.runs' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
