"""Plots for metric learning: 2-D embedding maps, retrieval strips, distance histograms, curves.

Every function returns a `matplotlib.figure.Figure` and, given `path`, saves
it as PNG. Figures are built without `pyplot`: nothing global changes (your
notebook's backend stays as it is), no window opens, and they render with
the Agg backend on a headless machine. Colours come from viridis, classes
spread evenly over it.

Example:

```python
from keras_dml import plots

embeddings = embedder.predict(x_test)
plots.plot_embeddings_2d(embeddings, y_test, path="embeddings.png")
plots.plot_distance_histograms(embeddings, y_test, path="distances.png")
plots.plot_training_curves(history, path="curves.png")
```
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PROJECTIONS = ("pca", "umap", "auto")
HISTOGRAM_DISTANCES = ("cosine", "euclidean", "squared_euclidean")


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(figure, path: str | None) -> None:
    if path is None:
        return
    # Through a temporary sibling: an interruption leaves the old plot or the new one.
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp-{os.getpid()}{ext or '.png'}"
    try:
        figure.savefig(tmp, dpi=120, format=ext[1:] or None)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def _as_matrix(x, arg: str) -> np.ndarray:
    x = np.asarray(x, dtype="float64")
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"`{arg}` must have shape (n, dim) with n > 0, got {x.shape}.")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"`{arg}` contains NaN or Inf.")
    return x


def _as_labels(labels, n: int) -> np.ndarray:
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != n:
        raise ValueError(f"`labels` has {labels.shape[0]} values for {n} embeddings.")
    return labels


def _class_colors(n_classes: int):
    from matplotlib import colormaps

    viridis = colormaps["viridis"]
    if n_classes == 1:
        return [viridis(0.5)]
    return [viridis(i / (n_classes - 1)) for i in range(n_classes)]


def project_2d(embeddings, method: str = "pca", seed: int = 0) -> np.ndarray:
    """Projects `(n, dim)` embeddings to `(n, 2)` with PCA or, if installed, UMAP.

    Args:
        embeddings: `(n, dim)` array.
        method: `"pca"` (exact, deterministic, fast), `"umap"` (needs the
            `umap-learn` package; shows clusters better, slower), or `"auto"`
            (UMAP when installed, else PCA).
        seed: random state of UMAP.

    Returns:
        The `(n, 2)` coordinates; a 1-D embedding gets a zero second axis.

    Raises:
        ValueError: for an unknown method, bad shapes, or `"umap"` without
            `umap-learn` installed.
    """
    if method not in PROJECTIONS:
        raise ValueError(f"`method` must be one of {PROJECTIONS}, got {method!r}.")
    x = _as_matrix(embeddings, "embeddings")
    if method in ("umap", "auto"):
        try:
            import umap
        except ImportError:
            if method == "umap":
                raise ValueError(
                    "method='umap' needs the umap-learn package (pip install umap-learn); "
                    "use method='pca'."
                ) from None
        else:
            if x.shape[0] > 3:
                reducer = umap.UMAP(n_components=2, random_state=seed)
                return np.asarray(reducer.fit_transform(x), dtype="float64")
    centered = x - x.mean(axis=0, keepdims=True)
    if x.shape[1] == 1:
        return np.concatenate([centered, np.zeros_like(centered)], axis=1)
    # The top two right singular vectors are the first two principal axes.
    _, _, components = np.linalg.svd(centered, full_matrices=False)
    projected = centered @ components[:2].T
    # Fix each axis's sign, so that the picture does not flip between runs.
    signs = np.sign(projected[np.argmax(np.abs(projected), axis=0), range(2)])
    return projected * np.where(signs == 0, 1.0, signs)


def plot_embeddings_2d(
    embeddings,
    labels,
    method: str = "pca",
    title: str | None = None,
    class_names: Mapping[Any, str] | Sequence[str] | None = None,
    max_points: int = 5000,
    seed: int = 0,
    path: str | None = None,
):
    """Draws the embeddings in 2-D, one viridis colour per class, to see whether classes separate.

    Embeddings that are already 2-D are drawn as they are; others are
    projected with `project_2d(method)`.

    Args:
        embeddings: `(n, dim)` array.
        labels: `(n,)` class labels.
        method: `"pca"`, `"umap"` or `"auto"` (see `project_2d`).
        title: figure title.
        class_names: names shown in the legend, by label (a mapping, or a
            sequence indexed by integer label).
        max_points: draw a random subset of at most this many points.
        seed: seed of the subset and of UMAP.
        path: save the figure there as PNG.

    Returns:
        The `matplotlib.figure.Figure`.

    Example:

    >>> import numpy as np
    >>> from keras_dml.plots import plot_embeddings_2d
    >>> x = np.random.default_rng(0).normal(size=(100, 8))
    >>> figure = plot_embeddings_2d(x, np.arange(100) % 4, title="test embeddings")
    >>> len(figure.axes)
    1
    """
    x = _as_matrix(embeddings, "embeddings")
    labels = _as_labels(labels, x.shape[0])
    if x.shape[0] > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(x.shape[0], max_points, replace=False))
        x, labels = x[keep], labels[keep]
    if x.shape[1] == 2:
        points, axis_names = x, ("dim 1", "dim 2")
    else:
        points = project_2d(x, method=method, seed=seed)
        used = "umap" if method == "umap" else "pca"
        if method == "auto":
            try:
                import umap  # noqa: F401

                used = "umap"
            except ImportError:
                used = "pca"
        axis_names = (f"{used.upper()} 1", f"{used.upper()} 2")
    classes = np.unique(labels)
    colors = _class_colors(len(classes))
    figure = _figure(6.5, 5.5)
    ax = figure.add_subplot()
    for cls, color in zip(classes, colors, strict=True):
        mask = labels == cls
        if class_names is None:
            name = str(cls)
        elif isinstance(class_names, Mapping):
            name = str(class_names.get(cls, cls))
        else:
            name = str(class_names[int(cls)])
        ax.scatter(points[mask, 0], points[mask, 1], s=8, color=color, alpha=0.8, label=name,
                   linewidths=0)
    if len(classes) <= 20:
        ax.legend(title="class", markerscale=2, fontsize="small", loc="best", frameon=False)
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_title(title or f"{x.shape[0]} embeddings, {len(classes)} classes")
    _save(figure, path)
    return figure


def _image_for_display(image: np.ndarray):
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        return image, "gray_r"
    from keras_dml.projector import to_uint8_images

    return to_uint8_images(image[None])[0], None


def plot_retrieval(
    query_images,
    neighbor_images,
    query_labels=None,
    neighbor_labels=None,
    scores=None,
    title: str | None = None,
    path: str | None = None,
):
    """Draws each query beside its top-k neighbours, framing right ones in yellow, wrong in purple.

    Args:
        query_images: `(q, h, w)` or `(q, h, w, c)` images; for one query
            pass `image[None]`.
        neighbor_images: `(q, k, h, w[, c])` images, nearest first.
        query_labels: optional `(q,)` labels.
        neighbor_labels: optional `(q, k)` labels; with `query_labels`, frames
            mark correct (same label) and wrong neighbours.
        scores: optional `(q, k)` scores or distances printed under each
            neighbour.
        title: figure title.
        path: save the figure there as PNG.

    Returns:
        The `matplotlib.figure.Figure`, one row per query.

    Example:

    ```python
    ids, _ = index.search(embedder.predict(x_query), k=5)
    plot_retrieval(x_query, x_gallery[ids], y_query, y_gallery[ids], path="retrieval.png")
    ```
    """
    queries = np.asarray(query_images)
    neighbors = np.asarray(neighbor_images)
    if neighbors.ndim != queries.ndim + 1 or queries.ndim not in (3, 4):
        raise ValueError(
            "`query_images` must be (q, h, w[, c]) and `neighbor_images` (q, k, h, w[, c]); got "
            f"shapes {queries.shape} and {neighbors.shape}."
        )
    n_queries, k = neighbors.shape[:2]
    if queries.shape[0] != n_queries:
        raise ValueError(f"{queries.shape[0]} query images for {n_queries} rows of neighbours.")
    query_labels = None if query_labels is None else np.asarray(query_labels).reshape(-1)
    neighbor_labels = None if neighbor_labels is None else np.asarray(neighbor_labels)
    scores = None if scores is None else np.asarray(scores)
    right, wrong = _class_colors(3)[2], _class_colors(3)[0]
    figure = _figure(1.3 * (k + 1), 1.8 * n_queries + (0.4 if title else 0.0))
    axes = figure.subplots(n_queries, k + 1, squeeze=False)
    for row in range(n_queries):
        cells = [(queries[row], None)] + [(neighbors[row, j], j) for j in range(k)]
        for col, (image, j) in enumerate(cells):
            ax = axes[row, col]
            shown, cmap = _image_for_display(image)
            ax.imshow(shown, cmap=cmap, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            caption = []
            if j is None:
                caption.append("query")
                if query_labels is not None:
                    caption.append(f"label {query_labels[row]}")
                for spine in ax.spines.values():
                    spine.set_linewidth(2.5)
            else:
                caption.append(f"#{j + 1}")
                if neighbor_labels is not None:
                    caption.append(f"label {neighbor_labels[row, j]}")
                if scores is not None:
                    caption.append(f"{scores[row, j]:.3f}")
                if query_labels is not None and neighbor_labels is not None:
                    color = right if neighbor_labels[row, j] == query_labels[row] else wrong
                    for spine in ax.spines.values():
                        spine.set_color(color)
                        spine.set_linewidth(3)
            ax.set_xlabel("\n".join(caption), fontsize="small")
    if title:
        figure.suptitle(title)
    _save(figure, path)
    return figure


def pair_distances(
    embeddings, labels, distance: str = "cosine", max_pairs: int = 200_000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Distances of positive (same-class) and negative pairs, all pairs or a random sample.

    Args:
        embeddings: `(n, dim)` array.
        labels: `(n,)` class labels.
        distance: `"cosine"` (`1 - cos`), `"euclidean"` or `"squared_euclidean"`.
        max_pairs: above `n (n - 1) / 2` pairs, draw this many pairs at random.
        seed: seed of the sample.

    Returns:
        `(positive_distances, negative_distances)`, 1-D arrays.
    """
    if distance not in HISTOGRAM_DISTANCES:
        raise ValueError(f"`distance` must be one of {HISTOGRAM_DISTANCES}, got {distance!r}.")
    x = _as_matrix(embeddings, "embeddings")
    labels = _as_labels(labels, x.shape[0])
    n = x.shape[0]
    if n < 2:
        raise ValueError("At least two embeddings are needed to form a pair.")
    if distance == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if n * (n - 1) // 2 <= max_pairs:
        first, second = np.triu_indices(n, k=1)
    else:
        rng = np.random.default_rng(seed)
        first = rng.integers(0, n, size=max_pairs)
        second = (first + rng.integers(1, n, size=max_pairs)) % n  # never the same point
    a, b = x[first], x[second]
    if distance == "cosine":
        values = 1.0 - np.einsum("ij,ij->i", a, b)
    else:
        values = np.einsum("ij,ij->i", a - b, a - b)
        if distance == "euclidean":
            values = np.sqrt(values)
    same = labels[first] == labels[second]
    return values[same], values[~same]


def _separation_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a random positive pair is closer than a random negative pair); ties count half."""
    values = np.concatenate([positive, negative])
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), "float64")
    sorted_values = values[order]
    # Average ranks over ties (the Mann-Whitney U statistic).
    _, start, counts = np.unique(sorted_values, return_index=True, return_counts=True)
    average = start + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(average, counts)
    positive_rank_sum = ranks[: len(positive)].sum()
    u = positive_rank_sum - len(positive) * (len(positive) + 1) / 2.0
    return float(1.0 - u / (len(positive) * len(negative)))


def plot_distance_histograms(
    embeddings,
    labels,
    distance: str = "cosine",
    bins: int = 50,
    max_pairs: int = 200_000,
    title: str | None = None,
    seed: int = 0,
    path: str | None = None,
):
    """Overlays the distance histograms of same-class and different-class pairs to show overlap.

    The legend gives the separation AUC: the probability that a random
    positive pair is closer than a random negative pair (1 = perfectly
    separable by one threshold, 0.5 = chance).

    Args:
        embeddings: `(n, dim)` array.
        labels: `(n,)` class labels.
        distance: `"cosine"` (`1 - cos`), `"euclidean"` or `"squared_euclidean"`.
        bins: histogram bins.
        max_pairs: sample at most this many pairs (see `pair_distances`).
        title: figure title.
        seed: seed of the pair sample.
        path: save the figure there as PNG.

    Returns:
        The `matplotlib.figure.Figure`.
    """
    positive, negative = pair_distances(embeddings, labels, distance, max_pairs, seed)
    figure = _figure(6.5, 4.0)
    ax = figure.add_subplot()
    pos_color, neg_color = _class_colors(5)[3], _class_colors(5)[0]
    edges = np.histogram_bin_edges(np.concatenate([positive, negative]), bins=bins)
    if positive.size:
        ax.hist(positive, bins=edges, density=True, alpha=0.6, color=pos_color,
                label=f"same class ({positive.size} pairs)")
    if negative.size:
        ax.hist(negative, bins=edges, density=True, alpha=0.6, color=neg_color,
                label=f"different class ({negative.size} pairs)")
    if positive.size and negative.size:
        auc = _separation_auc(positive, negative)
        ax.plot([], [], " ", label=f"separation AUC {auc:.3f}")
    ax.set_xlabel(f"{distance} distance")
    ax.set_ylabel("density")
    ax.legend(frameon=False, fontsize="small")
    ax.set_title(title or "positive vs negative pair distances")
    _save(figure, path)
    return figure


# Recall@K for K > 1 is left out: it crowds the panel and rarely moves on its own.
_RETRIEVAL_KEYS = ("precision_at_1", "r_precision", "map_at_r", "nmi")


def plot_training_curves(history, title: str | None = None, path: str | None = None):
    """Plots the losses and the retrieval metrics logged during `fit`, one panel each.

    Args:
        history: the `keras.callbacks.History` returned by `fit`, or its
            `.history` dict (`{name: [value per epoch]}`). A metric logged on
            fewer epochs (e.g. `RetrievalMetricsCallback(every_n_epochs=2)`)
            is spread evenly over the epochs, ending at the last.
        title: figure title.
        path: save the figure there as PNG.

    Returns:
        The `matplotlib.figure.Figure`.
    """
    from matplotlib.ticker import MaxNLocator

    logs = getattr(history, "history", history)
    if not isinstance(logs, Mapping) or not logs:
        raise ValueError("`history` must be a keras History or a non-empty {name: values} dict.")
    series = {name: np.asarray(values, dtype="float64").reshape(-1) for name, values in logs.items()
              if np.size(values)}
    epochs = max(len(v) for v in series.values())
    losses = {n: v for n, v in series.items() if n.endswith("loss") or n == "distillation"}
    retrieval = {n: v for n, v in series.items()
                 if n not in losses and any(key in n for key in _RETRIEVAL_KEYS)}
    panels = [("loss", losses)] + ([("retrieval metrics", retrieval)] if retrieval else [])
    figure = _figure(5.0 * len(panels), 3.8)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, curves) in zip(axes, panels, strict=True):
        colors = _class_colors(max(len(curves), 1))
        for (label, values), color in zip(sorted(curves.items()), colors, strict=False):
            x = np.linspace(epochs / len(values), epochs, len(values))
            ax.plot(x, values, marker="o" if len(values) < 30 else None, markersize=3,
                    color=color, label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(name)
        if curves:
            ax.legend(frameon=False, fontsize="small")
    if title:
        figure.suptitle(title)
    _save(figure, path)
    return figure
