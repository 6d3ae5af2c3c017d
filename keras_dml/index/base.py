"""What every nearest-neighbour index shares: input checks, ids, metadata and persistence.

An index stores embeddings (one row per item) with an id and optional
JSON-serialisable metadata per item, and answers `search(queries, k)` with the
ids and scores of the `k` nearest items. Subclasses implement only
`_search(queries, k)`, which works on stored row numbers, or (an index that
keeps its vectors elsewhere) override `search` whole.

Persistence never uses pickle: a saved index is a directory holding

| file | content |
| --- | --- |
| `index.json` | format, version, index class, config, sizes, `info`; size and SHA-256 per file |
| `embeddings.npy` | float32 `(size, dim)`, the stored (possibly normalised) vectors |
| `ids.npy` | int64 or unicode `(size,)` |
| `metadata.json` | a JSON list, one entry per item (only when metadata was given) |
| `scann/` | ScaNN's own serialisation (`ScaNNIndex` only) |

Loading reads `.npy` files with `allow_pickle=False` and checks every size and
checksum first, so a directory from someone else cannot run code, and a
truncated, edited or mixed-up directory raises a `ValueError` that says which
file is wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from keras_dml._atomic import fsync_tree, make_staging, remove_stale_staging, swap_into_place
from keras_dml._numpy_ops import (
    canonical_distance_name,
    l2_normalize_rows,
    l2_normalize_vector,
)

FORMAT_NAME = "keras-dml-index"
FORMAT_VERSION = 1
DISTANCES = ("dot", "squared_l2")
# The index's names of the `keras_dml.distances` measures it searches with.
_INDEX_NAMES = {"dot": "dot", "squared_euclidean": "squared_l2"}

_HEADER = "index.json"
_EMBEDDINGS = "embeddings.npy"
_IDS = "ids.npy"
_METADATA = "metadata.json"

def all_finite(x: np.ndarray) -> bool:
    """Returns whether a float32 array holds no NaN or Inf, cheaply.

    NaN and Inf propagate into the dot product of the flattened array with
    itself; a product that overflows on finite values is re-checked exactly.
    """
    flat = x.reshape(-1)
    if math.isfinite(float(np.dot(flat, flat))):
        return True
    return bool(np.isfinite(x).all())


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_matrix(x, name: str, dim: int | None, rows: str = "num_vectors") -> np.ndarray:
    """`x` as a finite float32 `(n, dim)` array; errors name `name` and the expected `dim`."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"`{name}` must have shape ({rows}, dim), got shape {x.shape}.")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(
            f"`{name}` has dimension {x.shape[1]} but the index holds vectors of "
            f"dimension {dim}."
        )
    if not all_finite(x):
        raise ValueError(f"`{name}` contains NaN or Inf values.")
    return x


def check_k(k, size: int) -> int:
    """`k` as an int in `[1, size]`; raises if the index is empty or `k` is out of range."""
    if size == 0:
        raise ValueError("The index is empty: call `add()` before `search()`.")
    if type(k) is not int:  # the common case skips the slower checks
        if isinstance(k, bool) or not isinstance(k, np.integer):
            raise ValueError(f"`k` must be a positive integer, got {k!r}.")
        k = int(k)
    if k < 1:
        raise ValueError(f"`k` must be a positive integer, got {k!r}.")
    if k > size:
        raise ValueError(f"`k` ({k}) is larger than the number of indexed items ({size}).")
    return k


def coerce_ids(ids, n: int, kind: str | None) -> np.ndarray:
    """`ids` as `n` unique int64 (kind "i") or str (kind "U") ids; `kind=None`: either.

    Raises:
        ValueError: wrong shape, a uint64 beyond int64, another dtype, a kind
            other than the index's, or duplicates.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.shape[0] != n:
        raise ValueError(f"`ids` must be a 1-D sequence of {n} ids, got shape {ids.shape}.")
    if n == 0:
        return ids.astype(str if kind == "U" else np.int64)
    if ids.dtype.kind == "u" and ids.max() > np.iinfo(np.int64).max:
        raise ValueError(
            f"`ids` holds {ids.max()}, beyond the int64 range ids are stored in; "
            "use ids below 2**63 or string ids."
        )
    if ids.dtype.kind in "iu":
        ids = ids.astype(np.int64)
    elif ids.dtype.kind in "US":
        ids = ids.astype(str)
    else:
        raise ValueError(f"`ids` must be integers or strings, got dtype {ids.dtype}.")
    if kind is not None and ids.dtype.kind != kind:
        expected = "integer" if kind == "i" else "string"
        raise ValueError(f"`ids` must be {expected} ids like the ones already in the index.")
    if np.unique(ids).shape[0] != n:
        raise ValueError("`ids` contains duplicates.")
    return ids


def map_ids(array: np.ndarray, fetch) -> Any:
    """`fetch(id)` for every id of `array`, as nested lists shaped like it (a value for 0-d)."""
    if array.ndim == 0:
        return fetch(array.item())
    # Filled element by element: NumPy would otherwise unpack list-valued metadata.
    out = np.empty(array.size, dtype=object)
    for position, key in enumerate(array.reshape(-1).tolist()):
        out[position] = fetch(key)
    return out.reshape(array.shape).tolist()


def check_metadata(metadata: Sequence[Any] | None, n: int) -> list[Any] | None:
    """`metadata` as a list of `n` JSON-serialisable entries (None stays None).

    Raises:
        ValueError: if the length is not `n` or an entry is not JSON serialisable.
    """
    if metadata is None:
        return None
    metadata = list(metadata)
    if len(metadata) != n:
        raise ValueError(
            f"`metadata` must have one entry per embedding ({n}), got {len(metadata)}."
        )
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as error:
        raise ValueError(f"`metadata` must be JSON serialisable: {error}") from None
    return metadata


class Index:
    """Base class of every index (`ExactIndex`, `ScaNNIndex`, ...): add, search, save, load.

    Use a subclass; `Index.load(directory)` loads a saved index of either kind.

    Args:
        distance: `"dot"` (inner product; a similarity, larger is closer) or
            `"squared_l2"` (squared euclidean distance, smaller is closer);
            names are resolved by `keras_dml.distances`, so its aliases
            (`"squared_euclidean"`, `"inner_product"`, ...) work too.
        normalize: whether to L2-normalise stored embeddings and queries.
            Defaults to `True` for `"dot"`, so that scores are cosine
            similarities, and `False` for `"squared_l2"`.

    Raises:
        ValueError: if `distance` is not one of the names above.
    """

    # Subclasses register here so that `Index.load` can dispatch on the class
    # name written in `index.json` without importing anything by name.
    _registry: ClassVar[dict[str, type[Index]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls._search is Index._search and cls.search is Index.search:
            raise TypeError(
                f"{cls.__name__} must implement `_search(queries, k)` (the base `search` "
                "checks and normalises queries, then calls it) or override `search` whole."
            )
        Index._registry[cls.__name__] = cls

    def __init__(self, distance: str = "dot", normalize: bool | None = None):
        if type(self) is Index:
            raise TypeError("`Index` is a base class; use a subclass such as `ExactIndex`.")
        name = _INDEX_NAMES.get(canonical_distance_name(distance))
        if name is None:
            raise ValueError(
                f"`distance` must be one of {DISTANCES}, got {distance!r}. Use 'dot' "
                "with normalize=True for cosine similarity."
            )
        self.distance = name
        self.normalize = (name == "dot") if normalize is None else bool(normalize)
        self._embeddings: np.ndarray | None = None
        self._ids: np.ndarray | None = None
        self._metadata: list[Any] | None = None
        self._id_to_row: dict[Any, int] | None = None
        # True when id == row (default ids of a fresh index): search skips the id lookup.
        self._ids_are_rows: bool | None = None

    # ------------------------------------------------------------------ state

    def __len__(self) -> int:
        return 0 if self._embeddings is None else int(self._embeddings.shape[0])

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(size={len(self)}, dim={self.dim}, distance={self.distance!r})"

    @property
    def dim(self) -> int | None:
        """Embedding dimension, or None before the first `add`."""
        return None if self._embeddings is None else int(self._embeddings.shape[1])

    @property
    def embeddings(self) -> np.ndarray:
        """Stored vectors `(size, dim)` (normalised when `normalize`), read-only."""
        return self._read_only(self._embeddings, np.zeros((0, self.dim or 0), np.float32))

    @property
    def ids(self) -> np.ndarray:
        """Ids `(size,)` in storage order (int64 or unicode), read-only."""
        return self._read_only(self._ids, np.zeros((0,), np.int64))

    @property
    def metadata(self) -> list[Any] | None:
        """Per-item metadata in storage order, or None if none was ever given."""
        return None if self._metadata is None else list(self._metadata)

    @property
    def higher_is_better(self) -> bool:
        """True when scores are similarities (`"dot"`), False for distances."""
        return self.distance == "dot"

    @staticmethod
    def _read_only(array, empty):
        view = (empty if array is None else array).view()
        view.flags.writeable = False
        return view

    # ---------------------------------------------------------------- adding

    def add(
        self,
        embeddings,
        ids: Sequence[Any] | np.ndarray | None = None,
        metadata: Sequence[Any] | None = None,
    ) -> None:
        """Adds items to the index; add in large batches, each call copies the store.

        Args:
            embeddings: array-like `(n, dim)` of finite floats (NumPy, a
                TensorFlow or Keras tensor). Every call must use the same `dim`.
            ids: `n` unique integer or string ids. Defaults to consecutive
                integers after the largest id in the index (0, 1, 2, ... for
                a new index). An index holds either integer or string ids, not
                both.
            metadata: `n` JSON-serialisable values (dicts, strings, numbers),
                returned by `get_metadata`.

        Raises:
            ValueError: if `embeddings` has the wrong rank or dimension or is
                not finite; if `ids` has the wrong length, a wrong type or
                duplicates; if `metadata` has the wrong length or is not JSON
                serialisable.

        Example:

        >>> import numpy as np
        >>> from keras_dml.index import ExactIndex
        >>> index = ExactIndex()
        >>> index.add(np.eye(3, dtype="float32"), ids=[10, 20, 30])
        >>> len(index)
        3
        """
        # ScaNN and BLAS want one contiguous block.
        embeddings = np.ascontiguousarray(self._check_matrix(embeddings, "embeddings"))
        n = embeddings.shape[0]
        ids = self._check_new_ids(ids, n)
        metadata = check_metadata(metadata, n)
        if n == 0:
            return
        if self.normalize:
            embeddings = l2_normalize_rows(embeddings)
        old = len(self)
        if self._embeddings is None:
            self._embeddings, self._ids = embeddings, ids
        else:
            self._embeddings = np.concatenate([self._embeddings, embeddings])
            self._ids = np.concatenate([self._ids, ids])
        self._ids_are_rows = None
        if metadata is not None or self._metadata is not None:
            previous = self._metadata if self._metadata is not None else [None] * old
            self._metadata = previous + (metadata if metadata is not None else [None] * n)
        if self._id_to_row is not None:
            self._id_to_row.update((key, old + row) for row, key in enumerate(ids.tolist()))
        self._on_change()

    def _check_matrix(self, x, name: str) -> np.ndarray:
        dim = None if self._embeddings is None else self._embeddings.shape[1]
        return check_matrix(x, name, dim)

    def _check_new_ids(self, ids, n: int) -> np.ndarray:
        integer_ids = self._ids is None or self._ids.dtype.kind == "i"
        if ids is None:
            if not integer_ids:
                raise ValueError("`ids` are required: this index holds string ids.")
            start = int(self._ids.max()) + 1 if len(self) else 0
            return np.arange(start, start + n, dtype=np.int64)
        ids = coerce_ids(ids, n, None if self._ids is None else ("i" if integer_ids else "U"))
        if len(self) and any(key in self._lookup() for key in ids.tolist()):
            raise ValueError("`ids` contains ids that are already in the index.")
        return ids

    def _lookup(self) -> dict[Any, int]:
        if self._id_to_row is None:
            self._id_to_row = {key: row for row, key in enumerate(self.ids.tolist())}
        return self._id_to_row

    def _on_change(self) -> None:
        """Called after the stored vectors change; subclasses drop derived state."""
        return None

    # -------------------------------------------------------------- searching

    def search(self, queries, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Finds the `k` nearest stored items of each query.

        Queries go through the same normalisation as stored embeddings.

        Args:
            queries: array-like `(num_queries, dim)`, or `(dim,)` for one query.
            k: number of neighbours, `1 <= k <= len(index)`.

        Returns:
            `(ids, scores)`, each `(num_queries, k)` (or `(k,)` for a 1-D
            query), best first. Scores are inner products for `"dot"`
            (descending) and squared distances for `"squared_l2"` (ascending).

        Raises:
            ValueError: if the index is empty; if `k` is not an integer in
                `[1, len(index)]`; if `queries` has the wrong rank or dimension
                or contains NaN or Inf.

        Example:

        >>> import numpy as np
        >>> from keras_dml.index import ExactIndex
        >>> index = ExactIndex()
        >>> index.add(np.eye(3, dtype="float32"), ids=[10, 20, 30])
        >>> ids, scores = index.search(np.array([0.0, 2.0, 0.1], "float32"), k=2)
        >>> ids.tolist()
        [20, 30]
        """
        k = check_k(k, len(self))
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            # One query: its own path, since per-call overhead is most of the
            # latency of an approximate search.
            rows, scores = self._search_one(self._prepare_query(queries), k)
            return self._ids_of(rows), scores
        queries = self._prepare_queries(queries)
        if queries.shape[0] == 0:
            rows = np.zeros((0, k), np.int64)
            scores = np.zeros((0, k), np.float32)
        else:
            rows, scores = self._search(queries, k)
        return self._ids_of(rows), scores

    def _ids_of(self, rows: np.ndarray) -> np.ndarray:
        """The ids stored at `rows` (int64 or str), of the same shape."""
        if self._ids_are_rows is None:
            self._ids_are_rows = self._ids.dtype.kind == "i" and bool(
                np.array_equal(self._ids, np.arange(self._ids.shape[0]))
            )
        if self._ids_are_rows:
            return rows.astype(np.int64, copy=False)
        return self._ids[rows]

    def _prepare_query(self, query: np.ndarray) -> np.ndarray:
        """`_prepare_queries` for one `(dim,)` query."""
        if query.shape[0] != self._embeddings.shape[1]:
            raise ValueError(
                f"`queries` has dimension {query.shape[0]} but the index holds vectors of "
                f"dimension {self.dim}."
            )
        square_sum = float(np.dot(query, query))
        if not math.isfinite(square_sum) and not np.isfinite(query).all():
            raise ValueError("`queries` contains NaN or Inf values.")
        if not self.normalize:
            return np.ascontiguousarray(query)
        if not math.isfinite(square_sum):
            return l2_normalize_rows(query[None])[0]
        return l2_normalize_vector(query, square_sum)

    def _search_one(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`(rows, scores)` of shape `(k,)` for one checked query; subclasses may speed it up."""
        rows, scores = self._search(query[None], k)
        return rows[0], scores[0]

    def _prepare_queries(self, queries: np.ndarray) -> np.ndarray:
        """Checks queries and normalises them like the stored vectors.

        One pass computes the squared norms that serve both the NaN/Inf check
        and the normalisation: single-query latency is dominated by such
        per-call overheads, not by the search itself.
        """
        if queries.ndim != 2:
            raise ValueError(
                f"`queries` must have shape (num_queries, dim), got shape {queries.shape}."
            )
        if queries.shape[1] != self._embeddings.shape[1]:
            raise ValueError(
                f"`queries` has dimension {queries.shape[1]} but the index holds vectors of "
                f"dimension {self.dim}."
            )
        if queries.shape[0] == 1:
            square_sum = float(np.dot(queries[0], queries[0]))
            finite = math.isfinite(square_sum)
        else:
            square_sums = np.einsum("ij,ij->i", queries, queries)
            finite = bool(np.isfinite(square_sums).all())
        # An overflowing norm of finite values is re-checked exactly.
        if not finite and not np.isfinite(queries).all():
            raise ValueError("`queries` contains NaN or Inf values.")
        if not self.normalize:
            return np.ascontiguousarray(queries)
        if not finite:
            return l2_normalize_rows(queries)
        if queries.shape[0] == 1:
            square_sums = np.array([square_sum], np.float32)
        return l2_normalize_rows(queries, square_sums)

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns `(rows, scores)` of shape `(num_queries, k)` for checked queries.

        The hook of the base `search`. An index that overrides `search` whole
        (one that keeps no rows here: `ShardedIndex`, `MilvusIndex`) does not
        implement it; a subclass must do one or the other (checked when the
        class is defined).
        """
        raise NotImplementedError(f"{type(self).__name__} overrides `search`; it has no `_search`.")

    def get_metadata(self, ids) -> list[Any]:
        """Returns the metadata of `ids` (e.g. the ids returned by `search`).

        Args:
            ids: an id or an array-like of ids of any shape.

        Returns:
            Nested lists shaped like `ids` (or a single value for a single id),
            holding None where no metadata was given.

        Raises:
            KeyError: if an id is not in the index.
        """
        table = self._lookup()
        array = np.asarray(ids)
        metadata = self._metadata

        def fetch(key):
            if key not in table:
                raise KeyError(f"Id {key!r} is not in the index.")
            return None if metadata is None else metadata[table[key]]

        return map_ids(array, fetch)

    # ----------------------------------------------------------------- config

    def get_config(self) -> dict[str, Any]:
        """Returns the constructor arguments, JSON serialisable."""
        return {"distance": self.distance, "normalize": self.normalize}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Index:
        """Creates an empty index from `get_config()` output."""
        return cls(**config)

    # ------------------------------------------------------------ persistence

    def save(self, directory: str, overwrite: bool = False,
             info: dict[str, Any] | None = None) -> None:
        """Saves the index to a directory (JSON and `.npy` files, no pickle).

        The new index is written (and flushed to disk) in a temporary sibling
        directory and then swapped with the old one in a single rename
        (`renameat2(RENAME_EXCHANGE)` on Linux; elsewhere two renames, the
        old index renamed back if the second fails). An interrupted save
        leaves the old index, complete, or the new one: never a mix, never
        nothing.

        Args:
            directory: path of the directory to create.
            overwrite: replace an existing saved index at `directory`. Only a
                valid saved index (a readable `index.json`) holding no file
                other than the ones it lists is replaced: files of anyone
                else are never deleted.
            info: optional JSON-serialisable dict stored in `index.json`
                (covered by its checksum), e.g. which model the embeddings
                came from; read it back with `Index.saved_info(directory)`.

        Raises:
            FileExistsError: if `directory` exists and `overwrite` is False;
                if it is not empty and is not a saved index; if it holds
                files that the saved index did not write.
        """
        directory = os.path.abspath(os.fspath(directory))
        if info is not None:
            if not isinstance(info, dict):
                raise TypeError(f"`info` must be a dict, got {type(info).__name__}.")
            json.dumps(info)  # not serialisable: fail before anything is written
        if os.path.lexists(directory):
            if not overwrite:
                raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it.")
            _check_replaceable(directory)
        parent = os.path.dirname(directory)
        os.makedirs(parent, exist_ok=True)
        remove_stale_staging(directory)  # what a killed save left beside it
        staging = make_staging(directory)
        try:
            self._write(staging, info)
            fsync_tree(staging)
            swap_into_place(staging, directory)
        finally:
            # After a swap `staging` holds the old index; after a failure, a partial new one.
            shutil.rmtree(staging, ignore_errors=True)

    def _write(self, directory: str, info: dict[str, Any] | None = None) -> None:
        dim = self.dim or 0
        embeddings = self._embeddings if self._embeddings is not None else np.zeros((0, dim))
        ids = self._ids if self._ids is not None else np.zeros((0,), np.int64)
        np.save(os.path.join(directory, _EMBEDDINGS), embeddings.astype(np.float32))
        np.save(os.path.join(directory, _IDS), ids)
        if self._metadata is not None:
            with open(os.path.join(directory, _METADATA), "w") as f:
                json.dump(self._metadata, f)
        self._write_extra(directory)
        files = {}
        for root, _, names in os.walk(directory):
            for name in names:
                path = os.path.join(root, name)
                relative = os.path.relpath(path, directory).replace(os.sep, "/")
                files[relative] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
        header = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "index_class": type(self).__name__,
            "config": self.get_config(),
            "size": len(self),
            "dim": self.dim,
            "id_kind": "int" if ids.dtype.kind == "i" else "str",
            "has_metadata": self._metadata is not None,
            "files": dict(sorted(files.items())),
        }
        write_header(directory, header, info)

    def _write_extra(self, directory: str) -> None:
        """Writes subclass files into the staging directory."""
        return None

    @classmethod
    def load(cls, directory: str) -> Index:
        """Loads an index saved with `save()`, checking every file first.

        `Index.load` returns whichever index class was saved (a
        `ShardedIndex` loads and checks each shard; a `MilvusIndex`
        reconnects to its collection); `ExactIndex.load` / `ScaNNIndex.load`
        also check the class.

        Args:
            directory: a directory written by `save()`.

        Returns:
            The index, ready to search.

        Raises:
            FileNotFoundError: if `directory` does not exist.
            ValueError: if the directory is not a saved index, has an unknown
                format version, holds another index class than requested, or
                has a missing, truncated or modified file.

        Example:

        >>> import tempfile, os
        >>> import numpy as np
        >>> from keras_dml.index import ExactIndex, Index
        >>> index = ExactIndex()
        >>> index.add(np.eye(3, dtype="float32"))
        >>> path = os.path.join(tempfile.mkdtemp(), "my_index")
        >>> index.save(path)
        >>> len(Index.load(path))
        3
        """
        directory = os.path.abspath(os.fspath(directory))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"No saved index at {directory}.")
        header = _read_header(directory)
        name = header.get("index_class")
        target = Index._registry.get(name)
        if target is None or target is Index:
            raise ValueError(f"{directory}: unknown index class {name!r} in {_HEADER}.")
        if cls is not Index and not issubclass(target, cls):
            raise ValueError(f"{directory} holds a {name}, not a {cls.__name__}.")
        loader = getattr(target, "_load_saved", None)
        if loader is not None:
            # Indexes that are not one array store (`ShardedIndex`) read their own layout.
            return loader(directory, header)
        _verify_files(directory, header)
        index = target.from_config(header["config"])
        size, dim = header["size"], header["dim"]
        embeddings = _load_npy(directory, _EMBEDDINGS)
        ids = _load_npy(directory, _IDS)
        expected_kind = "i" if header["id_kind"] == "int" else "U"
        if embeddings.dtype != np.float32 or embeddings.shape != (size, dim or 0):
            raise ValueError(
                f"{directory}: {_EMBEDDINGS} has shape {embeddings.shape} and dtype "
                f"{embeddings.dtype}; {_HEADER} expects ({size}, {dim}) float32."
            )
        if ids.shape != (size,) or ids.dtype.kind != expected_kind:
            raise ValueError(
                f"{directory}: {_IDS} has shape {ids.shape} and dtype {ids.dtype}; "
                f"{_HEADER} expects ({size},) {header['id_kind']} ids."
            )
        if index.normalize and size and not _rows_unit_or_zero(embeddings):
            raise ValueError(
                f"{directory}: {_HEADER} says normalize=True but {_EMBEDDINGS} holds rows that "
                "are not unit-norm; the header does not describe this data."
            )
        if header["has_metadata"]:
            with open(os.path.join(directory, _METADATA)) as f:
                metadata = json.load(f)
            if not isinstance(metadata, list) or len(metadata) != size:
                raise ValueError(f"{directory}: {_METADATA} must be a list of {size} entries.")
            index._metadata = metadata
        if size:
            index._embeddings, index._ids = embeddings, ids
            index._ids_are_rows = None
        index._read_extra(directory, header)
        return index

    def _read_extra(self, directory: str, header: dict[str, Any]) -> None:
        """Restores subclass state from a verified directory."""
        return None

    @staticmethod
    def saved_info(directory: str) -> dict[str, Any]:
        """The `info` dict given to `save()` ({} if none), from a checked `index.json`.

        Reads only the header (and checks its checksum), not the data.

        Raises:
            FileNotFoundError: if `directory` does not exist.
            ValueError: if `index.json` is missing, truncated or edited.
        """
        directory = os.path.abspath(os.fspath(directory))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"No saved index at {directory}.")
        info = _read_header(directory).get("info", {})
        return dict(info) if isinstance(info, dict) else {}


def _rows_unit_or_zero(embeddings: np.ndarray) -> bool:
    norms = np.sqrt(np.einsum("ij,ij->i", embeddings, embeddings, dtype=np.float64))
    return bool(np.all((np.abs(norms - 1.0) < 1e-3) | (norms == 0.0)))


def _read_header(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, _HEADER)
    if not os.path.isfile(path):
        raise ValueError(f"{directory} is not a saved keras-dml index: {_HEADER} is missing.")
    try:
        with open(path) as f:
            header = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is truncated or corrupt: {error}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a keras-dml index header.")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version!r}; this keras-dml reads version "
            f"{FORMAT_VERSION}. Save the index again with a matching keras-dml."
        )
    required = ("index_class", "config", "size", "dim", "id_kind", "has_metadata", "files")
    missing = [key for key in required if key not in header]
    if missing:
        raise ValueError(f"{path} is missing the fields {missing}.")
    # Saves before the checksum existed have none; every save writes one now.
    if "header_sha256" in header and header["header_sha256"] != _header_digest(header):
        raise ValueError(
            f"{path} does not match its own checksum: it was edited after the save "
            "(its distance, config or sizes no longer describe the saved data)."
        )
    return header


def write_header(directory: str, header: dict[str, Any], info: dict | None = None) -> None:
    """Writes `index.json`: `header`, the caller's `info` if any, and the header's own digest."""
    if info is not None:
        header["info"] = info
    header["header_sha256"] = _header_digest(header)
    with open(os.path.join(directory, _HEADER), "w") as f:
        json.dump(header, f, indent=2)


def _header_digest(header: dict[str, Any]) -> str:
    content = {key: value for key, value in header.items() if key != "header_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _check_replaceable(directory: str) -> None:
    """Raises `FileExistsError` unless `directory` is empty or a saved index and nothing else."""
    if not os.path.isdir(directory) or os.path.islink(directory):
        raise FileExistsError(f"{directory} exists and is not a directory; refusing to replace it.")
    entries = os.listdir(directory)
    if not entries:
        return
    try:
        header = _read_header(directory)
    except ValueError as error:
        raise FileExistsError(
            f"{directory} is not empty and is not a saved index ({error}); refusing to replace it."
        ) from None
    listed = {name.split("/")[0] for name in header["files"]} | {_HEADER}
    foreign = sorted(set(entries) - listed)
    if foreign:
        raise FileExistsError(
            f"{directory} holds files the saved index did not write ({', '.join(foreign[:5])}); "
            "refusing to replace it. Move them or save elsewhere."
        )


def _verify_files(directory: str, header: dict[str, Any]) -> None:
    """Checks that exactly the listed files exist with the recorded size and hash."""
    listed = header["files"]
    for relative, expected in listed.items():
        path = os.path.join(directory, *relative.split("/"))
        if os.path.isabs(relative) or ".." in relative.split("/"):
            raise ValueError(f"{directory}: {_HEADER} lists an unsafe path {relative!r}.")
        if not os.path.isfile(path):
            raise ValueError(f"{directory}: {relative} is missing.")
        size = os.path.getsize(path)
        if size != expected["bytes"]:
            raise ValueError(
                f"{directory}: {relative} has {size} bytes, expected {expected['bytes']}; "
                "the file is truncated or comes from a different save."
            )
        if _sha256(path) != expected["sha256"]:
            raise ValueError(
                f"{directory}: {relative} does not match its checksum in {_HEADER}; it was "
                "modified or comes from a different save."
            )


def _load_npy(directory: str, name: str) -> np.ndarray:
    path = os.path.join(directory, name)
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"{path} cannot be read as a plain .npy array: {error}") from None
