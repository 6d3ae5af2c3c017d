"""Retrieval metrics on embeddings: Precision@1, Recall@K, R-Precision, MAP@R and NMI.

Definitions follow Musgrave, Belongie and Lim, "A Metric Learning Reality
Check" (ECCV 2020) and their `pytorch-metric-learning` `AccuracyCalculator`.
For a query whose class has R references (itself excluded):

- Precision@1: is the nearest reference of the query's class;
- Recall@K: is any of the K nearest references of the query's class;
- R-Precision: (references of the query's class among the R nearest) / R;
- MAP@R: (1/R) * sum over i <= R of P(i) * rel(i), where P(i) is the
  precision of the i nearest and rel(i) says whether the i-th is relevant;
- NMI: normalised mutual information (arithmetic normalisation, as
  scikit-learn's default) between the labels and a k-means clustering of the
  query embeddings with k = number of classes.

A query with R = 0 (its class has no other sample: a "lone" query) cannot be
scored: it is left out of every nearest-neighbour metric, as in the Reality
Check protocol, and still counts for NMI.

Nothing of size queries x references is ever held at once: queries are scored
in chunks against all references, one float32 matmul per chunk (NumPy's BLAS on
the CPU, whatever the Keras backend; the backend's own matmul when it has a GPU
or TPU), and only each chunk's top-k is kept, selected exactly (ties to the
lower reference index) without sorting whole rows.

Example:

>>> import numpy as np
>>> from keras_dml.evaluation import retrieval_metrics
>>> x = np.array([[0.0, 1.0], [0.1, 1.0], [1.0, 0.0], [1.0, 0.1]], "float32")
>>> metrics = retrieval_metrics(x, [0, 0, 1, 1], k=(1, 2))
>>> sorted(metrics)
['map_at_r', 'nmi', 'precision_at_1', 'r_precision', 'recall_at_1', 'recall_at_2']
>>> metrics["precision_at_1"], metrics["map_at_r"]
(1.0, 1.0)
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator, Sequence

import keras
import numpy as np
from keras import ops

from keras_dml import distances as distances_lib
from keras_dml._checks import check_positive_int, is_integer
from keras_dml._numpy_ops import l2_normalize_rows as _l2_normalize

# Working memory of one chunk of queries (float32 scores against every
# reference, plus the chunk's top-k); the default chunk size keeps under it.
_CHUNK_BYTES = 256 * 2**20
# References scored at once against a chunk of queries on the CPU (at most). With more,
# a chunk takes them block by block and merges the blocks' top-k, so that it can hold
# more queries: each pass of the BLAS matmul over a block then serves more of them.
_BLOCK_COLUMNS = 2**17


def _as_embeddings(x, arg: str) -> np.ndarray:
    x = np.asarray(ops.convert_to_numpy(x) if not isinstance(x, np.ndarray) else x)
    if x.ndim != 2:
        raise ValueError(f"`{arg}` must be embeddings of shape (n, dim), got shape {x.shape}.")
    if x.shape[0] == 0:
        raise ValueError(f"`{arg}` is empty; at least one embedding is needed.")
    # Kind "V" covers ml_dtypes' bfloat16, which backends hand over for bfloat16 tensors.
    if x.dtype.kind not in "fiuV":
        raise ValueError(f"`{arg}` must hold real numbers, got dtype {x.dtype}.")
    try:
        x = x.astype("float32", copy=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"`{arg}` must hold real numbers, got dtype {x.dtype}.") from error
    if not np.all(np.isfinite(x)):
        raise ValueError(f"`{arg}` contains NaN or Inf.")
    return x


def _as_labels(y, n: int, arg: str, embeddings_arg: str) -> np.ndarray:
    y = np.asarray(ops.convert_to_numpy(y) if not isinstance(y, (np.ndarray, list, tuple)) else y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
    if y.ndim != 1:
        raise ValueError(
            f"`{arg}` must be labels of shape (n,) or (n, 1), or multi-hot label sets of shape "
            f"(n, classes), got shape {y.shape}."
        )
    if y.shape[0] != n:
        raise ValueError(
            f"`{arg}` has {y.shape[0]} labels but `{embeddings_arg}` has {n} embeddings; "
            "they must match."
        )
    if np.issubdtype(y.dtype, np.floating) and not np.all(np.isfinite(y)):
        raise ValueError(f"`{arg}` contains NaN or Inf.")
    return y


def _is_multi_hot(y) -> bool:
    """Multi-label `(n, C)` labels, C > 1 (a `(n, 1)` column is one class label per row)."""
    shape = np.shape(y) if isinstance(y, (np.ndarray, list, tuple)) else tuple(y.shape)
    return len(shape) == 2 and shape[1] > 1


def _as_label_sets(y, n: int, arg: str, embeddings_arg: str) -> np.ndarray:
    """`(n, C)` multi-hot labels as a bool array (non-zero: the row has that label)."""
    y = np.asarray(ops.convert_to_numpy(y) if not isinstance(y, (np.ndarray, list, tuple)) else y)
    if y.shape[0] != n:
        raise ValueError(
            f"`{arg}` has {y.shape[0]} label rows but `{embeddings_arg}` has {n} embeddings; "
            "they must match."
        )
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):
        raise ValueError(f"`{arg}`: multi-hot labels must be numbers, got dtype {y.dtype}.")
    if np.issubdtype(y.dtype, np.floating) and not np.all(np.isfinite(y)):
        raise ValueError(f"`{arg}` contains NaN or Inf.")
    return y != 0


def _label_bits(sets: np.ndarray) -> np.ndarray:
    """`(n, C)` bool label sets packed as `(n, ceil(C / 64))` uint64 words."""
    packed = np.packbits(sets, axis=1)
    width = -(-packed.shape[1] // 8) * 8
    packed = np.pad(packed, ((0, 0), (0, width - packed.shape[1])))
    return np.ascontiguousarray(packed).view(np.uint64)


def _shared_label_counts(query_sets, ref_sets, batch_size: int = 1024) -> np.ndarray:
    """Per query, the number of references sharing at least one label (chunked matmul)."""
    refs = ref_sets.astype(np.float32).T
    counts = np.empty(len(query_sets), np.int64)
    for start in range(0, len(query_sets), batch_size):
        chunk = query_sets[start : start + batch_size].astype(np.float32)
        counts[start : start + batch_size] = np.count_nonzero(chunk @ refs > 0, axis=1)
    return counts


def _as_ks(k) -> tuple[int, ...]:
    ks = (k,) if isinstance(k, (int, np.integer)) else tuple(k)
    if not ks or any(
        not is_integer(v) or v < 1 for v in ks
    ):
        raise ValueError(f"`k` must be a positive integer or a sequence of them, got {k!r}.")
    return tuple(dict.fromkeys(int(v) for v in ks))


class _Scorer:
    """Ranking scores (larger is nearer) of query chunks against fixed references.

    For the built-in distances the score drops terms that are constant per
    query (`|q|^2` for euclidean, the square root), so ranking needs one
    float32 matmul per chunk, done by NumPy's BLAS on the CPU (or by the
    backend when it has an accelerator); `distances()` maps scores back to
    the named measure. Other `Distance` objects score with backend ops.
    """

    def __init__(self, references: np.ndarray, distance, backend: str = "numpy"):
        self.distance = distances_lib.get(distance)
        name = self.distance.name
        self.builtin = distances_lib.is_builtin(self.distance)
        self.faiss = _faiss_module() if backend == "faiss" else None
        if self.faiss is not None and not self.builtin:
            raise ValueError(
                'backend="faiss" takes the built-in distances only (cosine, euclidean, '
                f"squared_euclidean, dot, angular), got {self.distance!r}."
            )
        self.on_backend = self.faiss is None and (not self.builtin or _backend_has_accelerator())
        # References a chunk's matmul takes at once (`_blocked_top_k`); None: all.
        self.block = None if self.on_backend or self.faiss is not None else _BLOCK_COLUMNS
        # Chunk-sized working arrays, kept from one chunk to the next: a fresh
        # array of that size costs the kernel's zeroing of every page again.
        self._space: dict[str, np.ndarray] = {}
        if self.builtin and self.distance.unit_inputs:
            references = _l2_normalize(references)
        self.bias = None
        if self.builtin and name in ("euclidean", "squared_euclidean"):
            # -|q - r|^2 = 2 q.r - |r|^2 - |q|^2, and |q|^2 does not change a query's ranking;
            # `prepare` doubles the queries.
            self.bias = -np.einsum("ij,ij->i", references, references)[None, :]
        # (N, D) as given: NumPy's matmul hands `references.T` to BLAS as a
        # transposed operand, without a copy.
        self.references = references
        if self.faiss is not None:
            # faiss ranks by inner product; for euclidean one more column carries
            # -|r|^2 (and a 1 on the query side), so the product is the score itself.
            if self.bias is not None:
                references = np.hstack([references, self.bias.T])
            self.references = np.ascontiguousarray(references, dtype="float32")
        if self.on_backend:
            self.references = ops.convert_to_tensor(references)
            if self.bias is not None:
                self.bias = ops.convert_to_tensor(self.bias)

    def prepare(self, queries: np.ndarray) -> np.ndarray:
        if self.builtin and self.distance.unit_inputs:
            return _l2_normalize(queries)
        if self.bias is not None:
            return 2.0 * queries
        return queries

    def top_k(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`(scores, indices)` of the `k` best references of `prepare`d queries, best first.

        Ties go to the lower index; with faiss, among the k returned (faiss
        may pick a different reference tied at the k-th place).
        """
        if self.faiss is None:
            if self.block is not None and len(self.references) > self.block:
                return self._blocked_top_k(queries, k)
            scores = self.scores(queries)
            return _top_k_threaded(scores, k, self._working_space("mask", scores.shape, bool))
        if self.bias is not None:
            queries = np.hstack([queries, np.ones((len(queries), 1), "float32")])
        values, indices = self.faiss.knn(
            np.ascontiguousarray(queries, dtype="float32"), self.references, k,
            metric=self.faiss.METRIC_INNER_PRODUCT,
        )
        order = np.lexsort((indices, -values), axis=1)
        return np.take_along_axis(values, order, 1), np.take_along_axis(indices, order, 1)

    def _blocked_top_k(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`top_k` on the CPU, `self.block` references at a time, merged exactly.

        Until the blocks so far hold k references, each block's top-k is
        selected (`_top_k`); after that, a block's candidates are only the
        entries above the row's k-th best so far (one comparison pass; an
        entry tied with it has a larger column, so it loses the tie). The
        merge orders by (value, column) as `_top_k` does.
        """
        rows, n = len(queries), len(self.references)
        best = np.empty((rows, 0), np.uint64)
        for start in range(0, n, self.block):
            stop = min(start + self.block, n)
            scores = np.matmul(
                queries, self.references[start:stop].T,
                out=self._working_space("scores", (rows, stop - start), "float32"),
            )
            if self.bias is not None:
                scores += self.bias[:, start:stop]
            mask = self._working_space("mask", scores.shape, bool)
            if best.shape[1] < k:
                values, columns = _top_k_threaded(scores, min(k, stop - start), mask)
                keys = _descending_keys(values, columns + start)
            else:
                kth, _ = _decode_keys(best.max(axis=1))
                np.greater(scores, kth[:, None], out=mask)
                keys = (_row_keys(scores, mask, start, max_width=k)
                        if np.count_nonzero(mask) <= rows * k else None)
                if keys is None:  # more than k above a row's k-th best (references in
                    # ascending order of score, say): the block's own top-k, bounded.
                    values, columns = _top_k_threaded(scores, min(k, stop - start), mask)
                    keys = _descending_keys(values, columns + start)
            best = np.concatenate([best, keys], axis=1)
            if best.shape[1] > k:
                best = np.partition(best, k - 1, axis=1)[:, :k]
        best.sort(axis=1)
        return _decode_keys(best)

    def _working_space(self, name: str, shape: tuple[int, int], dtype) -> np.ndarray:
        """A C-contiguous array of `shape`, its memory reused by every later call.

        The memory grows to the largest shape asked for and is never given back
        before the scorer goes.
        """
        size = shape[0] * shape[1]
        space = self._space.get(name)
        if space is None or space.size < size:
            space = self._space[name] = np.empty(size, dtype)
        return space[:size].reshape(shape)

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """`(len(queries), N)` float32 NumPy scores of `prepare`d queries.

        On the CPU path the result is this scorer's working space: the next
        call overwrites it.
        """
        if not self.on_backend:
            shape = (len(queries), self.references.shape[0])
            scores = np.matmul(queries, self.references.T,
                               out=self._working_space("scores", shape, "float32"))
            if self.bias is not None:
                scores += self.bias
            return scores
        tensor = ops.convert_to_tensor(queries)
        if not self.builtin:
            scores = ops.cast(self.distance.similarity(tensor, self.references), "float32")
        else:
            scores = ops.matmul(tensor, ops.transpose(self.references))
            scores = scores if self.bias is None else scores + self.bias
        return np.asarray(ops.convert_to_numpy(scores), dtype="float32")

    def distances(self, queries: np.ndarray, scores: np.ndarray) -> np.ndarray:
        name = self.distance.name
        if not self.builtin:
            return -scores
        if name == "cosine":
            return 1.0 - scores
        if name == "angular":
            return np.maximum(1.0 - scores, 0.0)
        if name == "dot":
            return -scores
        squared = np.maximum(np.sum(np.square(queries), axis=1, keepdims=True) - scores, 0.0)
        return squared if name == "squared_euclidean" else np.sqrt(squared)


def _backend_has_accelerator() -> bool:
    """Whether the active Keras backend computes on a GPU/TPU (then it does the matmuls)."""
    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            devices = tf.config.list_logical_devices
            return bool(devices("GPU") or devices("TPU"))
        if backend == "jax":
            import jax

            return jax.default_backend() != "cpu"
        if backend == "torch":
            import torch

            return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a backend that cannot tell is treated as CPU-only
        return False
    return False


def _check_batch_size(batch_size) -> None:
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size")


BACKENDS = ("numpy", "faiss")
# Queries per `faiss.knn` call: faiss builds no (queries, N) matrix (it blocks the
# search into 4096 x 1024 tiles), so a chunk holds only its k results.
_FAISS_CHUNK = 4096


def check_backend(backend) -> None:
    """Raises `ValueError` unless `backend` is one of `BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}.")


def _faiss_module():
    """faiss, imported on first use (optional: `pip install faiss-cpu`)."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            'backend="faiss" needs the faiss package (pip install faiss-cpu).'
        ) from error
    return faiss


# Columns per group in `_top_k` (at most; fewer when k is large against N).
_GROUP = 128
# Candidates `_top_k` orders at once (about 48 bytes each); rows with more,
# from scores tied at their cut, are taken a few rows at a time.
_CANDIDATES = 2**21
_NO_KEY = np.uint64(2**64 - 1)


def _group_size(n: int, k: int) -> int:
    return max(1, min(_GROUP, n // (4 * k)))


def _chunk_rows(
    batch_size: int | None, n_references: int, k: int, block: int | None = None
) -> int:
    """Queries per chunk: `batch_size`, or as many as fit in `_CHUNK_BYTES`.

    Per query, a chunk holds float32 scores against every reference (or
    against `block` of them at a time), the boolean candidate mask and the
    group maxima of `_top_k`, its candidates (about 48 bytes each, a little
    over k of them) and, with blocks, every block's top-k as 8-byte keys.
    """
    if batch_size is not None:
        return int(batch_size)
    width = n_references if block is None else min(block, n_references)
    group = _group_size(width, k)
    blocks = -(-n_references // width)
    per_row = 5 * width + 8 * width // group + 64 * k + (16 * k * blocks if blocks > 1 else 0)
    return max(1, _CHUNK_BYTES // per_row)


def _round_k(k: int, available: int) -> int:
    # Eight steps per power of two: few distinct shapes, and no chunk asks for
    # more than 1/8 more neighbours than it needs.
    step = max(1, 1 << max(int(k - 1).bit_length() - 3, 0))
    return min(-(-int(k) // step) * step, available)


@contextlib.contextmanager
def _full_precision_matmul():
    """Computes float32 matmuls in full float32 for the duration.

    TensorFlow and JAX default to TF32 on recent NVIDIA GPUs, which keeps 10
    mantissa bits: enough to reorder close neighbours, so metrics would depend
    on the GPU and on the chunk size. Held around a whole evaluation, not each
    chunk: JAX re-dispatches every op after its precision setting changes.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        with jax.default_matmul_precision("highest"):
            yield
    elif backend == "tensorflow":
        import tensorflow as tf

        enabled = tf.config.experimental.tensor_float_32_execution_enabled()
        tf.config.experimental.enable_tensor_float_32_execution(False)
        try:
            yield
        finally:
            tf.config.experimental.enable_tensor_float_32_execution(enabled)
    elif backend == "torch":
        import torch

        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(previous)
    else:
        yield


def _descending_keys(values: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """uint64 keys whose ascending order is value descending, then column ascending."""
    bits = (values.astype("float32") + np.float32(0.0)).view(np.uint32)  # -0.0 ties 0.0
    # Flipping the sign bit of positives and every bit of negatives orders
    # float32 bit patterns as their values; the complement reverses that order.
    ascending = np.where(bits >> 31, ~bits, bits | np.uint32(2**31))
    return ((~ascending).astype(np.uint64) << np.uint64(32)) | columns.astype(np.uint64)


def _decode_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(values, columns)` of `_descending_keys`."""
    ascending = ~(keys >> np.uint64(32)).astype(np.uint32)
    bits = np.where(ascending >> 31, ascending & np.uint32(2**31 - 1), ~ascending)
    return bits.view(np.float32), (keys & np.uint64(2**32 - 1)).astype("int64")


def _top_k(
    scores: np.ndarray, k: int, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The `k` largest of each row as `(values, indices)`, by value then lower index.

    Exact, ties included, without sorting or partitioning whole rows: the
    columns are split into G groups (column c in group c mod G, up to
    `_GROUP` columns each) and t = the k-th largest group maximum. The k
    groups with the largest maxima hold k distinct entries >= t, so the row's
    k largest are all >= t. One pass marks the entries >= t (a little over k
    per row unless scores tie at t), and only those are ordered, as uint64
    keys of (value descending, column). `mask`, a boolean array of the
    shape of `scores`, is the working space of that pass when given.
    """
    rows, n = scores.shape
    k = min(int(k), n)
    group = _group_size(n, k)
    groups = -(-n // group)
    if group == 1:
        maxima = scores
    else:
        # Columns [0, groups * rounds) fill `rounds` full rounds; the rest
        # (fewer than `groups` columns) is one more member of the first groups.
        rounds = n // groups
        head = groups * rounds
        maxima = scores[:, :head].reshape(rows, rounds, groups).max(axis=1)
        np.maximum(maxima[:, : n - head], scores[:, head:], out=maxima[:, : n - head])
    cut = -np.partition(-maxima, k - 1, axis=1)[:, k - 1]
    if mask is None:
        mask = np.empty(scores.shape, bool)
    np.greater_equal(scores, cut[:, None], out=mask)
    if rows == 1 or np.count_nonzero(mask) <= _CANDIDATES:
        return _order_candidates(scores, mask, k)
    # Ties at the cut: rows a few at a time, each block within `_CANDIDATES` (or one row).
    ends = np.cumsum(np.count_nonzero(mask, axis=1))
    blocks, start = [], 0
    while start < rows:
        before = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, before + _CANDIDATES, side="right")))
        blocks.append(_order_candidates(scores[start:stop], mask[start:stop], k))
        start = stop
    return _concatenate_rows(blocks)


def _concatenate_rows(
    blocks: list[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """One `(values, indices)` from those of consecutive row blocks."""
    return (np.concatenate([values for values, _ in blocks]),
            np.concatenate([indices for _, indices in blocks]))


def _row_keys(
    scores: np.ndarray, mask: np.ndarray, offset: int = 0, max_width: int | None = None
) -> np.ndarray | None:
    """`(rows, width)` `_descending_keys` of each row's entries under `mask`, `_NO_KEY` after.

    Columns are counted from `offset`; `width` is the largest count of a row.
    None when that is over `max_width`.
    """
    rows, n = scores.shape
    flat = np.flatnonzero(mask)
    row, columns = np.divmod(flat, n)
    counts = np.bincount(row, minlength=rows)
    if max_width is not None and counts.max(initial=0) > max_width:
        return None
    keyed = np.full((rows, counts.max(initial=0)), _NO_KEY)
    keyed[row, np.arange(len(flat)) - (np.cumsum(counts) - counts)[row]] = _descending_keys(
        scores.reshape(-1)[flat], columns + offset
    )
    return keyed


def _order_candidates(
    scores: np.ndarray, mask: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The `k` first of each row's entries under `mask`, by value descending then column."""
    keyed = _row_keys(scores, mask)
    # Every row has k entries at or above its cut; only a NaN score is neither
    # above nor below it.
    if keyed.shape[1] < k or keyed[:, k - 1].max() == _NO_KEY:
        raise ValueError("The scores contain NaN; check the embeddings and the distance.")
    if keyed.shape[1] > k:
        keyed = np.partition(keyed, k - 1, axis=1)[:, :k]
    keyed.sort(axis=1)
    return _decode_keys(keyed)


# Scores per thread in `_top_k_threaded` (at least): fewer are not worth a thread.
_SCORES_PER_THREAD = 2**20


def _top_k_threaded(
    scores: np.ndarray, k: int, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`_top_k` over row blocks in parallel threads, one per available core.

    NumPy releases the GIL in the reductions, comparisons, partitions and
    sorts of `_top_k`, so the selection, otherwise single-threaded after the
    multi-threaded BLAS matmul, uses every core. Same result as `_top_k` (each
    row is selected on its own). The threads live for this call only, so a
    process forked later holds no pool with dead threads. `mask` is
    `_top_k`'s working space, shared out by rows.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    if mask is None:
        mask = np.empty(scores.shape, bool)
    parts = min(cores, len(scores), scores.size // _SCORES_PER_THREAD)
    if parts < 2:
        return _top_k(scores, k, mask)
    from concurrent.futures import ThreadPoolExecutor

    bounds = np.linspace(0, len(scores), parts + 1).astype("int64")
    with ThreadPoolExecutor(parts) as pool:
        blocks = list(pool.map(
            lambda b: _top_k(scores[b[0]:b[1]], k, mask[b[0]:b[1]]),
            zip(bounds[:-1], bounds[1:], strict=True),
        ))
    return _concatenate_rows(blocks)


def _top_k_chunks(
    scorer: _Scorer,
    queries: np.ndarray,
    query_ids: np.ndarray,
    ks: np.ndarray,
    n_references: int,
    exclude_self: bool,
    batch_size: int | None,
    with_scores: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None, int]]:
    """Yields `(positions, indices, scores, k)` for chunks of `query_ids`.

    `positions` index into `query_ids`; row j of `indices` holds the `k`
    nearest references of query `query_ids[positions[j]]`, nearest first, with
    ties broken by lower reference index. `k` is at least `ks` of every query
    of the chunk; `ks` must be ascending. With `exclude_self`, query i is
    reference i and never its own neighbour. `scores` is None unless
    `with_scores`.
    """
    available = n_references - int(exclude_self)
    start = 0
    while start < len(query_ids):
        rows = _chunk_rows(batch_size, n_references, _round_k(ks[start], available),
                           scorer.block)
        if scorer.faiss is not None:  # no score matrix here: faiss blocks the search itself
            rows = batch_size or _FAISS_CHUNK
        elif batch_size is None:
            # `ks` ascends: size the chunk again for the k of its last query.
            last = min(start + rows, len(query_ids)) - 1
            rows = _chunk_rows(None, n_references, _round_k(ks[last], available),
                               scorer.block)
        positions = np.arange(start, min(start + rows, len(query_ids)))
        start = positions[-1] + 1
        ids = query_ids[positions]
        k = _round_k(ks[positions[-1]], available)
        chunk = scorer.prepare(queries[ids])
        # Asking for one more and dropping the query itself (or, when it is not
        # among them, the last) gives the k nearest others without masking the
        # diagonal of the chunk.
        values, indices = scorer.top_k(chunk, k + int(exclude_self))
        values = values if with_scores else None
        if exclude_self:
            keep = indices != ids[:, None]
            keep[keep.all(axis=1), -1] = False
            indices = indices[keep].reshape(len(ids), k)
            values = None if values is None else values[keep].reshape(len(ids), k)
        yield positions, indices, values, k


def nearest_neighbors(
    queries,
    references=None,
    k: int = 10,
    distance="cosine",
    batch_size: int | None = None,
    backend: str = "numpy",
) -> tuple[np.ndarray, np.ndarray]:
    """Finds the `k` nearest references of each query, exactly, in chunks.

    Args:
        queries: `(Q, D)` embeddings.
        references: `(N, D)` embeddings; `None` searches `queries` among
            themselves, leaving each query out of its own neighbours.
        k: neighbours per query; at most the number of references (less one
            without `references`).
        distance: a name from `keras_dml.distances` (`"cosine"`, `"euclidean"`,
            `"squared_euclidean"`, `"dot"`, `"angular"`, or an alias) or a
            `keras_dml.distances.Distance`.
        batch_size: queries scored at once; by default as many as keep a
            chunk's working memory near 256 MiB.
        backend: `"numpy"` (default): one BLAS matmul per chunk and an exact
            top-k, ties to the lower index (or the Keras backend's matmul on
            a GPU/TPU). `"faiss"`: faiss's brute-force search
            (`faiss.knn`, inner product; needs `faiss-cpu`, imported only
            then), built-in distances only; a tie at the k-th place may go to
            another reference.

    Returns:
        `(indices, distances)`, both `(Q, k)`, nearest first: int64 reference
        indices and float32 distances in the chosen measure (`1 - cos` for
        cosine, `-x.y` for dot). Ties go to the lower reference index.

    Raises:
        ValueError: for wrong shapes, NaN/Inf, an unknown distance or a `k`
            larger than the number of references.
    """
    queries = _as_embeddings(queries, "queries")
    exclude_self = references is None
    references = queries if exclude_self else _as_embeddings(references, "references")
    if references.shape[1] != queries.shape[1]:
        raise ValueError(
            f"`references` have dimension {references.shape[1]} but `queries` have "
            f"{queries.shape[1]}; they must match."
        )
    available = len(references) - int(exclude_self)
    if not is_integer(k) or not 1 <= k <= available:
        raise ValueError(f"`k` must be an integer in [1, {available}], got {k!r}.")
    _check_batch_size(batch_size)
    check_backend(backend)
    scorer = _Scorer(references, distance, backend)
    n = len(queries)
    out_indices = np.empty((n, k), "int64")
    out_distances = np.empty((n, k), "float32")
    chunks = _top_k_chunks(
        scorer, queries, np.arange(n), np.full(n, k), len(references), exclude_self, batch_size,
        with_scores=True,
    )
    with _full_precision_matmul():
        for positions, indices, scores, _ in chunks:
            out_indices[positions] = indices[:, :k]
            out_distances[positions] = scorer.distances(queries[positions], scores[:, :k])
    return out_indices, out_distances


# The default NMI k-means (issue 21, fourth pass): k-means++ seeding while it is cheap,
# on a seeded sample of at most `_KMEANS_SEED_BUDGET / (k * (2 + int(ln k)))` points
# (scikit-learn's k-means++ computes that many point-centre distances); when that
# sample would hold fewer than `_KMEANS_SEED_MIN_PER_CLUSTER` points per cluster,
# k distinct points drawn with the seed instead (faiss's start, as PML's NMI). Then
# at most `_KMEANS_MAX_ITER` float32 Lloyd iterations on every point (scikit-learn's,
# or faiss's with `backend="faiss"`). `nmi="exact"` runs the k-means of before issue 21.
_KMEANS_MAX_ITER = 25
_KMEANS_SEED_BUDGET = 5_000_000
_KMEANS_SEED_MIN_PER_CLUSTER = 4


def _check_seed(seed) -> None:
    if not is_integer(seed) or not 0 <= seed < 2**32:
        raise ValueError(f"`seed` must be an integer in [0, 2**32 - 1], got {seed!r}.")


def _kmeans_assignments(
    embeddings: np.ndarray, n_clusters: int, seed: int, exact: bool = False,
    backend: str = "numpy",
) -> np.ndarray:
    """Cluster of each embedding by k-means, k = `n_clusters`; the same for the same `seed`.

    `exact`: scikit-learn's k-means with its defaults (k-means++ seeding over
    all points, up to 300 Lloyd iterations, float64; ~160 s at 100,000 x 128
    and 1,000 clusters on 2 loaded cores), whatever `backend`. Otherwise the
    starting centres are a k-means++ seeding (scikit-learn's, float64) on a
    seeded sample of `_KMEANS_SEED_BUDGET / (k (2 + int(ln k)))` points (all
    of them when fewer), or, when that leaves fewer than
    `_KMEANS_SEED_MIN_PER_CLUSTER` per cluster (k above ~420), k distinct
    embeddings drawn with `seed`; then at most `_KMEANS_MAX_ITER` float32
    Lloyd iterations over every point, by scikit-learn (`backend="numpy"`)
    or by `faiss.Kmeans` (`backend="faiss"`, from the same centres; an empty
    cluster is re-seeded differently, faiss splitting a large one,
    scikit-learn taking a far point). At 100,000 x 128 and 1,000 clusters
    k-means++ on a 32-per-cluster sample cost as much as 13-23 Lloyd iterations and
    did not raise NMI; on scikit-learn's digits (k = 10) random starts
    lowered it (BENCHMARKS.md, issue 21, fourth pass).
    """
    if n_clusters <= 1:
        return np.zeros(len(embeddings), "int64")
    from sklearn.cluster import KMeans, kmeans_plusplus

    if exact:
        kmeans = KMeans(n_clusters=n_clusters, n_init=1, random_state=seed)
        return kmeans.fit_predict(embeddings.astype("float64"))
    points = np.ascontiguousarray(embeddings, dtype="float32")
    n = len(points)
    rng = np.random.default_rng(seed)
    sample_size = _KMEANS_SEED_BUDGET // (n_clusters * (2 + int(np.log(n_clusters))))
    if sample_size >= _KMEANS_SEED_MIN_PER_CLUSTER * n_clusters:
        sample = points
        if sample_size < n:
            sample = points[np.sort(rng.choice(n, sample_size, replace=False))]
        centres, _ = kmeans_plusplus(sample.astype("float64"), n_clusters, random_state=seed)
        centres = centres.astype("float32")
    else:
        centres = points[np.sort(rng.choice(n, n_clusters, replace=False))]
    if backend == "faiss":
        faiss = _faiss_module()
        kmeans = faiss.Kmeans(
            points.shape[1], n_clusters, niter=_KMEANS_MAX_ITER, seed=seed % 2**31,
            # every point in every iteration (faiss samples above 256 per cluster), no
            # warning below 39 per cluster
            max_points_per_centroid=-(-n // n_clusters), min_points_per_centroid=1,
        )
        kmeans.train(points, init_centroids=centres)
        return kmeans.index.search(points, 1)[1][:, 0].astype("int64")
    kmeans = KMeans(
        n_clusters=n_clusters, init=centres, n_init=1, max_iter=_KMEANS_MAX_ITER,
        random_state=seed,
    )
    return kmeans.fit_predict(points)


def retrieval_metrics(
    embeddings,
    labels,
    reference_embeddings=None,
    reference_labels=None,
    k: int | Sequence[int] = (1, 2, 4, 8),
    distance="cosine",
    *,
    nmi: bool | str = True,
    batch_size: int | None = None,
    seed: int = 0,
    backend: str = "numpy",
) -> dict[str, float]:
    """Scores how well embeddings retrieve their own class: P@1, Recall@K, R-Precision, MAP@R, NMI.

    Without a reference set, every embedding is a query searched among all the
    others (leave-one-out). With `reference_embeddings`/`reference_labels`,
    queries are searched among the references only; a query that is itself in
    the reference set is not removed then, so pass the references without
    the queries.

    Multi-label data: with `(N, C)` multi-hot `labels` (and `(M, C)`
    `reference_labels`), a reference is relevant to a query when they share
    at least one label, and R is the number of relevant references; the
    metrics are otherwise the same (one-hot rows give exactly the
    single-label results). NMI, a clustering against one class per sample,
    is not defined then and is NaN. For padded label lists use
    `keras_dml.losses.multi_hot` first.

    Queries whose class has no reference (a class with a single sample in
    leave-one-out) cannot be scored and are left out of every nearest-
    neighbour metric, as in the Reality Check protocol; when no query can be
    scored those metrics are NaN, with a warning. NMI clusters the query
    embeddings (L2-normalised first for cosine and angular) with scikit-learn's
    k-means, k = the number of query classes.

    Queries are scored in chunks against all references, and each chunk
    keeps only its top-k (k = the larger of `max(k)` and the chunk's largest
    R): with the default `batch_size`, a chunk's working memory stays near
    256 MiB, so 100,000 x 128 embeddings never build the 100,000 x 100,000
    matrix. Time grows with N^2 (the matmul) and, mildly, with the class
    sizes. Scores are computed in full float32 (not TF32) on every device;
    ties in distance go to the lower reference index.

    Args:
        embeddings: `(N, D)` query embeddings (NumPy array or backend tensor).
        labels: `(N,)` or `(N, 1)` class labels: integers, or any values that
            compare equal within a class (strings work); or `(N, C)` multi-hot
            label sets (non-zero: the sample has that label).
        reference_embeddings: optional `(M, D)` reference embeddings.
        reference_labels: `(M,)` labels of the references; given exactly when
            `reference_embeddings` is.
        k: the K of Recall@K, an int or a sequence of them.
        distance: a name from `keras_dml.distances` (`"cosine"`, `"euclidean"`,
            `"squared_euclidean"`, `"dot"`, `"angular"`, or an alias) or a
            `keras_dml.distances.Distance`.
        nmi: compute NMI. `True` (default): at most 25 float32 Lloyd
            iterations from k-means++ centres while seeding is cheap (k up to
            ~420; on a sample of at most 5e6 / (k (2 + int(ln k))) points), else
            from k distinct query embeddings drawn with `seed` (faiss's
            start, as PML's NMI). A trade-off: at 100,000 x 128 and 1,000
            classes the k-means takes less than half the time of
            before (k-means++ on 32 points per cluster, 50 iterations), and
            NMI stays as close to the exact k-means's as before (within its
            spread between seeds; BENCHMARKS.md, issue 21, fourth pass); it
            is the NMI of a k-means stopped early, not a converged one.
            `"exact"`: scikit-learn's full k-means as before issue 21
            (k-means++ over all points, float64, up to 300 iterations), with
            either `backend`; `False`: no NMI.
        batch_size: queries scored at once; by default as many as keep a
            chunk's working memory near 256 MiB.
        seed: k-means seed, an integer in [0, 2**32 - 1]: the same seed gives
            the same NMI (with the same backend and library versions).
        backend: `"numpy"` (default) or `"faiss"`: the nearest-neighbour
            search, as in `nearest_neighbors`, and the default NMI's Lloyd
            iterations (scikit-learn's, or `faiss.Kmeans` from the same
            starting centres; empty clusters are re-seeded differently and
            rounding differs, so at large k the NMI differs: 0.9516 vs
            0.9473 on the 100,000 x 128 benchmark; faiss took about twice
            scikit-learn's CPU time per iteration there).

    Returns:
        A dict of Python floats, in this order: `precision_at_1`,
        `recall_at_{K}` for each K, `r_precision`, `map_at_r` and, with
        `nmi=True`, `nmi`.

    Raises:
        ValueError: naming the argument, for wrong ranks or shapes, mismatched
            lengths or dimensions, empty inputs, NaN/Inf embeddings, a bad `k`,
            `nmi`, `seed` or `backend`, or an unknown distance.

    Example:

    ```python
    embed = keras.Model(model.input, model.get_layer("embedding").output)
    metrics = keras_dml.evaluation.retrieval_metrics(embed.predict(x_test), y_test)
    print(f"MAP@R {metrics['map_at_r']:.3f}  R@1 {metrics['recall_at_1']:.3f}")
    ```

    Reference:
        Musgrave, Belongie, Lim, "A Metric Learning Reality Check", ECCV 2020.
    """
    ks = _as_ks(k)
    queries = _as_embeddings(embeddings, "embeddings")
    multi_label = _is_multi_hot(labels)
    as_labels = _as_label_sets if multi_label else _as_labels
    query_labels = as_labels(labels, len(queries), "labels", "embeddings")
    if (reference_embeddings is None) != (reference_labels is None):
        raise ValueError(
            "`reference_embeddings` and `reference_labels` must be given together, got only "
            + ("`reference_embeddings`." if reference_labels is None else "`reference_labels`.")
        )
    leave_one_out = reference_embeddings is None
    if leave_one_out:
        references, ref_labels = queries, query_labels
    else:
        references = _as_embeddings(reference_embeddings, "reference_embeddings")
        if _is_multi_hot(reference_labels) != multi_label:
            raise ValueError(
                "`labels` and `reference_labels` must both be class labels or both be "
                "multi-hot label sets."
            )
        ref_labels = as_labels(
            reference_labels, len(references), "reference_labels", "reference_embeddings"
        )
        if multi_label and ref_labels.shape[1] != query_labels.shape[1]:
            raise ValueError(
                f"`reference_labels` have {ref_labels.shape[1]} classes but `labels` have "
                f"{query_labels.shape[1]}; they must match."
            )
        if references.shape[1] != queries.shape[1]:
            raise ValueError(
                f"`reference_embeddings` have dimension {references.shape[1]} but `embeddings` "
                f"have {queries.shape[1]}; they must match."
            )
    distances_lib.get(distance)  # an unknown name fails before any work
    _check_batch_size(batch_size)
    check_backend(backend)
    if not (isinstance(nmi, (bool, np.bool_)) or (isinstance(nmi, str) and nmi == "exact")):
        raise ValueError(f'`nmi` must be True, False or "exact", got {nmi!r}.')
    _check_seed(seed)

    if multi_label:
        query_bits = _label_bits(query_labels)
        ref_bits = query_bits if leave_one_out else _label_bits(ref_labels)
        # R: references sharing a label with the query, the query itself not counted.
        relevant = _shared_label_counts(query_labels, ref_labels)
        if leave_one_out:
            relevant = relevant - query_labels.any(axis=1)

        def relevant_hits(ids, indices):
            return np.any((query_bits[ids][:, None, :] & ref_bits[indices]) != 0, axis=-1)
    else:
        try:
            _, codes = np.unique(np.concatenate([query_labels, ref_labels]), return_inverse=True)
        except TypeError as error:
            raise ValueError(
                "`labels` and `reference_labels` must hold comparable values of one type."
            ) from error
        codes = codes.reshape(-1).astype("int32")
        query_codes = codes[: len(queries)]
        ref_codes = query_codes if leave_one_out else codes[len(queries) :]
        # R: references of the query's class, the query itself not counted.
        class_sizes = np.bincount(ref_codes, minlength=int(codes.max()) + 1)
        relevant = class_sizes[query_codes] - int(leave_one_out)

        def relevant_hits(ids, indices):
            return ref_codes[indices] == query_codes[ids][:, None]

    counts = dict.fromkeys(["precision_at_1", *(f"recall_at_{v}" for v in ks)], 0)
    scored = np.flatnonzero(relevant > 0)
    # Per-query values, summed exactly at the end: the chunking cannot change the result.
    r_precision = np.zeros(len(scored))
    average_precision = np.zeros(len(scored))
    if len(scored):
        # Chunks of similar R ask top_k for similar k.
        scored = scored[np.argsort(relevant[scored], kind="stable")]
        n_available = len(references) - int(leave_one_out)
        wanted = np.minimum(np.maximum(relevant[scored], max(ks)), n_available)
        chunks = _top_k_chunks(
            _Scorer(references, distance, backend), queries, scored, wanted, len(references),
            leave_one_out, batch_size,
        )
        with _full_precision_matmul():
            for positions, indices, _, width in chunks:
                ids = scored[positions]
                hits = relevant_hits(ids, indices)
                r = relevant[ids]
                counts["precision_at_1"] += int(hits[:, 0].sum())
                for v in ks:
                    counts[f"recall_at_{v}"] += int(hits[:, :v].any(axis=1).sum())
                # Row-major nonzero lists each row's hits in rank order, so a hit's
                # place among its row's hits is its count of relevant so far.
                rows, ranks = np.nonzero(hits & (np.arange(width)[None, :] < r[:, None]))
                row_starts = np.searchsorted(rows, np.arange(len(ids)))
                hits_so_far = np.arange(1, len(rows) + 1) - row_starts[rows]
                r_precision[positions] = np.bincount(rows, minlength=len(ids)) / r
                average_precision[positions] = (
                    np.bincount(rows, weights=hits_so_far / (ranks + 1), minlength=len(ids)) / r
                )
        metrics = {name: count / len(scored) for name, count in counts.items()}
        metrics["r_precision"] = math.fsum(r_precision) / len(scored)
        metrics["map_at_r"] = math.fsum(average_precision) / len(scored)
    else:
        warnings.warn(
            "No query has a reference of its own class (every class has a single sample?); "
            "the nearest-neighbour metrics are NaN.",
            stacklevel=2,
        )
        metrics = dict.fromkeys([*counts, "r_precision", "map_at_r"], float("nan"))

    if nmi and multi_label:
        metrics["nmi"] = float("nan")  # no single class per sample to cluster against
    elif nmi:
        from sklearn.metrics import normalized_mutual_info_score

        points = _l2_normalize(queries) if distances_lib.get(distance).unit_inputs else queries
        n_classes = len(np.unique(query_codes))
        clusters = _kmeans_assignments(
            points, n_classes, seed, exact=nmi == "exact", backend=backend
        )
        metrics["nmi"] = float(normalized_mutual_info_score(query_codes, clusters))
    return {name: float(value) for name, value in metrics.items()}
