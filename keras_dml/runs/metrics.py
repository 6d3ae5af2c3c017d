"""The scores of a run: retrieval metrics of each split, baselines, and their text report.

A run is scored on two splits, each on its own, leave-one-out (queries =
references), with cosine similarity: held-out images of the training
classes ("seen") and the classes never trained on ("unseen"). Raw pixels and
the untrained network are scored beside the trained embedding, so that the
table says what training added.
"""

from __future__ import annotations

import numpy as np

from keras_dml.runs.data import RunData, batches

K_VALUES = (1, 2, 4, 8)
METRIC_ROWS = ("precision_at_1", "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8",
               "r_precision", "map_at_r", "nmi")
# Above this many input values per image, raw pixels are not scored (memory).
RAW_PIXEL_MAX_DIM = 4096


def score(embeddings, labels) -> dict[str, float] | None:
    """Retrieval metrics (P@1, R@K, R-Precision, MAP@R, NMI) of one split; None below 2 items."""
    from keras_dml.evaluation import retrieval_metrics

    if embeddings is None or len(labels) < 2:
        return None
    return retrieval_metrics(embeddings, labels, k=K_VALUES, distance="cosine", seed=0)


def protocol(data: RunData) -> str:
    """One sentence saying what the splits are and how they are scored."""
    last = data.num_train_classes - 1
    return (f"trained on classes 0-{last}; 'seen' = held-out images of those classes, "
            f"'unseen' = the other classes, never trained on; each split scored on its own, "
            "leave-one-out (queries = references), cosine")


def raw_pixels(x) -> np.ndarray | None:
    """The inputs flattened, as a baseline embedding; None above `RAW_PIXEL_MAX_DIM` values."""
    sample = x[:1] if isinstance(x, np.ndarray) else None
    if sample is not None and int(np.prod(sample.shape[1:])) > RAW_PIXEL_MAX_DIM:
        return None
    chunks = []
    for batch in batches(x):
        if int(np.prod(batch.shape[1:])) > RAW_PIXEL_MAX_DIM:
            return None
        chunks.append(batch.reshape(len(batch), -1))
    return np.concatenate(chunks).astype("float32") if chunks else None


def format_metrics_table(metrics: dict) -> str:
    """The metrics of a run as a text table: seen and unseen classes, baselines beside trained."""
    columns = []
    for split in ("seen", "unseen"):
        for source, label in (("raw_pixels", "raw px"), ("untrained", "untrained"),
                              ("trained", "trained"), ("features", "features")):
            if source == "trained":
                values = metrics.get(split)
            elif source == "features":
                values = (metrics.get("features") or {}).get(split)
            else:
                values = metrics.get("baselines", {}).get(source, {}).get(split)
            if values:
                columns.append((split, label, values))
    if not columns:
        return "(no metrics)"
    header_groups = {"seen": "held-out images, seen classes", "unseen": "unseen classes"}
    widths = 11
    lines = []
    groups = []
    for split in ("seen", "unseen"):
        n = sum(1 for c in columns if c[0] == split)
        if n:
            groups.append(f"{header_groups[split]:^{n * widths}}")
    lines.append(f"{'':<16}" + " | ".join(groups))
    parts = []
    for split in ("seen", "unseen"):
        cells = "".join(f"{c[1]:>{widths}}" for c in columns if c[0] == split)
        if cells:
            parts.append(cells)
    lines.append(f"{'metric':<16}" + " | ".join(parts))
    for row in METRIC_ROWS:
        parts = []
        for split in ("seen", "unseen"):
            cells = "".join(f"{c[2].get(row, float('nan')):>{widths}.3f}" for c in columns
                            if c[0] == split)
            if cells:
                parts.append(cells)
        lines.append(f"{row:<16}" + " | ".join(parts))
    return "\n".join(lines)


def transfer_note(metrics: dict) -> str | None:
    """A note when the trained embedding retrieves unseen classes worse than a baseline.

    If the trained backbone's features (column "features") beat that baseline,
    the note says so: index them rather than the embedding for such classes.
    """
    trained = (metrics.get("unseen") or {}).get("map_at_r")
    if trained is None or not np.isfinite(trained):
        return None
    features = ((metrics.get("features") or {}).get("unseen") or {}).get("map_at_r")
    for name, label in (("raw_pixels", "raw pixels"), ("untrained", "the untrained network")):
        baseline = (metrics.get("baselines", {}).get(name) or {}).get("unseen") or {}
        value = baseline.get("map_at_r")
        if value is not None and np.isfinite(value) and trained < value:
            note = (f"note: on the unseen classes the trained embedding retrieves worse than "
                    f"{label} (MAP@R {trained:.3f} vs {value:.3f}); it is specialised to the "
                    "training classes.")
            if features is not None and np.isfinite(features) and features > value:
                note += (f" The trained backbone's features before the embedding layer do "
                         f"transfer (MAP@R {features:.3f}): index those for classes unlike the "
                         "training ones (README: \"Which layer to index\").")
            else:
                note += " What it learnt from the training classes does not transfer to them."
            return note
    return None
