"""Brute-force nearest-neighbour search in NumPy: the exact reference for every ANN index."""

from __future__ import annotations

import numpy as np

from keras_dml.index.base import Index

# Upper bound on the (query chunk x index size) score block, in float32
# elements (64 MiB): large indexes are searched a few queries at a time.
_BLOCK_ELEMENTS = 1 << 24


def top_k_rows(scores: np.ndarray, k: int, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    """Returns the `k` best columns of each row of `scores`, best first.

    Ties are broken by the lower column index, as `tf.math.top_k` does.

    Args:
        scores: `(num_queries, n)` float array.
        k: number of columns to keep, `1 <= k <= n`.
        largest: keep the largest scores (similarities) instead of the
            smallest (distances).

    Returns:
        `(columns, values)`, both `(num_queries, k)`.
    """
    n = scores.shape[1]
    if k == n:
        candidates = np.broadcast_to(np.arange(n), scores.shape)
    elif largest:
        # Partitioning around n - k avoids negating the whole score block.
        candidates = np.argpartition(scores, n - k, axis=1)[:, n - k :]
    else:
        candidates = np.argpartition(scores, k - 1, axis=1)[:, :k]
    candidate_keys = np.take_along_axis(scores, candidates, axis=1)
    if largest:
        candidate_keys = -candidate_keys
    # lexsort sorts by the last key first: by score, then by column index.
    order = np.lexsort((candidates, candidate_keys), axis=1)
    columns = np.take_along_axis(candidates, order, axis=1).astype(np.int64)
    if k < n:
        # argpartition picks arbitrary members of a tie at the k-th place;
        # re-sort (stably, so by column) the rows where that happened.
        worst_key = candidate_keys.max(axis=1, keepdims=True)
        worst_score = -worst_key if largest else worst_key
        tied = (scores == worst_score).sum(axis=1) > (candidate_keys == worst_key).sum(axis=1)
        for row in np.flatnonzero(tied):
            keys = -scores[row] if largest else scores[row]
            columns[row] = np.argsort(keys, kind="stable")[:k]
    return columns, np.take_along_axis(scores, columns, axis=1)


class ExactIndex(Index):
    """Exact k-nearest-neighbour index: a chunked matrix product and a partial sort.

    Search cost is `O(num_queries x size x dim)`; fine up to a few hundred
    thousand items, and the ground truth for `ScaNNIndex` recall.

    Args:
        distance: `"dot"` (inner product, larger is closer) or `"squared_l2"`.
        normalize: L2-normalise stored embeddings and queries. Defaults to
            True for `"dot"` (scores are then cosine similarities) and False
            for `"squared_l2"`.

    Example:

    >>> import numpy as np
    >>> from keras_dml.index import ExactIndex
    >>> index = ExactIndex(distance="squared_l2")
    >>> index.add(np.array([[0.0, 0.0], [3.0, 4.0]], "float32"), ids=["a", "b"])
    >>> ids, distances = index.search(np.array([[3.0, 3.0]], "float32"), k=1)
    >>> ids.tolist(), distances.tolist()
    ([['b']], [[1.0]])
    """

    def __init__(self, distance: str = "dot", normalize: bool | None = None):
        super().__init__(distance=distance, normalize=normalize)
        self._squared_norms: np.ndarray | None = None

    def _on_change(self) -> None:
        self._squared_norms = None

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        embeddings = self._embeddings
        size = embeddings.shape[0]
        if self.distance == "squared_l2" and self._squared_norms is None:
            self._squared_norms = np.einsum("ij,ij->i", embeddings, embeddings)
        if self.distance == "squared_l2" and not (
            np.isfinite(self._squared_norms).all()
            and np.isfinite(np.einsum("ij,ij->i", queries, queries)).all()
        ):
            return self._search_huge(queries, k)
        chunk = max(1, _BLOCK_ELEMENTS // size)
        rows, scores = [], []
        for start in range(0, queries.shape[0], chunk):
            block = queries[start : start + chunk]
            products = block @ embeddings.T
            if self.distance == "dot":
                found = top_k_rows(products, k, largest=True)
            else:
                query_norms = np.einsum("ij,ij->i", block, block)[:, None]
                distances = query_norms - 2.0 * products + self._squared_norms[None, :]
                # Rounding can push the distance of (near-)duplicates below 0.
                found = top_k_rows(np.maximum(distances, 0.0), k, largest=False)
            rows.append(found[0])
            scores.append(found[1])
        return np.concatenate(rows), np.concatenate(scores).astype(np.float32)

    def _search_huge(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`squared_l2` search for vectors whose squared norms overflow float32 (beyond ~1e19).

        The vectors are divided by a common power of two, ranked there, and
        the distances scaled back in float64: the order is exact and a
        distance beyond float32's range is reported as Inf, never NaN.
        """
        largest = max(float(np.abs(self._embeddings).max()), float(np.abs(queries).max()))
        scale = 2.0 ** np.floor(np.log2(largest))
        scaled = ExactIndex(distance="squared_l2")
        scaled.add(self._embeddings / np.float32(scale))
        rows, scores = scaled._search(queries / np.float32(scale), k)
        with np.errstate(over="ignore"):
            return rows, (scores.astype(np.float64) * scale**2).astype(np.float32)
