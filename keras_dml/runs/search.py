"""`search_run(run_dir, query_index)`: neighbours of a test image in a run's index, drawn."""

from __future__ import annotations

import dataclasses

import numpy as np

from keras_dml.runs import rundir
from keras_dml.runs.errors import RunError
from keras_dml.runs.rundir import RunDir


@dataclasses.dataclass
class SearchResult:
    """The `k` nearest test images of test image `query_index`, the query itself left out.

    Attributes:
        query_index: the query's row of the test set.
        query_label: its label.
        ids: the neighbours' rows, nearest first.
        labels: their labels.
        scores: their cosine similarities to the query.
        index_size: items in the run's index (the test set).
        png: where the strip of query and neighbours was saved.
    """

    query_index: int
    query_label: int
    ids: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    index_size: int
    png: str

    @property
    def k(self) -> int:
        return len(self.ids)

    @property
    def correct(self) -> int:
        """Neighbours of the query's class."""
        return int(np.sum(self.labels == self.query_label))


def search_run(run_dir: str, query_index: int, k: int = 5, png: str | None = None
               ) -> SearchResult:
    """Searches the run's ScaNN index of the unseen classes with test image `query_index`.

    Saves a PNG strip of the query and its neighbours at `png` (default
    `search_<query_index>.png` in the run directory).

    Raises:
        RunError: a missing, half-written or foreign index, labels or
            thumbnails, or `query_index` out of range.

    Example:

    >>> from keras_dml.runs import search_run
    >>> result = search_run("runs/digits", query_index=0, k=3)  # doctest: +SKIP
    >>> result.correct, result.png  # doctest: +SKIP
    (3, 'runs/digits/search_0.png')
    """
    from keras_dml import plots
    from keras_dml.index import Index

    run = RunDir(run_dir)
    config = run.train_config()
    index_dir = run.index
    index = rundir.load_artefact(index_dir, Index.load)
    rundir.check_index_stamp(index_dir, config)

    def load_npy(path):
        return np.load(path, allow_pickle=False)

    labels = rundir.load_artefact(run.test_labels, load_npy)
    thumbnails = rundir.load_artefact(run.test_thumbnails, load_npy)
    indexed = np.array([(item or {}).get("label", -1) for item in index.metadata or []])
    ids = index.ids
    if (len(labels) != len(index) or len(thumbnails) != len(index)
            or ids.dtype.kind != "i" or (len(ids) and (ids.min() < 0 or ids.max() >= len(labels)))
            or (len(indexed) and not np.array_equal(indexed, labels[ids]))):
        raise RunError(f"{run.test_labels} and {rundir.RUN_FILES['test_thumbnails']} "
                       f"({len(labels)} and {len(thumbnails)} rows) do not match the index "
                       f"{index_dir} ({len(index)} items): they come from different runs; "
                       "run keras-dml train again")
    n = query_index
    if n >= len(index):
        raise RunError(f"--query-index {n} is out of range: the test set has {len(index)} "
                       f"images (0-{len(index) - 1})")
    k = min(k, len(index) - 1)
    query_row = int(np.flatnonzero(index.ids == n)[0])
    ids, scores = index.search(index.embeddings[query_row], k=k + 1)
    keep = ids != n  # the query is in the index: drop it from its own results
    ids, scores = ids[keep][:k], scores[keep][:k]
    result = SearchResult(query_index=n, query_label=labels[n], ids=ids, labels=labels[ids],
                          scores=scores, index_size=len(index), png=png or run.search_png(n))
    plots.plot_retrieval(thumbnails[n][None], thumbnails[ids][None], [result.query_label],
                         labels[ids][None], scores[None],
                         title=f"test image {n}: {result.correct}/{k} neighbours of its class",
                         path=result.png)
    return result
