"""An index split into shards that are searched together and merged exactly.

`ShardedIndex` holds `num_shards` indexes of any kind (`ExactIndex`,
`ScaNNIndex`, ...). `add` routes each item to a shard by a hash of its id;
`search` asks every shard for its own top `k` (in a thread pool) and merges
them: the global top `k` is always among the shards' top `k`s, so the merge
adds no error of its own. With `ExactIndex` shards the results equal one
`ExactIndex` over all items; with `ScaNNIndex` shards they are as good as the
shards' searches.

A saved `ShardedIndex` is a directory holding a manifest, `index.json` (the
same checksummed header as every saved index, with `index_class:
ShardedIndex`), and one saved index per shard in `shard-00000/`,
`shard-00001/`, ...; the manifest records each shard's size and the size and
SHA-256 of the shard's own `index.json`, whose checksums cover the shard's
data. `Index.load(directory)` recognises it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from keras_dml.index.base import (
    _HEADER,
    DISTANCES,
    FORMAT_NAME,
    FORMAT_VERSION,
    Index,
    _read_header,
    _sha256,
    check_k,
    check_matrix,
    check_metadata,
    coerce_ids,
    map_ids,
    write_header,
)

_SHARD_PREFIX = "shard-"

# splitmix64's finaliser: well-mixed, fast in NumPy and the same on every machine.
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


def shard_of_ids(ids, num_shards: int) -> np.ndarray:
    """Returns the shard (`0 .. num_shards - 1`) of each id, by a stable hash of the id.

    Integer ids go through splitmix64's finaliser, string ids through
    BLAKE2b of their UTF-8 bytes; both give the same shard on every machine,
    process and Python version (unlike Python's `hash`), so any writer (a
    data-processing pipeline, say) can place items where `ShardedIndex.add`
    would.

    Args:
        ids: 1-D array-like of integer or string ids.
        num_shards: number of shards, at least 1.

    Returns:
        int64 array of shard numbers, shaped like `ids`.

    Example:

    >>> from keras_dml.index.sharded import shard_of_ids
    >>> shard_of_ids([0, 1, 2, 3], num_shards=2).tolist()
    [0, 1, 0, 0]
    """
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"`num_shards` must be a positive integer, got {num_shards!r}.")
    ids = np.asarray(ids)
    if ids.size == 0:
        return np.zeros(ids.shape, np.int64)
    if ids.dtype.kind in "iu":
        with np.errstate(over="ignore"):
            z = ids.astype(np.int64).view(np.uint64)
            z = (z ^ (z >> np.uint64(30))) * _MIX_1
            z = (z ^ (z >> np.uint64(27))) * _MIX_2
            z = z ^ (z >> np.uint64(31))
        return (z % np.uint64(num_shards)).astype(np.int64)
    if ids.dtype.kind in "US":
        values = [
            int.from_bytes(hashlib.blake2b(str(key).encode(), digest_size=8).digest(), "little")
            for key in ids.reshape(-1).tolist()
        ]
        return (np.array(values, np.uint64) % np.uint64(num_shards)).astype(np.int64).reshape(
            ids.shape
        )
    raise ValueError(f"`ids` must be integers or strings, got dtype {ids.dtype}.")


def merge_top_k(
    ids: np.ndarray, scores: np.ndarray, k: int, higher_is_better: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Keeps the `k` best of each row of concatenated per-shard results, best first.

    Ties in score go to the smaller id, so the merge does not depend on the
    order of the shards.

    Args:
        ids: `(num_queries, m)` ids (int64 or unicode).
        scores: `(num_queries, m)` float32 scores.
        k: number to keep, `k <= m`.
        higher_is_better: scores are similarities (`"dot"`) rather than distances.

    Returns:
        `(ids, scores)`, each `(num_queries, k)`.
    """
    keys = -scores if higher_is_better else scores
    # lexsort sorts by the last key first: by score, then by id.
    order = np.lexsort((ids, keys), axis=1)[:, :k]
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)


def shard_name(number: int, num_shards: int) -> str:
    """The directory name of shard `number` of `num_shards` in a saved `ShardedIndex`."""
    width = max(5, len(str(num_shards - 1)))
    return f"{_SHARD_PREFIX}{number:0{width}d}"


def write_manifest(
    directory: str,
    shard_names: Sequence[str],
    config: dict[str, Any],
    info: dict[str, Any] | None = None,
) -> None:
    """Writes the manifest (`index.json`) of a `ShardedIndex` over saved shards.

    `ShardedIndex.save` calls it after writing its shards; a writer that
    saved the shards itself, one per worker (e.g. `keras_dml.beam`), calls it
    last so that `Index.load(directory)` opens them as one `ShardedIndex`.
    Sizes, dimension, id kind and metadata come from each shard's own
    (checksummed) `index.json`.

    Args:
        directory: the sharded index's directory, holding the shards.
        shard_names: each shard's directory, relative to `directory`, in
            shard order.
        config: `ShardedIndex.get_config()` of the index (`distance`,
            `normalize`, `num_shards`, `shard_class`, `shard_config`,
            `max_workers`).
        info: optional JSON-serialisable dict, as for `Index.save`.

    Raises:
        ValueError: if a shard's `index.json` is missing or not a saved index.
    """
    entries, files = [], {}
    size, dim, kinds, has_metadata = 0, None, set(), False
    for name in shard_names:
        header_path = os.path.join(directory, name, _HEADER)
        shard = _read_header(os.path.join(directory, name))
        files[f"{name}/{_HEADER}"] = {
            "bytes": os.path.getsize(header_path),
            "sha256": _sha256(header_path),
        }
        entries.append({"path": name, "index_class": shard["index_class"], "size": shard["size"]})
        size += shard["size"]
        if shard["size"]:
            dim = dim if dim is not None else shard["dim"]
            kinds.add(shard["id_kind"])
            has_metadata = has_metadata or bool(shard["has_metadata"])
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "index_class": "ShardedIndex",
        "config": dict(config),
        "size": size,
        "dim": dim,
        "id_kind": "str" if "str" in kinds else "int",
        "has_metadata": has_metadata,
        "shards": entries,
        # Each shard's own header: its checksums cover the shard's files.
        "files": dict(sorted(files.items())),
    }
    write_header(directory, header, info)


def _shard_class(name_or_class) -> type[Index]:
    if isinstance(name_or_class, type) and issubclass(name_or_class, Index):
        return name_or_class
    target = Index._registry.get(name_or_class)
    if target is None or target is Index or target is ShardedIndex:
        known = sorted(n for n in Index._registry if n not in ("Index", "ShardedIndex"))
        raise ValueError(f"`shard_class` must be one of {known}, got {name_or_class!r}.")
    return target


class ShardedIndex(Index):
    """Several indexes searched as one, with an exact merge of their results.

    Args:
        num_shards: number of shards (ignored when `shards` is given).
        shard_class: class (or class name, e.g. `"ExactIndex"`,
            `"ScaNNIndex"`) of the shards it creates.
        distance: `"dot"` or `"squared_l2"`, as for every index; every shard
            uses it.
        normalize: as for every index (defaults to True for `"dot"`).
        shard_config: further constructor arguments of each shard (e.g.
            ScaNN's `leaves_to_search`), JSON serialisable.
        shards: existing indexes to search together instead of new empty
            ones, e.g. shards built elsewhere; they must share `distance`,
            `normalize` and the id kind, and hold no id twice. `add` routes new
            items by `shard_of_ids`.
        max_workers: threads that search the shards at once. Defaults to
            `min(num_shards, os.cpu_count())`; 1 searches them one by one.

    `search` is thread-safe (several threads may search at once); `add`
    must not run beside a search.

    Raises:
        ValueError: for a bad `num_shards`, `shard_class`, `distance`, or
            shards that disagree.

    Example:

    >>> import numpy as np
    >>> from keras_dml.index import ExactIndex, ShardedIndex
    >>> vectors = np.random.default_rng(0).normal(size=(100, 8)).astype("float32")
    >>> sharded = ShardedIndex(num_shards=4, shard_class="ExactIndex")
    >>> sharded.add(vectors)
    >>> one = ExactIndex()
    >>> one.add(vectors)
    >>> bool((sharded.search(vectors[:5], k=3)[0] == one.search(vectors[:5], k=3)[0]).all())
    True
    """

    def __init__(
        self,
        num_shards: int = 2,
        shard_class: str | type[Index] = "ExactIndex",
        distance: str = "dot",
        normalize: bool | None = None,
        *,
        shard_config: dict[str, Any] | None = None,
        shards: Sequence[Index] | None = None,
        max_workers: int | None = None,
    ):
        super().__init__(distance=distance, normalize=normalize)
        if max_workers is not None and (
            isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1
        ):
            raise ValueError(
                f"`max_workers` must be a positive integer or None, got {max_workers!r}."
            )
        self.shard_config = dict(shard_config or {})
        json.dumps(self.shard_config)
        self.max_workers = max_workers
        if shards is not None:
            shards = list(shards)
            if not shards:
                raise ValueError("`shards` must hold at least one index.")
            self.shard_class = type(shards[0]).__name__
            self._set_shards(shards)
        else:
            if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
                raise ValueError(f"`num_shards` must be a positive integer, got {num_shards!r}.")
            target = _shard_class(shard_class)
            self.shard_class = target.__name__
            self._shards = [
                target(distance=self.distance, normalize=self.normalize, **self.shard_config)
                for _ in range(num_shards)
            ]
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def _set_shards(self, shards: list[Index]) -> None:
        dims = {shard.dim for shard in shards if shard.dim is not None}
        kinds = {shard.ids.dtype.kind for shard in shards if len(shard)}
        for number, shard in enumerate(shards):
            if not isinstance(shard, Index) or isinstance(shard, ShardedIndex):
                raise ValueError(f"Shard {number} is a {type(shard).__name__}, not an index.")
            if shard.distance != self.distance or shard.normalize != self.normalize:
                raise ValueError(
                    f"Shard {number} uses distance={shard.distance!r}, "
                    f"normalize={shard.normalize}; the sharded index uses "
                    f"distance={self.distance!r}, normalize={self.normalize}."
                )
        if len(dims) > 1:
            raise ValueError(f"The shards hold vectors of different dimensions {sorted(dims)}.")
        if len(kinds) > 1:
            raise ValueError("Some shards hold integer ids and others string ids.")
        total = sum(len(shard) for shard in shards)
        if total and np.unique(np.concatenate([s.ids for s in shards if len(s)])).size != total:
            raise ValueError("The shards hold some ids more than once.")
        self._shards = shards

    # ------------------------------------------------------------------ state

    @property
    def shards(self) -> list[Index]:
        """The shard indexes, in shard order (do not add to them directly)."""
        return list(self._shards)

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def __len__(self) -> int:
        return sum(len(shard) for shard in self._shards)

    def __repr__(self) -> str:
        return (
            f"ShardedIndex(size={len(self)}, dim={self.dim}, distance={self.distance!r}, "
            f"num_shards={self.num_shards}, shard_class={self.shard_class!r})"
        )

    @property
    def dim(self) -> int | None:
        for shard in self._shards:
            if shard.dim is not None:
                return shard.dim
        return None

    def _filled(self) -> list[Index]:
        return [shard for shard in self._shards if len(shard)]

    @property
    def embeddings(self) -> np.ndarray:
        """All stored vectors, shard after shard (a copy)."""
        filled = self._filled()
        if not filled:
            return np.zeros((0, self.dim or 0), np.float32)
        return np.concatenate([shard.embeddings for shard in filled])

    @property
    def ids(self) -> np.ndarray:
        """All ids, shard after shard (in the order of `embeddings`)."""
        filled = self._filled()
        if not filled:
            return np.zeros((0,), np.int64)
        return np.concatenate([shard.ids for shard in filled])

    @property
    def metadata(self) -> list[Any] | None:
        filled = self._filled()
        if all(shard.metadata is None for shard in filled):
            return None
        out: list[Any] = []
        for shard in filled:
            out.extend(shard.metadata if shard.metadata is not None else [None] * len(shard))
        return out

    def _id_kind(self) -> str | None:
        for shard in self._filled():
            return shard.ids.dtype.kind
        return None

    # ---------------------------------------------------------------- adding

    def add(self, embeddings, ids=None, metadata=None) -> None:
        """Adds items, each to the shard `shard_of_ids` picks for its id.

        Everything is checked before any shard changes, with the same rules
        and errors as `Index.add`.
        """
        x = check_matrix(embeddings, "embeddings", self.dim)
        n = x.shape[0]
        ids = self._check_sharded_ids(ids, n)
        metadata = check_metadata(metadata, n)
        if n == 0:
            return
        where = shard_of_ids(ids, self.num_shards)
        for number, shard in enumerate(self._shards):
            rows = np.flatnonzero(where == number)
            if rows.size == 0:
                continue
            shard.add(
                x[rows],
                ids=ids[rows],
                metadata=None if metadata is None else [metadata[row] for row in rows],
            )

    def _check_sharded_ids(self, ids, n: int) -> np.ndarray:
        kind = self._id_kind()
        if ids is None:
            if kind == "U":
                raise ValueError("`ids` are required: this index holds string ids.")
            start = int(max(int(s.ids.max()) for s in self._filled())) + 1 if len(self) else 0
            return np.arange(start, start + n, dtype=np.int64)
        ids = coerce_ids(ids, n, kind)
        # Shards given by the caller need not follow the hash: look everywhere.
        for shard in self._filled():
            table = shard._lookup()
            if any(key in table for key in ids.tolist()):
                raise ValueError("`ids` contains ids that are already in the index.")
        return ids

    # -------------------------------------------------------------- searching

    def _executor(self) -> ThreadPoolExecutor | None:
        workers = self.max_workers or min(self.num_shards, os.cpu_count() or 1)
        if workers <= 1 or self.num_shards == 1:
            return None
        if self._pool is None:
            with self._pool_lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(workers, thread_name_prefix="keras-dml-shard")
        return self._pool

    def search(self, queries, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Searches every shard for its top `k` and merges them exactly.

        Same arguments, results and errors as `Index.search`; ties in score
        are ordered by id.
        """
        k = check_k(k, len(self))
        queries = np.asarray(queries, dtype=np.float32)
        single = queries.ndim == 1
        if single:
            queries = queries[None]
        queries = check_matrix(queries, "queries", self.dim, rows="num_queries")
        filled = self._filled()
        if queries.shape[0] == 0:
            kind = filled[0].ids.dtype
            ids, scores = np.zeros((0, k), kind), np.zeros((0, k), np.float32)
        else:
            def one(shard):
                return shard.search(queries, min(k, len(shard)))

            pool = self._executor() if len(filled) > 1 else None
            found = list(pool.map(one, filled)) if pool is not None else [one(s) for s in filled]
            if len(found) == 1:
                ids, scores = found[0]
            else:
                ids = np.concatenate([f[0] for f in found], axis=1)
                scores = np.concatenate([f[1] for f in found], axis=1)
                ids, scores = merge_top_k(ids, scores, k, self.higher_is_better)
        if single:
            return ids[0], scores[0]
        return ids, scores

    def get_metadata(self, ids) -> list[Any]:
        """Returns the metadata of `ids`, looked up in whichever shard holds each."""
        array = np.asarray(ids)
        tables = [(shard._lookup(), shard._metadata) for shard in self._filled()]

        def fetch(key):
            for table, metadata in tables:
                row = table.get(key)
                if row is not None:
                    return None if metadata is None else metadata[row]
            raise KeyError(f"Id {key!r} is not in the index.")

        return map_ids(array, fetch)

    def build(self) -> None:
        """Builds every shard's searcher now (for shards that have one, e.g. ScaNN)."""
        for shard in self._filled():
            build = getattr(shard, "build", None)
            if build is not None:
                build()

    def close(self) -> None:
        """Stops the search threads (a later search starts them again)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)

    # ----------------------------------------------------------------- config

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            num_shards=self.num_shards,
            shard_class=self.shard_class,
            shard_config=dict(self.shard_config),
            max_workers=self.max_workers,
        )
        return config

    # ------------------------------------------------------------ persistence

    def _write(self, directory: str, info: dict[str, Any] | None = None) -> None:
        names = []
        for number, shard in enumerate(self._shards):
            name = shard_name(number, self.num_shards)
            os.makedirs(os.path.join(directory, name))
            shard._write(os.path.join(directory, name))
            names.append(name)
        write_manifest(directory, names, config=self.get_config(), info=info)

    @classmethod
    def _load_saved(cls, directory: str, header: dict[str, Any]) -> ShardedIndex:
        entries = header.get("shards")
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{directory}: {_HEADER} lists no shards.")
        config = dict(header["config"])
        if config.get("distance") not in DISTANCES:
            raise ValueError(f"{directory}: {_HEADER} has an unknown distance.")
        total = len(entries)
        shards = []
        for number, entry in enumerate(entries):
            name = entry.get("path") if isinstance(entry, dict) else None
            label = f"shard {number} of {total} ({name!r})"
            if (
                not isinstance(name, str)
                or os.path.isabs(name)
                or ".." in name.replace("\\", "/").split("/")
            ):
                raise ValueError(f"{directory}: {_HEADER} lists an unsafe path for {label}.")
            path = os.path.join(directory, name)
            if not os.path.isdir(path):
                raise ValueError(f"{directory}: {label} is missing: no directory {path}.")
            expected = header["files"].get(f"{name}/{_HEADER}")
            shard_header = os.path.join(path, _HEADER)
            if expected is None:
                raise ValueError(f"{directory}: {_HEADER} has no checksum for {label}.")
            if not os.path.isfile(shard_header):
                raise ValueError(f"{directory}: {label} is missing its {_HEADER}.")
            if (
                os.path.getsize(shard_header) != expected["bytes"]
                or _sha256(shard_header) != expected["sha256"]
            ):
                raise ValueError(
                    f"{directory}: {label} has an {_HEADER} that does not match the manifest; "
                    "it is truncated or comes from a different save."
                )
            try:
                shard = Index.load(path)
            except (ValueError, FileNotFoundError) as error:
                raise ValueError(f"{directory}: {label} cannot be loaded: {error}") from None
            if len(shard) != entry.get("size"):
                raise ValueError(
                    f"{directory}: {label} holds {len(shard)} items; the manifest says "
                    f"{entry.get('size')}."
                )
            shards.append(shard)
        index = cls(
            distance=config["distance"],
            normalize=config.get("normalize"),
            shard_config=config.get("shard_config"),
            shards=shards,
            max_workers=config.get("max_workers"),
        )
        if len(index) != header["size"]:
            raise ValueError(
                f"{directory}: the shards hold {len(index)} items; {_HEADER} says {header['size']}."
            )
        return index
