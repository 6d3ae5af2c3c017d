"""What a run shows: its plots, the TensorBoard projector, the list of its artefacts.

`write_plots` draws the unseen classes' embeddings (2-D projection,
retrieval examples, distance histograms) and the training curves into a run
directory; `format_artefacts` says where each file of a run is.
"""

from __future__ import annotations

import json
import os

import numpy as np

from keras_dml.runs import rundir
from keras_dml.runs.rundir import RunDir

PROJECTOR_MAX_POINTS = 5000

# What `format_artefacts` lists, by role of `rundir.RUN_FILES`.
ARTEFACTS = (
    ("model", "training model (.keras)"),
    ("embedding", "embedding model (.keras)"),
    ("saved_model", "embedding SavedModel (serving_default)"),
    ("retrieval_model", "retrieval SavedModel (embed + top-k)"),
    ("tflite", "TFLite float32"),
    ("tflite_float16", "TFLite float16"),
    ("tflite_int8", "TFLite int8"),
    ("index", "ScaNN index of the unseen classes"),
    ("metrics", "metrics (P@1, R@K, R-Precision, MAP@R, NMI)"),
    ("history", "training history"),
    ("embeddings_2d", "plot: 2-D projection of unseen embeddings"),
    ("retrieval_plot", "plot: retrieval examples"),
    ("distances_plot", "plot: positive vs negative distances"),
    ("training_curves", "plot: training curves"),
    ("projector", "TensorBoard projector (tensorboard --logdir)"),
)


def format_artefacts(run_dir: str) -> str:
    """Where each artefact of the run is, one per line, existing ones only."""
    run = RunDir(run_dir)
    lines = [f"artefacts in {run_dir}:"]
    names = [rundir.RUN_FILES[role] for role, _ in ARTEFACTS]
    extra = sorted(f for f in os.listdir(run_dir)
                   if f.startswith(("search_", "metrics_")) and f not in names)
    listed = [(run.file(role), what) for role, what in ARTEFACTS]
    listed += [(os.path.join(run_dir, f), "search strip" if f.startswith("search_")
                else "metrics of another artefact") for f in extra]
    for path, what in listed:
        if os.path.exists(path):
            lines.append(f"  {what:<46} {path}")
    return "\n".join(lines)


def write_plots(run_dir, embeddings, labels, thumbnails, history, projection) -> None:
    """Writes the run's PNG plots and the TensorBoard projector files."""
    from keras_dml import plots
    from keras_dml.evaluation import nearest_neighbors
    from keras_dml.projector import export_embedding_projector

    run = RunDir(run_dir)
    plots.plot_embeddings_2d(embeddings, labels, method=projection,
                             title="unseen test classes (trained embeddings)",
                             path=run.embeddings_2d)
    plots.plot_distance_histograms(embeddings, labels, title="unseen test classes",
                                   path=run.distances_plot)
    k = min(5, len(labels) - 1)
    if k >= 1:
        queries = np.linspace(0, len(labels) - 1, num=min(4, len(labels)), dtype=int)
        neighbors, distances = nearest_neighbors(embeddings, k=k)
        plots.plot_retrieval(thumbnails[queries], thumbnails[neighbors[queries]],
                             labels[queries], labels[neighbors[queries]],
                             scores=distances[queries], title="unseen classes: query, top-k "
                             "(cosine distance)", path=run.retrieval_plot)
    if history:
        plots.plot_training_curves(
            history, title="training (val_: held-out images of the training classes)",
            path=run.training_curves)
    keep = np.arange(len(labels))
    if len(keep) > PROJECTOR_MAX_POINTS:
        keep = np.sort(np.random.default_rng(0).choice(keep, PROJECTOR_MAX_POINTS, replace=False))
    rundir.replace_file(
        run.projector,
        lambda staging: export_embedding_projector(
            staging, embeddings[keep], labels=labels[keep], images=thumbnails[keep]),
    )


def write_json(path: str, value) -> None:
    """Writes `value` as JSON; an interruption leaves the old file or the new one, whole."""
    from keras_dml._atomic import write_text

    write_text(path, json.dumps(value, indent=2, sort_keys=False) + "\n")
