"""A nearest-neighbour index stored in Milvus: Milvus Lite (a local file) or a Milvus server.

Needs the optional extra `keras-dml[milvus]` (`pymilvus` and `milvus-lite`).

The vectors live in one Milvus collection with an INT64 primary key `id`, a
FLOAT_VECTOR field `vector` and a nullable JSON field `metadata`. Distances
map onto Milvus metrics:

| keras-dml `distance` | Milvus metric | score |
| --- | --- | --- |
| `"dot"` (normalised by default: cosine) | `IP` | inner product, larger is closer |
| `"squared_l2"` | `L2` | squared euclidean distance (Milvus's `L2` is already squared) |

Vectors are normalised by keras-dml before they reach Milvus (as in the other
indexes), so `"dot"` with `normalize=True` gives cosine similarities.

`save(directory)` does not copy the collection: it flushes it and writes an
`index.json` that records where it is (URI and collection), its size and
dimension; `Index.load(directory)` reconnects and checks that the collection
still holds that many vectors of that dimension.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from keras_dml.index.base import (
    _HEADER,
    FORMAT_NAME,
    FORMAT_VERSION,
    Index,
    _header_digest,
    check_k,
    check_matrix,
    check_metadata,
    l2_normalize_rows,
    map_ids,
)

_METRICS = {"dot": "IP", "squared_l2": "L2"}
_ID, _VECTOR, _METADATA = "id", "vector", "metadata"
# Rows per insert and per id query: keeps each gRPC message well below its 64 MiB limit.
_INSERT_BATCH = 5_000
# Queries per search call.
_SEARCH_BATCH = 1_000


def _pymilvus():
    try:
        import pymilvus
    except ImportError as error:
        raise ImportError(
            "MilvusIndex needs pymilvus and milvus-lite: pip install 'keras-dml[milvus]'"
        ) from error
    return pymilvus


class MilvusIndex(Index):
    """Nearest-neighbour index in a Milvus collection, with the API of the other indexes.

    Args:
        uri: a local file path ending in `.db` (Milvus Lite, embedded: it
            starts a local Milvus process for the file) or a server URI such
            as `http://host:19530`.
        collection: collection name. An existing collection is opened (its
            metric must match `distance`); otherwise it is created on the
            first `add`.
        distance: `"dot"` or `"squared_l2"`.
        normalize: L2-normalise vectors and queries (default: True for `"dot"`).
        index_type: Milvus index type; `"FLAT"` (the default) is exact.
            Others (e.g. `"IVF_FLAT"`, `"HNSW"` on a server) are approximate.
        index_params: Milvus build parameters of `index_type` (e.g. `{"nlist": 1024}`).
        search_params: Milvus search parameters (e.g. `{"nprobe": 16}`).
        token: credentials of a Milvus server ("user:password" or an API
            key). Never written by `save`; pass it again with `MilvusIndex(...)`
            to reopen a server collection that needs it.
        timeout: seconds each Milvus call may take.

    Only integer ids (int64) are supported.

    Call `close()` (or use `with MilvusIndex(...) as index:`) when done; for
    Milvus Lite it stops the local process once no client uses the file.

    Example (needs `keras-dml[milvus]`):

    >>> import numpy as np, os, tempfile
    >>> from keras_dml.index import MilvusIndex
    >>> path = os.path.join(tempfile.mkdtemp(), "gallery.db")
    >>> with MilvusIndex(path) as index:  # doctest: +SKIP
    ...     index.add(np.eye(3, dtype="float32"), ids=[10, 20, 30])
    ...     index.search(np.array([[0.0, 2.0, 0.1]], "float32"), k=2)[0].tolist()
    [[20, 30]]
    """

    def __init__(
        self,
        uri: str = "keras_dml_milvus.db",
        collection: str = "keras_dml_index",
        distance: str = "dot",
        normalize: bool | None = None,
        *,
        index_type: str = "FLAT",
        index_params: dict[str, Any] | None = None,
        search_params: dict[str, Any] | None = None,
        token: str | None = None,
        timeout: float | None = 60.0,
    ):
        super().__init__(distance=distance, normalize=normalize)
        pymilvus = _pymilvus()
        uri = os.fspath(uri)
        if "://" not in uri:
            if not uri.endswith(".db"):
                raise ValueError(
                    f"A Milvus Lite `uri` must be a file path ending in .db, got {uri!r}."
                )
            uri = os.path.abspath(uri)
            os.makedirs(os.path.dirname(uri), exist_ok=True)
        self.uri = uri
        self.collection = str(collection)
        self.index_type = str(index_type)
        self.index_params = dict(index_params or {})
        self.search_params = dict(search_params or {})
        self.timeout = timeout
        json.dumps([self.index_params, self.search_params])
        kwargs = {"token": token} if token else {}
        self._client = pymilvus.MilvusClient(uri, **kwargs)
        self._size = 0
        self._dim: int | None = None
        self._has_metadata = False
        self._next_id = 0
        if self._client.has_collection(self.collection, timeout=timeout):
            self._open_existing()

    # ------------------------------------------------------------- lifecycle

    @property
    def client(self):
        """The `pymilvus.MilvusClient` (for filters, partitions, anything else Milvus offers)."""
        return self._client

    def close(self) -> None:
        """Closes the connection (Milvus Lite stops when no client uses the file)."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def __enter__(self) -> MilvusIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _live(self):
        if self._client is None:
            raise ValueError("This MilvusIndex is closed.")
        return self._client

    def _open_existing(self) -> None:
        client = self._live()
        schema = client.describe_collection(self.collection, timeout=self.timeout)
        fields = {field["name"]: field for field in schema["fields"]}
        if _VECTOR not in fields or _ID not in fields:
            raise ValueError(
                f"Milvus collection {self.collection!r} at {self.uri} was not written by "
                f"MilvusIndex: it has no {_ID!r} and {_VECTOR!r} fields."
            )
        self._dim = int(fields[_VECTOR]["params"]["dim"])
        metric = client.describe_index(self.collection, _VECTOR, timeout=self.timeout).get(
            "metric_type"
        )
        if metric != _METRICS[self.distance]:
            raise ValueError(
                f"Milvus collection {self.collection!r} at {self.uri} uses the {metric} metric; "
                f"distance={self.distance!r} needs {_METRICS[self.distance]}."
            )
        client.load_collection(self.collection, timeout=self.timeout)
        count = client.query(
            self.collection, filter="", output_fields=["count(*)"], timeout=self.timeout
        )
        self._size = int(count[0]["count(*)"])
        if self._size:
            self._next_id = self._max_id() + 1
            found = client.query(
                self.collection, filter=f"{_METADATA} is not null", limit=1,
                output_fields=[_ID], timeout=self.timeout,
            )
            self._has_metadata = bool(found)

    def _max_id(self) -> int:
        largest = None
        iterator = self._live().query_iterator(
            self.collection, batch_size=10_000, output_fields=[_ID], timeout=self.timeout
        )
        try:
            while True:
                batch = iterator.next()
                if not batch:
                    break
                top = max(row[_ID] for row in batch)
                largest = top if largest is None else max(largest, top)
        finally:
            iterator.close()
        return -1 if largest is None else int(largest)

    def _create(self, dim: int) -> None:
        pymilvus = _pymilvus()
        client = self._live()
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(_ID, pymilvus.DataType.INT64, is_primary=True)
        schema.add_field(_VECTOR, pymilvus.DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field(_METADATA, pymilvus.DataType.JSON, nullable=True)
        params = client.prepare_index_params()
        params.add_index(
            field_name=_VECTOR,
            index_type=self.index_type,
            metric_type=_METRICS[self.distance],
            params=self.index_params,
        )
        client.create_collection(
            self.collection, schema=schema, index_params=params, timeout=self.timeout
        )
        self._dim = dim

    # ------------------------------------------------------------------ state

    def __len__(self) -> int:
        return self._size

    @property
    def dim(self) -> int | None:
        return self._dim

    @property
    def embeddings(self) -> np.ndarray:
        raise NotImplementedError(
            "MilvusIndex keeps its vectors in Milvus; query them with `index.client.query`."
        )

    @property
    def ids(self) -> np.ndarray:
        raise NotImplementedError(
            "MilvusIndex keeps its ids in Milvus; query them with `index.client.query_iterator`."
        )

    @property
    def metadata(self) -> list[Any] | None:
        raise NotImplementedError(
            "MilvusIndex keeps its metadata in Milvus; use `get_metadata(ids)`."
        )

    # ---------------------------------------------------------------- adding

    def add(self, embeddings, ids=None, metadata=None) -> None:
        """Inserts items into the collection (created on the first call).

        Same checks and errors as `Index.add`; ids must be integers.
        """
        x = check_matrix(embeddings, "embeddings", self._dim)
        n = x.shape[0]
        ids = self._check_milvus_ids(ids, n)
        metadata = check_metadata(metadata, n)
        if n == 0:
            return
        if self.normalize:
            x = l2_normalize_rows(x)
        if self._dim is None:
            self._create(x.shape[1])
        client = self._live()
        id_list = ids.tolist()
        for start in range(0, n, _INSERT_BATCH):
            stop = min(n, start + _INSERT_BATCH)
            rows = [
                {
                    _ID: id_list[row],
                    _VECTOR: x[row],
                    # Wrapped so that any JSON value (a string, a list) fits Milvus's JSON field.
                    _METADATA: None if metadata is None else {"value": metadata[row]},
                }
                for row in range(start, stop)
            ]
            client.insert(self.collection, rows, timeout=self.timeout)
        self._size += n
        self._next_id = max(self._next_id, int(ids.max()) + 1)
        self._has_metadata = self._has_metadata or metadata is not None

    def _check_milvus_ids(self, ids, n: int) -> np.ndarray:
        if ids is None:
            return np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.shape[0] != n:
            raise ValueError(f"`ids` must be a 1-D sequence of {n} ids, got shape {ids.shape}.")
        if n == 0:
            return ids.astype(np.int64)
        if ids.dtype.kind not in "iu":
            raise ValueError(
                f"`ids` must be integers: MilvusIndex stores int64 ids, got dtype {ids.dtype}."
            )
        if ids.dtype.kind == "u" and ids.max() > np.iinfo(np.int64).max:
            raise ValueError(f"`ids` holds {ids.max()}, beyond the int64 range.")
        ids = ids.astype(np.int64)
        if np.unique(ids).shape[0] != n:
            raise ValueError("`ids` contains duplicates.")
        if self._size and self._existing(ids.tolist()):
            raise ValueError("`ids` contains ids that are already in the index.")
        return ids

    def _existing(self, keys: list[int]) -> list[dict[str, Any]]:
        found = []
        for start in range(0, len(keys), _INSERT_BATCH):
            found += self._live().query(
                self.collection,
                ids=keys[start : start + _INSERT_BATCH],
                output_fields=[_ID, _METADATA],
                timeout=self.timeout,
            )
        return found

    # -------------------------------------------------------------- searching

    def search(self, queries, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Finds the `k` nearest items in Milvus; same arguments, results and errors as
        `Index.search` (ties in score are ordered by id)."""
        k = check_k(k, self._size)
        queries = np.asarray(queries, dtype=np.float32)
        single = queries.ndim == 1
        if single:
            queries = queries[None]
        queries = check_matrix(queries, "queries", self._dim, rows="num_queries")
        if self.normalize:
            queries = l2_normalize_rows(queries)
        ids = np.zeros((queries.shape[0], k), np.int64)
        scores = np.zeros((queries.shape[0], k), np.float32)
        params = {"metric_type": _METRICS[self.distance], "params": self.search_params}
        client = self._live()
        for start in range(0, queries.shape[0], _SEARCH_BATCH):
            block = queries[start : start + _SEARCH_BATCH]
            hits = client.search(
                self.collection,
                data=list(block),
                limit=k,
                search_params=params,
                anns_field=_VECTOR,
                output_fields=[],
                timeout=self.timeout,
            )
            for offset, row in enumerate(hits):
                if len(row) != k:
                    raise RuntimeError(
                        f"Milvus returned {len(row)} results instead of {k}; the collection "
                        f"{self.collection!r} changed or its index is approximate."
                    )
                ids[start + offset] = [hit["id"] for hit in row]
                scores[start + offset] = [hit["distance"] for hit in row]
        # Milvus does not promise an order among equal scores: order them by id.
        keys = -scores if self.higher_is_better else scores
        order = np.lexsort((ids, keys), axis=1)
        ids = np.take_along_axis(ids, order, axis=1)
        scores = np.take_along_axis(scores, order, axis=1)
        if self.distance == "squared_l2":
            # Rounding can push the distance of (near-)duplicates below 0.
            scores = np.maximum(scores, 0.0)
        if single:
            return ids[0], scores[0]
        return ids, scores

    def get_metadata(self, ids) -> list[Any]:
        """Returns the metadata of `ids` (None where none was given), fetched from Milvus.

        Raises:
            KeyError: if an id is not in the index.
        """
        array = np.asarray(ids)
        keys = sorted({int(key) for key in array.reshape(-1).tolist()})
        found = {row[_ID]: row.get(_METADATA) for row in self._existing(keys)} if keys else {}

        def fetch(key):
            if int(key) not in found:
                raise KeyError(f"Id {key!r} is not in the index.")
            value = found[int(key)]
            return None if value is None else value.get("value")

        return map_ids(array, fetch)

    # ----------------------------------------------------------------- config

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            uri=self.uri,
            collection=self.collection,
            index_type=self.index_type,
            index_params=dict(self.index_params),
            search_params=dict(self.search_params),
            timeout=self.timeout,
        )
        return config

    # ------------------------------------------------------------ persistence

    def _write(self, directory: str, info: dict[str, Any] | None = None) -> None:
        if self._size:
            self._live().flush(self.collection, timeout=self.timeout)
        header = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "index_class": type(self).__name__,
            "config": self.get_config(),
            "size": self._size,
            "dim": self._dim,
            "id_kind": "int",
            "has_metadata": self._has_metadata,
            # The data stays in Milvus: nothing but this header is written.
            "files": {},
        }
        if info is not None:
            header["info"] = info
        header["header_sha256"] = _header_digest(header)
        with open(os.path.join(directory, _HEADER), "w") as f:
            json.dump(header, f, indent=2)

    @classmethod
    def _load_saved(cls, directory: str, header: dict[str, Any]) -> MilvusIndex:
        config = dict(header["config"])
        if "://" not in config.get("uri", "") and not os.path.exists(config.get("uri", "")):
            raise ValueError(
                f"{directory}: the Milvus Lite file {config.get('uri')!r} it points to is missing."
            )
        index = cls(**config)
        if index._size != header["size"] or (header["size"] and index._dim != header["dim"]):
            found = (index._size, index._dim)
            index.close()
            raise ValueError(
                f"{directory}: Milvus collection {config['collection']!r} at {config['uri']} "
                f"holds {found[0]} vectors of dimension {found[1]}; the save recorded "
                f"{header['size']} of dimension {header['dim']}."
            )
        return index
