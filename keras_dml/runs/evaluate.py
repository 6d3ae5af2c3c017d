"""`evaluate_run(run_dir, using)`: re-embed a run's test data with one artefact and score it."""

from __future__ import annotations

import dataclasses

from keras_dml.runs import report, rundir
from keras_dml.runs.config import TrainConfig
from keras_dml.runs.data import load_run_data
from keras_dml.runs.embed import embed_all, embed_fn
from keras_dml.runs.metrics import protocol, score
from keras_dml.runs.rundir import RunDir


@dataclasses.dataclass
class EvaluateResult:
    """What `evaluate_run` measured: the metrics it wrote (and where), the run's config."""

    metrics: dict
    path: str
    config: TrainConfig


def evaluate_run(run_dir: str, using: str = "keras", projection: str = "pca") -> EvaluateResult:
    """Embeds the run's seen and unseen splits with one artefact; writes its metrics and plots.

    The metrics go to `metrics.json` for the Keras model and to
    `metrics_<using>.json` for another artefact; the baselines and feature
    scores of the run's training are carried over.

    Args:
        run_dir: a run directory written by `train_run`.
        using: the artefact that embeds: `keras`, `saved_model`, `tflite`,
            `tflite-float16` or `tflite-int8`.
        projection: 2-D projection of the embedding plot (`pca`, `umap`, `auto`).

    Raises:
        RunError: a missing, half-written or foreign file (the message names it).

    Example:

    >>> from keras_dml.runs import evaluate_run
    >>> result = evaluate_run("runs/digits", using="tflite")  # doctest: +SKIP
    >>> result.path  # doctest: +SKIP
    'runs/digits/metrics_tflite.json'
    """
    run = RunDir(run_dir)
    config = run.train_config()
    embed = embed_fn(run_dir, using, config)
    data = load_run_data(config)
    seen = embed_all(embed, data.seen_x) if len(data.seen_y) else None
    unseen = embed_all(embed, data.unseen_x)
    previous = rundir.read_metrics(run.metrics, config)  # {} if absent or from another run
    metrics = {
        **{k: previous[k] for k in ("dataset", "loss", "s2sd") if k in previous},
        "protocol": protocol(data),
        "sizes": {"seen": int(len(data.seen_y)), "unseen": int(len(data.unseen_y))},
        "seen": score(seen, data.seen_y),
        "unseen": score(unseen, data.unseen_y),
        "baselines": previous.get("baselines", {}),
        **({"features": previous["features"]} if "features" in previous else {}),
        "artefact": using,
        **({"run_id": config.run_id} if config.run_id is not None else {}),
    }
    path = run.metrics_for(using)
    report.write_json(path, metrics)
    history = rundir.read_metrics(run.history, {}) or None
    report.write_plots(run_dir, unseen, data.unseen_y, data.unseen_thumbnails, history,
                       projection)
    return EvaluateResult(metrics=metrics, path=path, config=config)
