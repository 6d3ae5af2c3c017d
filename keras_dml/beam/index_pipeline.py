"""Embed a gallery and index it in shards on Apache Beam: the `keras-dml index` pipeline.

    items (TFRecords | image files | a TFDS split)
      -> decode, fit to the model's input        (failures -> dead letter)
      -> RunInference(KerasModelHandler), batched (failures, NaN -> dead letter)
      -> shard by id hash (`shard_of_ids`) or by nearest k-means centre
      -> per shard: embeddings/shard-NNNNN.npz (ids, raw embeddings, metadata)
                    index/shard-NNNNN/         (an ExactIndex or ScaNNIndex, saved)
      -> index/index.json, the `ShardedIndex` manifest (`write_manifest`)

`Index.load(out + "/index")` opens the result as one `ShardedIndex`. Items
that fail go, one JSON line each (`source`, `id`, `stage`, `error`), to
`out/dead_letter/`, and are counted in the Beam metrics
(`keras_dml.beam.index` namespace, counters `dead_letter_decode`,
`dead_letter_embed`, `dead_letter_index`, and `indexed`); the pipeline
finishes. A batch that fails to embed is bisected and retried by
`KerasModelHandler`, so only the items that fail on their own go to the dead
letter (`embed_batches_split` in the summary counts the splits).
`out/pipeline.json` records the options and counts.

The local runner is Beam's in-process `FnApiRunner` (what `DirectRunner` uses
for batch pipelines, without first trying to start Prism, which needs a
download); `direct_num_workers` with `direct_running_mode=multi_processing`
sets its parallelism (`multi_threading` is refused: `refuse_multi_threading`). Any other runner is
chosen by standard Beam pipeline options, e.g.
`["--runner=DataflowRunner", "--project=...", "--region=...",
"--temp_location=gs://..."]`, `["--runner=FlinkRunner", "--flink_master=..."]`
or `["--runner=SparkRunner", ...]`; `out` must then be a path every worker
can write (these runners are documented, not tested here).
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import threading
import time
from collections.abc import Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from keras_dml.beam.checks import OUTPUT_ENTRIES, check_output_dir, parse_source
from keras_dml.beam.model_handler import (
    METRICS_NAMESPACE,
    EmbedFailure,
    KerasModelHandler,
    fit_image,
    load_embedder,
)
from keras_dml.index import ExactIndex, Index, ScaNNIndex
from keras_dml.index.sharded import shard_name, shard_of_ids, write_manifest

NAMESPACE = "keras_dml.beam.index"
COUNTERS = ("read", "dead_letter_decode", "dead_letter_embed", "dead_letter_index", "indexed")
INDEX_KINDS = {"exact": ExactIndex, "scann": ScaNNIndex}
SHARD_BY = ("hash", "kmeans")
_BUILD_LOCK = threading.Lock()
_DEAD = "dead_letter"


# -- sources ----------------------------------------------------------------------------


def _feature_value(feature) -> Any:
    kind = feature.WhichOneof("kind")
    values = list(getattr(feature, kind).value) if kind else []
    if kind == "bytes_list":
        values = [v.decode("utf-8", "replace") for v in values]
    return values


def decode_example(record: bytes, image_feature: str = "image", id_feature: str = "id"):
    """Decodes a serialised `tf.train.Example` into `(id, image array, metadata)`.

    The image is an encoded image (PNG, JPEG, ... as bytes) or raw values (a
    float or int64 list, reshaped by `fit_image` to the model's input). The id
    is an int64 or a bytes feature; every other single-valued feature becomes
    metadata.

    Raises:
        ValueError: if the record is not an Example or lacks the features.
    """
    import tensorflow as tf

    example = tf.train.Example.FromString(record)
    features = example.features.feature
    if id_feature not in features or image_feature not in features:
        raise ValueError(
            f"record lacks the {id_feature!r} or {image_feature!r} feature "
            f"(it has {sorted(features)})"
        )
    ids = _feature_value(features[id_feature])
    if len(ids) != 1:
        raise ValueError(f"feature {id_feature!r} must hold one value, got {len(ids)}")
    image = features[image_feature]
    if image.WhichOneof("kind") == "bytes_list":
        if len(image.bytes_list.value) != 1:
            raise ValueError(f"feature {image_feature!r} must hold one encoded image")
        array = decode_image_bytes(image.bytes_list.value[0])
    elif image.WhichOneof("kind") == "float_list":
        array = np.asarray(image.float_list.value, np.float32)
    else:
        array = np.asarray(image.int64_list.value, np.int64).astype(np.uint8)
    metadata = {}
    for name in sorted(features):
        if name in (id_feature, image_feature):
            continue
        values = _feature_value(features[name])
        if len(values) == 1:
            metadata[name] = values[0]
    return ids[0], array, metadata


def decode_image_bytes(data: bytes) -> np.ndarray:
    """Decodes PNG/JPEG/... bytes into a uint8 `(height, width[, channels])` array."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.mode not in ("L", "RGB", "RGBA"):
            image = image.convert("RGB")
        return np.asarray(image)


class _Decode(beam.DoFn):
    """(source, payload) -> (id, fitted input, metadata); failures to the dead letter."""

    def __init__(self, kind: str, input_shape, image_feature: str, id_feature: str):
        self._kind = kind
        self._input_shape = tuple(input_shape)
        self._image_feature = image_feature
        self._id_feature = id_feature
        self._read = Metrics.counter(NAMESPACE, "read")
        self._dead = Metrics.counter(NAMESPACE, "dead_letter_decode")

    def process(self, element):
        source, payload = element
        self._read.inc()
        item_id = None
        try:
            if self._kind == "tfrecord":
                item_id, array, metadata = decode_example(
                    payload, self._image_feature, self._id_feature
                )
            elif self._kind == "images":
                item_id, metadata = source, {"path": source}
                array = decode_image_bytes(payload)
            else:  # tfds: a decoded example dict (of tensors)
                payload = {
                    key: value.numpy() if hasattr(value, "numpy") else value
                    for key, value in payload.items()
                }
                item_id = payload["tfds_id"]
                if isinstance(item_id, bytes):
                    item_id = item_id.decode()
                array = np.asarray(payload[self._image_feature])
                metadata = {
                    key: value.item() if isinstance(value, np.generic) else value
                    for key, value in payload.items()
                    if key not in (self._image_feature, "tfds_id")
                    and np.ndim(value) == 0 and not isinstance(value, bytes)
                }
            json.dumps(metadata)
            yield item_id, fit_image(array, self._input_shape), metadata
        except Exception as error:  # noqa: BLE001 - every bad item goes to the dead letter
            self._dead.inc()
            yield beam.pvalue.TaggedOutput(
                _DEAD, _dead_record(source, item_id, "decode", error)
            )


def _dead_record(source, item_id, stage: str, error) -> str:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    message = " ".join(text.split())
    if isinstance(item_id, np.generic):
        item_id = item_id.item()
    if item_id is not None and not isinstance(item_id, (int, str)):
        item_id = repr(item_id)  # whatever it is, the dead letter stays JSON
    return json.dumps({"source": str(source), "id": item_id, "stage": stage, "error": message})


def _read_source(pipeline, kind: str, rest: str, data_dir: str | None):
    if kind == "tfrecord":
        return (
            pipeline
            | "ReadTFRecords" >> beam.io.ReadFromTFRecord(rest)
            | "TFRecordPairs" >> beam.Map(lambda record: (rest, record))
        )
    if kind == "images":
        from apache_beam.io import fileio

        return (
            pipeline
            | "MatchImages" >> fileio.MatchFiles(rest)
            | "ReadImages" >> fileio.ReadMatches()
            | "ImageBytes" >> beam.Map(lambda f: (f.metadata.path, f.read()))
        )
    import tensorflow_datasets as tfds

    name, split = rest.split(":")
    builder = tfds.builder(name, data_dir=data_dir)
    return (
        pipeline
        | "ReadTFDS" >> tfds.beam.ReadFromTFDS(
            builder, split=split, read_config=tfds.ReadConfig(add_tfds_id=True),
            decoders=None,
        )
        | "TFDSPairs" >> beam.Map(lambda example: (f"tfds:{name}:{split}", example))
    )


# -- embedding --------------------------------------------------------------------------


class _CheckEmbedding(beam.DoFn):
    """(key, PredictionResult) -> (id, embedding, metadata); failures, NaN to the dead letter."""

    def __init__(self):
        self._dead = Metrics.counter(NAMESPACE, "dead_letter_embed")

    def process(self, element):
        (item_id, metadata_json), result = element
        if isinstance(result.inference, EmbedFailure):  # failed alone, after bisection
            self._dead.inc()
            yield beam.pvalue.TaggedOutput(
                _DEAD, _dead_record("model", item_id, "embed", result.inference.error)
            )
            return
        embedding = np.asarray(result.inference, np.float32).reshape(-1)
        if not np.all(np.isfinite(embedding)):
            self._dead.inc()
            yield beam.pvalue.TaggedOutput(
                _DEAD,
                _dead_record("model", item_id, "embed", ValueError("non-finite embedding")),
            )
            return
        yield item_id, embedding, json.loads(metadata_json)


class _FailedBatch(beam.DoFn):
    """A batch RunInference could not embed -> one dead-letter line per item.

    `KerasModelHandler` bisects a failing batch itself, so only what escapes
    it (e.g. the model fails to load) reaches this.
    """

    def __init__(self):
        self._dead = Metrics.counter(NAMESPACE, "dead_letter_embed")

    def process(self, element):
        batch, error = element
        error = error[1] if isinstance(error, tuple) and len(error) > 1 else error
        for item in batch if isinstance(batch, (list, tuple)) else [batch]:
            key = item[0] if isinstance(item, tuple) else (None, None)
            self._dead.inc()
            yield _dead_record("model", key[0], "embed", error)


# -- sharding ---------------------------------------------------------------------------


def train_kmeans(sample: Sequence[np.ndarray], num_centres: int, normalize: bool,
                 iterations: int = 20, seed: int = 0) -> np.ndarray:
    """Lloyd's k-means (k-means++ start, seeded) on a sample: the shards' coarse centres.

    Args:
        sample: embeddings to train on.
        num_centres: number of centres (= shards).
        normalize: L2-normalise the sample first (cosine indexes).
        iterations: Lloyd iterations.
        seed: seed of the k-means++ draw.

    Returns:
        float32 `(num_centres, dim)` centres.
    """
    x = np.asarray(list(sample), np.float32)
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if len(x) < num_centres:
        raise ValueError(f"k-means sharding needs at least {num_centres} items, got {len(x)}")
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, num_centres):
        d2 = np.min(((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        total = d2.sum()
        probs = d2 / total if total > 0 else np.full(len(x), 1.0 / len(x))
        centres.append(x[rng.choice(len(x), p=probs)])
    centres = np.asarray(centres, np.float32)
    for _ in range(iterations):
        assign = np.argmin(((x[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
        for c in range(num_centres):
            members = x[assign == c]
            if len(members):
                centres[c] = members.mean(axis=0)
    return centres


def _nearest_centre(embedding: np.ndarray, centres: np.ndarray, normalize: bool) -> int:
    x = embedding / max(float(np.linalg.norm(embedding)), 1e-12) if normalize else embedding
    return int(np.argmin(((centres - x[None]) ** 2).sum(-1)))


def refuse_multi_threading(options: PipelineOptions) -> None:
    """Raises if the options pick the local runner's `multi_threading` mode.

    On Beam 2.77, `direct_running_mode=multi_threading` (any
    `direct_num_workers`) silently dropped items between a FlatMap and a
    GroupByKey: 509 of 200,000 and 11,899 of 1,000,000 in plain Beam, no
    error raised (`benchmarks/repro_beam_multithreading.py`, BENCHMARKS.md).
    A gallery index that silently misses items is worse than a slow one, so
    this pipeline refuses that mode.

    Raises:
        ValueError: naming the safe modes.
    """
    if options.get_all_options().get("direct_running_mode") == "multi_threading":
        raise ValueError(
            "direct_running_mode=multi_threading is refused: on Beam 2.77 it silently "
            "dropped items before a GroupByKey (see BENCHMARKS.md); use in_memory (the "
            "default) or multi_processing (--workers N)"
        )


def _hash_shard(item_id, num_shards: int) -> int:
    return int(shard_of_ids(np.asarray([item_id]), num_shards)[0])


def _pack(item):
    """(id, embedding, metadata) -> (id, float32 bytes, metadata), before any shuffle.

    NumPy arrays cross Beam's shuffles pickled (`FastPrimitivesCoder`'s
    fallback). On the local runner with `direct_running_mode=multi_threading`
    a GroupByKey of ~50k+ pickled float32 arrays came out corrupt (Beam 2.77:
    `Invalid PaneInfoEncoding`, `None` items, or the process growing past
    5-7 GB while decoding garbage lengths), while the same data as `bytes`
    went through (that mode still drops items, so `build_index` refuses it;
    see `refuse_multi_threading`). Bytes are also smaller and cheaper to
    encode than pickles.
    """
    item_id, embedding, metadata = item
    return item_id, np.asarray(embedding, "<f4").reshape(-1).tobytes(), metadata


def _unpack(data: bytes) -> np.ndarray:
    return np.frombuffer(data, "<f4")


class _BuildShard(beam.DoFn):
    """(shard, items) -> writes the shard's embeddings file and saved index; yields its number."""

    def __init__(self, out: str, num_shards: int, index_kind: str, distance: str,
                 shard_config: dict[str, Any]):
        self._out = out
        self._num_shards = num_shards
        self._index_kind = index_kind
        self._distance = distance
        self._shard_config = shard_config
        self._indexed = Metrics.counter(NAMESPACE, "indexed")
        self._dead = Metrics.counter(NAMESPACE, "dead_letter_index")

    def process(self, element):
        number, items = element
        items = sorted(items, key=lambda item: (str(type(item[0])), item[0]))
        kinds = {isinstance(item[0], str) for item in items}
        kept, seen = [], set()
        for item in items:
            if item[0] in seen:
                self._dead.inc()
                yield beam.pvalue.TaggedOutput(
                    _DEAD,
                    _dead_record("index", item[0], "index", ValueError("duplicate id")),
                )
                continue
            seen.add(item[0])
            kept.append(item)
        if len(kinds) > 1:
            # One index holds integer ids or string ids, not both: keep the kind of the first.
            kind = isinstance(kept[0][0], str)
            for item in [i for i in kept if isinstance(i[0], str) != kind]:
                self._dead.inc()
                yield beam.pvalue.TaggedOutput(
                    _DEAD,
                    _dead_record("index", item[0], "index",
                                 ValueError("mixes string and integer ids")),
                )
            kept = [i for i in kept if isinstance(i[0], str) == kind]
        ids = np.asarray([item[0] for item in kept])
        sizes = {len(item[1]) for item in kept}
        if len(sizes) > 1:
            raise ValueError(
                f"shard {number} got embeddings of different dimensions "
                f"{sorted(size // 4 for size in sizes)}"
            )
        count = len(kept)
        embeddings = np.empty((count, sizes.pop() // 4 if count else 0), np.float32)
        for row, item in enumerate(kept):
            embeddings[row] = _unpack(item[1])
        metadata = [item[2] for item in kept]
        del items, kept  # the packed bytes; the index needs only `embeddings`
        name = shard_name(number, self._num_shards)
        _write_embeddings(self._out, name, ids, embeddings, metadata)
        index = _new_index(self._index_kind, self._distance, self._shard_config)
        # One build at a time per process (a build uses every core anyway). Two ScaNN builds
        # in threads once "corrupted memory" under direct_running_mode=multi_threading, which
        # later proved to corrupt data by itself (refuse_multi_threading); kept for SDK
        # harnesses that run bundles in threads.
        with _BUILD_LOCK:
            index.add(embeddings, ids=ids, metadata=metadata)
            index.save(os.path.join(self._out, "index", name), overwrite=True)
            del index
        self._indexed.inc(count)
        yield number


def _write_embeddings(out: str, name: str, ids, embeddings, metadata) -> None:
    path = os.path.join(out, "embeddings", f"{name}.npz")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = path + ".partial.npz"
    np.savez(staging, ids=ids, embeddings=embeddings,
             metadata=np.asarray([json.dumps(m) for m in metadata], dtype=str))
    os.replace(staging, path)


def _new_index(kind: str, distance: str, shard_config: dict[str, Any]) -> Index:
    return INDEX_KINDS[kind](distance=distance, **shard_config)


def read_embeddings(out: str) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    """Reads back every shard's ids, raw embeddings and metadata from `out/embeddings/`.

    Returns:
        `(ids, embeddings, metadata)` of all shards, shard after shard.
    """
    paths = sorted(glob.glob(os.path.join(out, "embeddings", "shard-*.npz")))
    ids, embeddings, metadata = [], [], []
    for path in paths:
        with np.load(path, allow_pickle=False) as data:
            ids.append(data["ids"])
            embeddings.append(data["embeddings"])
            metadata.extend(json.loads(m) for m in data["metadata"].tolist())
    if not paths:
        return np.zeros((0,), np.int64), np.zeros((0, 0), np.float32), []
    return np.concatenate(ids), np.concatenate(embeddings), metadata


# -- the pipeline -----------------------------------------------------------------------


def _finish(numbers, out: str, num_shards: int, index_kind: str, distance: str,
            normalize: bool, shard_config: dict[str, Any], info: dict[str, Any]) -> int:
    """Saves an empty index for each shard that got no item, then writes the manifest."""
    names = []
    for number in range(num_shards):
        name = shard_name(number, num_shards)
        if number not in set(numbers):
            empty = ExactIndex(distance=distance, normalize=normalize)
            empty.save(os.path.join(out, "index", name), overwrite=True)
        names.append(name)
    config = {
        "distance": distance,
        "normalize": normalize,
        "num_shards": num_shards,
        "shard_class": INDEX_KINDS[index_kind].__name__,
        "shard_config": dict(shard_config),
        "max_workers": None,
    }
    write_manifest(os.path.join(out, "index"), names, config=config, info=info)
    return len(names)


class IndexEmbeddings(beam.PTransform):
    """The indexing half: `(id, embedding, metadata)` items -> shard indexes and the manifest.

    Routes each item to a shard (`shard_by="hash"`: `shard_of_ids`;
    `"kmeans"`: the nearest of `num_shards` centres that `train_kmeans` fits
    on a sample), groups each shard on one worker, writes
    `out/embeddings/shard-NNNNN.npz` and saves the shard's index in
    `out/index/shard-NNNNN/`, then writes `out/index/index.json` (shards
    that got no item are saved empty). Items whose id is already in their
    shard go to the returned dead-letter PCollection (JSON lines).

    Args:
        out: output directory (see `build_index`).
        num_shards, index, shard_by, distance, shard_config,
        kmeans_sample_size: as for `build_index`.
        info: JSON-serialisable dict stored in the manifest.

    Returns (from `expand`):
        The dead-letter PCollection of JSON lines.
    """

    def __init__(self, out: str, *, num_shards: int = 2, index: str = "exact",
                 shard_by: str = "hash", distance: str = "dot",
                 shard_config: dict[str, Any] | None = None,
                 kmeans_sample_size: int = 10_000, info: dict[str, Any] | None = None):
        super().__init__()
        if index not in INDEX_KINDS:
            raise ValueError(f"`index` must be one of {sorted(INDEX_KINDS)}, got {index!r}")
        if shard_by not in SHARD_BY:
            raise ValueError(f"`shard_by` must be one of {list(SHARD_BY)}, got {shard_by!r}")
        if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(f"`num_shards` must be a positive integer, got {num_shards!r}")
        self._out = os.path.abspath(out)
        self._num_shards = num_shards
        self._index = index
        self._shard_by = shard_by
        self._distance = distance
        self._shard_config = dict(shard_config or {})
        self._normalize = _new_index(index, distance, self._shard_config).normalize
        self._sample_size = kmeans_sample_size
        self._info = dict(info or {})

    def expand(self, items):
        refuse_multi_threading(items.pipeline.options)
        num_shards, normalize = self._num_shards, self._normalize
        items = items | "Pack" >> beam.Map(_pack)
        if self._shard_by == "hash":
            keyed_by_shard = items | "HashShard" >> beam.Map(
                lambda item: (_hash_shard(item[0], num_shards), item)
            )
        else:
            centres = (
                items
                | "Sample" >> beam.combiners.Sample.FixedSizeGlobally(self._sample_size)
                | "KMeans" >> beam.Map(
                    lambda sample: train_kmeans(
                        [_unpack(s[1]) for s in sample], num_shards, normalize
                    )
                )
            )
            keyed_by_shard = items | "NearestCentre" >> beam.Map(
                lambda item, c: (_nearest_centre(_unpack(item[1]), c, normalize), item),
                c=beam.pvalue.AsSingleton(centres),
            )
        built = (
            keyed_by_shard
            | "GroupByShard" >> beam.GroupByKey()
            | "BuildShards" >> beam.ParDo(
                _BuildShard(self._out, num_shards, self._index, self._distance,
                            self._shard_config)
            ).with_outputs(_DEAD, main="numbers")
        )
        _ = (
            built.numbers
            | "AllShards" >> beam.combiners.ToList()
            | "Manifest" >> beam.Map(
                _finish, self._out, num_shards, self._index, self._distance, normalize,
                self._shard_config, self._info,
            )
        )
        return built[_DEAD]


def build_index(
    source: str,
    model_path: str,
    out: str,
    *,
    num_shards: int = 2,
    index: str = "exact",
    shard_by: str = "hash",
    distance: str = "dot",
    shard_config: dict[str, Any] | None = None,
    batch_size: int = 256,
    image_feature: str = "image",
    id_feature: str = "id",
    data_dir: str | None = None,
    kmeans_sample_size: int = 10_000,
    overwrite: bool = False,
    pipeline_args: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Runs the embedding + indexing pipeline and returns its summary (also in `out/pipeline.json`).

    Args:
        source: `"tfrecord:GLOB"` (serialised `tf.train.Example`s with an
            `image_feature` and an `id_feature`), `"images:GLOB"` (image
            files; the id is the path) or `"tfds:NAME:SPLIT"` (a prepared
            TFDS split; the id is its `tfds_id`).
        model_path: a `.keras` embedding model or an embedding SavedModel
            (e.g. a run's `model.keras` or `saved_model/`).
        out: output directory: new, empty, or (with `overwrite`) a previous
            output of this pipeline.
        num_shards: number of shard indexes.
        index: `"exact"` (`ExactIndex`) or `"scann"` (`ScaNNIndex`) shards.
        shard_by: `"hash"` (`shard_of_ids`, where `ShardedIndex.add` would
            put the id) or `"kmeans"` (nearest of `num_shards` k-means centres
            trained on a sample of the embeddings).
        distance: `"dot"` (cosine: normalised) or `"squared_l2"`.
        shard_config: further arguments of each shard index (e.g. ScaNN's
            `leaves_to_search`).
        batch_size: largest batch `RunInference` embeds at once.
        image_feature: TFRecord/TFDS feature holding the image.
        id_feature: TFRecord feature holding the id.
        data_dir: TFDS data directory.
        kmeans_sample_size: embeddings sampled to train the k-means centres.
        overwrite: replace a previous output in `out`.
        pipeline_args: standard Beam pipeline options, e.g.
            `["--direct_num_workers=2"]` or `["--runner=DataflowRunner", ...]`.

    Returns:
        Dict with the counts (`read`, `indexed`, `dead_letter_*`), the
        options and `seconds`.

    Raises:
        ValueError: for bad arguments (source, index, shard_by, num_shards,
            model path).
        FileExistsError: if `out` is not empty and `overwrite` is False.

    Example:

    >>> import os, tempfile
    >>> import keras, numpy as np, tensorflow as tf
    >>> from keras_dml.beam import build_index
    >>> from keras_dml.index import Index
    >>> root = tempfile.mkdtemp()
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> model.save(os.path.join(root, "m.keras"))
    >>> with tf.io.TFRecordWriter(os.path.join(root, "items.tfrecord")) as w:
    ...     for i in range(10):
    ...         f = {"id": tf.train.Feature(int64_list=tf.train.Int64List(value=[i])),
    ...              "image": tf.train.Feature(float_list=tf.train.FloatList(value=[i, 1, 2, 3]))}
    ...         w.write(tf.train.Example(features=tf.train.Features(feature=f)).SerializeToString())
    >>> summary = build_index("tfrecord:" + os.path.join(root, "*.tfrecord"),
    ...                       os.path.join(root, "m.keras"), os.path.join(root, "out"))
    >>> summary["indexed"], len(Index.load(os.path.join(root, "out", "index")))
    (10, 10)
    """
    kind, rest = parse_source(source)
    if kind != "tfds" and "://" not in rest:
        rest = os.path.abspath(rest)  # workers need not share the caller's directory
    if index not in INDEX_KINDS:
        raise ValueError(f"`index` must be one of {sorted(INDEX_KINDS)}, got {index!r}")
    if shard_by not in SHARD_BY:
        raise ValueError(f"`shard_by` must be one of {list(SHARD_BY)}, got {shard_by!r}")
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"`num_shards` must be a positive integer, got {num_shards!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}")
    options = PipelineOptions(list(pipeline_args or []))
    refuse_multi_threading(options)
    shard_config = dict(shard_config or {})
    _new_index(index, distance, shard_config)  # a bad distance or shard config fails here
    out = os.path.abspath(out)
    check_output_dir(out, overwrite)
    input_shape = load_embedder(model_path).input_shape  # a bad model fails before the run
    if overwrite and os.path.isdir(out):
        for entry in OUTPUT_ENTRIES:
            path = os.path.join(out, entry)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
    os.makedirs(os.path.join(out, "index"), exist_ok=True)
    settings = {
        "source": source, "model": os.path.abspath(model_path), "num_shards": num_shards,
        "index": index, "shard_by": shard_by, "distance": distance,
        "shard_config": shard_config, "batch_size": batch_size,
        "pipeline_args": list(pipeline_args or []),
    }
    _write_json(os.path.join(out, "pipeline.json"), {"status": "running", **settings})

    runner = None
    if options.get_all_options().get("runner") is None:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        runner = FnApiRunner()
    start = time.perf_counter()
    pipeline = beam.Pipeline(runner=runner, options=options)
    decoded = (
        _read_source(pipeline, kind, rest, data_dir)
        | "Decode" >> beam.ParDo(
            _Decode(kind, input_shape, image_feature, id_feature)
        ).with_outputs(_DEAD, main="items")
    )
    keyed = decoded.items | "Key" >> beam.Map(
        lambda item: ((item[0], json.dumps(item[2])), item[1])
    )
    handler = KeyedModelHandler(
        KerasModelHandler(model_path, min_batch_size=1, max_batch_size=batch_size)
    )
    embedded, failed = (
        keyed | "Embed" >> RunInference(handler).with_exception_handling()
    )
    checked = embedded | "Check" >> beam.ParDo(_CheckEmbedding()).with_outputs(
        _DEAD, main="items"
    )
    failed_lines = failed.failed_inferences | "FailedBatches" >> beam.ParDo(_FailedBatch())
    info = {"source": source, "model": os.path.abspath(model_path), "shard_by": shard_by}
    index_dead = checked.items | "Index" >> IndexEmbeddings(
        out, num_shards=num_shards, index=index, shard_by=shard_by, distance=distance,
        shard_config=shard_config, kmeans_sample_size=kmeans_sample_size, info=info,
    )
    _ = (
        (decoded[_DEAD], checked[_DEAD], failed_lines, index_dead)
        | "DeadLetters" >> beam.Flatten()
        | "WriteDeadLetters" >> beam.io.WriteToText(
            os.path.join(out, "dead_letter", "items"), file_name_suffix=".jsonl"
        )
    )
    result = pipeline.run()
    result.wait_until_finish()
    counts = _counters(result)
    summary = {"status": "done", **settings, **counts,
               "seconds": round(time.perf_counter() - start, 3)}
    _write_json(os.path.join(out, "pipeline.json"), summary)
    return summary


def _counters(result) -> dict[str, int]:
    counts = dict.fromkeys((*COUNTERS, "embed_batches_split"), 0)
    for namespace, prefix in ((NAMESPACE, ""), (METRICS_NAMESPACE, "embed_")):
        query = result.metrics().query(MetricsFilter().with_namespace(namespace))
        for counter in query["counters"]:
            name = prefix + counter.key.metric.name
            if name in counts:
                value = counter.committed if counter.committed is not None else counter.attempted
                counts[name] += int(value or 0)
    return counts


def _write_json(path: str, value) -> None:
    from keras_dml._atomic import write_text

    write_text(path, json.dumps(value, indent=2) + "\n")


__all__ = [
    "IndexEmbeddings", "build_index", "check_output_dir", "decode_example", "parse_source",
    "read_embeddings", "train_kmeans",
]
