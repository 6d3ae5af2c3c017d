"""The Apache Beam embedding + indexing pipeline (`keras_dml.beam`) on the local runner.

Small data, Beam's in-process FnApiRunner; every output goes to pytest's tmp_path.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest

pytest.importorskip(
    "apache_beam", reason="keras_dml.beam needs apache-beam: pip install 'keras-dml[beam]'"
)

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_dml.beam import KerasModelHandler, build_index, read_embeddings  # noqa: E402
from keras_dml.beam.checks import check_output_dir, parse_source  # noqa: E402
from keras_dml.index import ExactIndex, Index, ShardedIndex  # noqa: E402

DIM_IN, DIM_OUT = 16, 8


def _feature(value):
    if isinstance(value, (bytes, str)):
        value = value.encode() if isinstance(value, str) else value
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    if isinstance(value, (int, np.integer)):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))
    return tf.train.Feature(float_list=tf.train.FloatList(value=np.ravel(value).tolist()))


def write_tfrecord(path, ids, inputs, labels=None, extra=()):
    """Writes Examples with `id`, `image` (raw floats) and optional `label`; `extra` raw records."""
    with tf.io.TFRecordWriter(path) as writer:
        for row, item_id in enumerate(ids):
            features = {"id": _feature(item_id), "image": _feature(np.asarray(inputs[row]))}
            if labels is not None:
                features["label"] = _feature(int(labels[row]))
            example = tf.train.Example(features=tf.train.Features(feature=features))
            writer.write(example.SerializeToString())
        for record in extra:
            writer.write(record)


def clustered(n, dim, clusters=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)) * 3.0
    labels = rng.integers(clusters, size=n)
    return (centres[labels] + rng.normal(size=(n, dim))).astype("float32"), labels


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((DIM_IN,)), keras.layers.Dense(DIM_OUT)])
    path = str(tmp_path_factory.mktemp("model") / "embedder.keras")
    model.save(path)
    return path


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, model_path):
    """200 clustered items in two TFRecord files, their ids and model.predict embeddings."""
    x, labels = clustered(200, DIM_IN)
    ids = np.arange(1000, 1200)
    root = tmp_path_factory.mktemp("gallery")
    write_tfrecord(str(root / "part-0.tfrecord"), ids[:120], x[:120], labels[:120])
    write_tfrecord(str(root / "part-1.tfrecord"), ids[120:], x[120:], labels[120:])
    model = keras.saving.load_model(model_path, compile=False)
    return {
        "source": "tfrecord:" + str(root / "*.tfrecord"),
        "ids": ids, "x": x, "labels": labels,
        "embeddings": model.predict(x, verbose=0),
    }


def _one_index(ids, embeddings, distance="dot"):
    index = ExactIndex(distance=distance)
    index.add(embeddings, ids=ids)
    return index


@pytest.mark.parametrize(
    "num_shards,shard_by,distance",
    [(2, "hash", "dot"), (4, "hash", "dot"), (4, "kmeans", "squared_l2")],
)
def test_merged_exact_shards_equal_one_exact_index(
    tmp_path, model_path, gallery, num_shards, shard_by, distance
):
    out = str(tmp_path / "out")
    summary = build_index(gallery["source"], model_path, out, num_shards=num_shards,
                          shard_by=shard_by, distance=distance, batch_size=32)
    assert summary["read"] == 200 and summary["indexed"] == 200
    assert summary["dead_letter_decode"] == summary["dead_letter_embed"] == 0
    sharded = Index.load(os.path.join(out, "index"))
    assert isinstance(sharded, ShardedIndex) and sharded.num_shards == num_shards
    assert sorted(len(s) for s in sharded.shards) != [0] * num_shards
    assert all(len(s) > 0 for s in sharded.shards)
    # The pipeline's embeddings are the model's, item by item.
    ids, embeddings, metadata = read_embeddings(out)
    order = np.argsort(ids)
    np.testing.assert_array_equal(ids[order], gallery["ids"])
    np.testing.assert_allclose(embeddings[order], gallery["embeddings"], rtol=1e-5, atol=1e-6)
    assert [m["label"] for m in np.asarray(metadata, object)[order]] == gallery["labels"].tolist()
    if shard_by == "hash":
        from keras_dml.index.sharded import shard_of_ids

        for number, shard in enumerate(sharded.shards):
            assert set(shard_of_ids(shard.ids, num_shards).tolist()) == {number}
    # Merged exact search over the shards == one ExactIndex over all items: ids and scores.
    one = _one_index(ids, embeddings, distance)
    queries = gallery["embeddings"][::7]
    got_ids, got_scores = sharded.search(queries, k=10)
    want_ids, want_scores = one.search(queries, k=10)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got_scores, want_scores)
    assert sharded.get_metadata(int(gallery["ids"][3])) == {"label": int(gallery["labels"][3])}
    info = json.load(open(os.path.join(out, "pipeline.json")))
    assert info["status"] == "done" and info["indexed"] == 200


def test_scann_shards_recall_at_10(tmp_path, model_path):
    x, _ = clustered(3000, DIM_IN, clusters=30, seed=1)
    ids = np.arange(3000)
    root = tmp_path / "data"
    root.mkdir()
    write_tfrecord(str(root / "items.tfrecord"), ids, x)
    out = str(tmp_path / "out")
    summary = build_index(
        "tfrecord:" + str(root / "items.tfrecord"), model_path, out, num_shards=2,
        index="scann", batch_size=256,
        shard_config={"brute_force_threshold": 100, "num_leaves": 20, "leaves_to_search": 5},
    )
    assert summary["indexed"] == 3000
    sharded = Index.load(os.path.join(out, "index"))
    assert sharded.shard_class == "ScaNNIndex"
    assert all(s.uses_tree for s in sharded.shards)  # a real tree, not brute force
    got_ids, emb = read_embeddings(out)[:2]
    exact = _one_index(got_ids, emb)
    queries = emb[np.random.default_rng(2).choice(len(emb), 200, replace=False)]
    found = sharded.search(queries, k=10)[0]
    truth = exact.search(queries, k=10)[0]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)])
    assert recall >= 0.95, recall


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    from keras_dml.data.digits import load_digits_zero_shot

    data = load_digits_zero_shot()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(6),
    ])
    path = str(tmp_path_factory.mktemp("digits") / "digits.keras")
    model.save(path)
    return path, model, data.x_unseen[:64]


def test_digits_tfrecords_through_run_inference_equal_model_predict(tmp_path, digits_model):
    path, model, images = digits_model
    write_tfrecord(str(tmp_path / "digits.tfrecord"), range(len(images)), images)
    out = str(tmp_path / "out")
    summary = build_index("tfrecord:" + str(tmp_path / "digits.tfrecord"), path, out,
                          batch_size=16)
    assert summary["indexed"] == len(images) and summary["dead_letter_decode"] == 0
    ids, embeddings, _ = read_embeddings(out)
    order = np.argsort(ids)
    np.testing.assert_allclose(embeddings[order], model.predict(images, verbose=0),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="exports an embedding SavedModel, which traces the model with TensorFlow "
    "(keras_dml.export refuses other backends by design)",
)
def test_digits_png_files_and_savedmodel_equal_model_predict(tmp_path, digits_model):
    from PIL import Image

    from keras_dml.export import export_embedding_model

    path, model, images = digits_model
    pixels = np.round(images[:, :, :, 0] * 255).astype("uint8")
    folder = tmp_path / "pngs"
    folder.mkdir()
    for row, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{row:03d}.png")
    saved = str(tmp_path / "embedder_sm")
    export_embedding_model(model, saved)
    want = model.predict(pixels[..., None].astype("float32") / 255.0, verbose=0)
    for which, model_path in (("keras", path), ("saved_model", saved)):
        out = str(tmp_path / which)
        summary = build_index("images:" + str(folder / "*.png"), model_path, out, batch_size=16)
        assert summary["indexed"] == len(images)
        ids, embeddings, metadata = read_embeddings(out)
        order = np.argsort(ids)
        assert [os.path.basename(i) for i in ids[order]] == [
            f"{row:03d}.png" for row in range(len(images))
        ]
        assert metadata[0]["path"] == ids[0]
        expected = want
        if which == "saved_model":  # keras-dml's embedding SavedModel returns unit vectors
            expected = want / np.linalg.norm(want, axis=1, keepdims=True)
        np.testing.assert_allclose(embeddings[order], expected, rtol=1e-5, atol=1e-6)


def _dead_lines(out):
    lines = []
    for path in sorted(glob.glob(os.path.join(out, "dead_letter", "*.jsonl"))):
        lines += [json.loads(line) for line in open(path) if line.strip()]
    return lines


def test_bad_items_go_to_the_dead_letter_and_the_pipeline_finishes(
    tmp_path, model_path, monkeypatch
):
    x, _ = clustered(40, DIM_IN)
    x[3, 0] = np.nan  # embeds to NaN
    x[7, 0] = -999.0  # the model "crashes" on it (below)
    ids = list(range(40))
    ids[10] = 11  # a duplicate id
    not_an_example = b"not a tf.train.Example"
    wrong_size = tf.train.Example(features=tf.train.Features(feature={
        "id": _feature(100), "image": _feature(np.zeros(3, "float32"))})).SerializeToString()
    no_id = tf.train.Example(features=tf.train.Features(feature={
        "image": _feature(np.zeros(DIM_IN, "float32"))})).SerializeToString()
    write_tfrecord(str(tmp_path / "items.tfrecord"), ids, x,
                   extra=[not_an_example, wrong_size, no_id])
    run_inference = KerasModelHandler.run_inference

    def crashing(self, batch, model, inference_args=None):
        if any(np.any(np.asarray(item) == -999.0) for item in batch):
            raise RuntimeError("the model crashed")
        return run_inference(self, batch, model, inference_args)

    monkeypatch.setattr(KerasModelHandler, "run_inference", crashing)
    out = str(tmp_path / "out")
    summary = build_index("tfrecord:" + str(tmp_path / "items.tfrecord"), model_path, out,
                          batch_size=1)
    assert summary["read"] == 43
    assert summary["dead_letter_decode"] == 3
    assert summary["dead_letter_embed"] == 2  # NaN and the crash
    assert summary["dead_letter_index"] == 1  # the second id 11
    assert summary["indexed"] == 37
    lines = _dead_lines(out)
    assert sorted(line["stage"] for line in lines) == ["decode"] * 3 + ["embed"] * 2 + ["index"]
    by_stage = {(line["stage"], line["id"]): line["error"] for line in lines}
    assert "non-finite" in by_stage[("embed", 3)]
    assert "the model crashed" in by_stage[("embed", 7)]
    assert "cannot fit" in by_stage[("decode", 100)]
    assert "duplicate id" in by_stage[("index", 11)]
    index = Index.load(os.path.join(out, "index"))
    assert len(index) == 37 and not {3, 7} & set(index.ids.tolist())


def test_a_failing_batch_dead_letters_only_its_bad_item(tmp_path, model_path, monkeypatch):
    from keras_dml.beam import model_handler

    x, _ = clustered(40, DIM_IN, seed=1)
    x[29, 0] = -999.0  # the model "crashes" on any batch holding this item (below)
    ids = np.arange(500, 540)
    write_tfrecord(str(tmp_path / "items.tfrecord"), ids, x)
    embed = model_handler._KerasEmbedder.__call__
    calls = []

    def crashing(self, batch):
        bad = bool(np.any(batch[:, 0] == -999.0))
        calls.append((len(batch), bad))
        if bad:
            raise RuntimeError("the model crashed on this batch")
        return embed(self, batch)

    monkeypatch.setattr(model_handler._KerasEmbedder, "__call__", crashing)
    out = str(tmp_path / "out")
    summary = build_index("tfrecord:" + str(tmp_path / "items.tfrecord"), model_path, out,
                          batch_size=16)
    assert max(size for size, bad in calls if bad) > 1  # the bad item shared a batch
    assert summary["read"] == 40 and summary["indexed"] == 39
    assert summary["dead_letter_embed"] == 1 and summary["embed_batches_split"] >= 1
    [line] = _dead_lines(out)
    assert line["stage"] == "embed" and line["id"] == 529
    assert line["error"] == "RuntimeError: the model crashed on this batch"
    got_ids, embeddings, _ = read_embeddings(out)
    order = np.argsort(got_ids)
    good = ids != 529
    np.testing.assert_array_equal(got_ids[order], ids[good])
    want = keras.saving.load_model(model_path, compile=False).predict(x[good], verbose=0)
    np.testing.assert_allclose(embeddings[order], want, rtol=1e-5, atol=1e-6)
    assert len(Index.load(os.path.join(out, "index"))) == 39


def test_model_handler_bisects_a_failing_batch(model_path):
    from keras_dml.beam.model_handler import EmbedFailure, load_embedder

    handler = KerasModelHandler(model_path)
    model = load_embedder(model_path)
    sizes = []

    class Flaky:
        input_shape = model.input_shape

        def __call__(self, batch):
            sizes.append(len(batch))
            if np.any(batch[:, 0] == -999.0):
                raise ValueError("bad row")
            return model(batch)

    x, _ = clustered(16, DIM_IN, seed=2)
    x[5, 0] = -999.0
    results = handler.run_inference(list(x), Flaky())
    assert [isinstance(r.inference, EmbedFailure) for r in results] == [
        row == 5 for row in range(16)
    ]
    assert results[5].inference.error == "ValueError: bad row"
    good = np.stack([r.inference for row, r in enumerate(results) if row != 5])
    np.testing.assert_allclose(good, model(np.delete(x, 5, axis=0)), rtol=1e-5, atol=1e-6)
    # Halving: rows 0-15 fail, 0-7 fail, 0-3 pass, 4-7 fail, 4-5 fail, 4 passes, 5 fails,
    # 6-7 pass, 8-15 pass: 9 calls for 16 items, not 16 one-item calls after the batch.
    assert sizes == [16, 8, 4, 4, 2, 1, 1, 2, 8]

    class WrongCount(Flaky):
        def __call__(self, batch):
            return model(batch)[:1]

    results = handler.run_inference(list(x[:2]), WrongCount())
    assert [r.inference is not None for r in results] == [True, True]
    assert not any(isinstance(r.inference, EmbedFailure) for r in results)  # singles fit


def test_output_dir_refused_unless_overwrite(tmp_path, model_path, gallery):
    out = str(tmp_path / "out")
    build_index(gallery["source"], model_path, out, num_shards=2)
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_index(gallery["source"], model_path, out, num_shards=2)
    summary = build_index(gallery["source"], model_path, out, num_shards=3, overwrite=True)
    assert summary["indexed"] == 200
    assert Index.load(os.path.join(out, "index")).num_shards == 3
    assert len(glob.glob(os.path.join(out, "embeddings", "*.npz"))) == 3  # old shards gone
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        check_output_dir(str(other), overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"


def test_bad_arguments(tmp_path, model_path, gallery):
    with pytest.raises(ValueError, match="unknown source"):
        parse_source("csv:items.csv")
    with pytest.raises(ValueError, match="tfds:NAME:SPLIT"):
        parse_source("tfds:mnist")
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="num_shards"):
        build_index(gallery["source"], model_path, out, num_shards=0)
    with pytest.raises(ValueError, match="index"):
        build_index(gallery["source"], model_path, out, index="faiss")
    with pytest.raises(ValueError, match="shard_by"):
        build_index(gallery["source"], model_path, out, shard_by="random")
    with pytest.raises(ValueError, match="not a .keras model"):
        build_index(gallery["source"], str(tmp_path), out)
    with pytest.raises(ValueError, match="multi_threading is refused"):
        build_index(gallery["source"], model_path, out,
                    pipeline_args=["--direct_running_mode=multi_threading"])
    assert not os.path.exists(out)
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from keras_dml.beam import IndexEmbeddings

    options = PipelineOptions(["--direct_num_workers=2", "--direct_running_mode=multi_threading"])
    with pytest.raises(ValueError, match="multi_threading is refused"):
        pipeline = beam.Pipeline(options=options)
        _ = pipeline | beam.Create([(1, np.ones(4, "float32"), {})]) | IndexEmbeddings(out)


def test_cli_index_command(tmp_path, model_path, gallery, capsys, monkeypatch):
    from keras_dml.cli.main import main

    out = str(tmp_path / "out")
    argv = ["index", model_path, "--source", gallery["source"], "--out", out,
            "--num-shards", "2", "--index", "exact"]
    assert main(argv + ["--", "--direct_num_workers=1"]) == 0
    assert "indexed 200 of 200 items into 2 exact shards" in capsys.readouterr().out
    assert len(Index.load(os.path.join(out, "index"))) == 200
    # A second run into the same directory: a one-line usage error, nothing imported or run.
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("keras-dml index: error: --out:") and "--overwrite" in err
    assert "\n" not in err
    # multi_threading is refused (Beam 2.77 dropped items in it), before anything runs.
    assert main(argv + ["--overwrite", "--", "--direct_num_workers=2",
                        "--direct_running_mode=multi_threading"]) == 1
    assert "multi_threading is refused" in capsys.readouterr().err
    assert len(Index.load(os.path.join(out, "index"))) == 200
    # --workers N: N local worker processes (run once by hand, 50 s here: too slow to repeat).
    seen = {}

    def fake_build_index(*args, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr("keras_dml.beam.index_pipeline.build_index", fake_build_index)
    assert main(argv + ["--overwrite", "--workers", "3", "--", "--job_name=x"]) == 1
    assert "stop here" in capsys.readouterr().err
    assert seen["pipeline_args"] == [
        "--job_name=x", "--direct_num_workers=3", "--direct_running_mode=multi_processing"
    ]
    for bad, message in (
        (["--source", "csv:x"], "unknown source"),
        (["--source", "tfrecord:" + str(tmp_path / "none*.tfrecord")], "matches no file"),
    ):
        args = ["index", model_path, "--out", str(tmp_path / "new")] + bad
        assert main(args) == 2
        assert message in capsys.readouterr().err
    assert main(["index", str(tmp_path), "--source", gallery["source"],
                 "--out", str(tmp_path / "new")]) == 2
    assert "is not a keras-dml run directory" in capsys.readouterr().err
    assert main(["search", str(tmp_path), "--query-index", "0", "--", "--x"]) == 2


def test_docstring_examples_run():
    import doctest

    from keras_dml.beam import checks, index_pipeline, model_handler

    for module in (checks, model_handler, index_pipeline):
        assert doctest.testmod(module).failed == 0, module


def _tiny_tfds_builder():
    """A TFDS dataset of 30 random 8x8 images, prepared offline (defined once per process)."""
    import tensorflow_datasets as tfds

    global KerasDmlBeamTinyImages
    if "KerasDmlBeamTinyImages" in globals():
        return KerasDmlBeamTinyImages

    class KerasDmlBeamTinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }))

        def _split_generators(self, dl_manager):
            return {"test": self._generate_examples()}

        def _generate_examples(self):
            for i in range(30):
                yield i, {"image": tiny_tfds_image(i), "label": i % 10}

    KerasDmlBeamTinyImages.__qualname__ = "KerasDmlBeamTinyImages"
    return KerasDmlBeamTinyImages


def tiny_tfds_image(i):
    return np.random.default_rng(i).integers(0, 256, (8, 8, 1)).astype("uint8")


def test_tfds_split_through_run_inference_equals_model_predict(tmp_path, digits_model):
    builder = _tiny_tfds_builder()(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare()
    path, model, _ = digits_model
    out = str(tmp_path / "out")
    summary = build_index(f"tfds:{builder.name}:test", path, out, data_dir=str(tmp_path / "tfds"))
    assert summary["indexed"] == 30 and summary["dead_letter_decode"] == 0
    ids, embeddings, metadata = read_embeddings(out)
    assert all(str(i).startswith(f"{builder.name}-test.") for i in ids)
    labels = np.array([m["label"] for m in metadata])
    by_label = {}
    for i in range(30):
        by_label.setdefault(i % 10, []).append(i)
    images = np.stack([tiny_tfds_image(i) for i in range(30)]).astype("float32") / 255.0
    want = model.predict(images, verbose=0)
    # Each embedding is the model's embedding of one of the images of its label.
    for embedding, label in zip(embeddings, labels, strict=True):
        distances = [np.abs(want[i] - embedding).max() for i in by_label[int(label)]]
        assert min(distances) < 1e-5
    assert len({tuple(np.round(e, 5)) for e in embeddings}) == 30


def _readme_section():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    start = readme.index("### Embed and index a large gallery on Apache Beam")
    return readme[start:readme.index("\n### ", start + 10)]


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="exports per-shard retrieval SavedModels, which trace with TensorFlow "
    "(keras_dml.export refuses other backends by design)",
)
def test_readme_commands_and_fan_out_merge(tmp_path, digits_model, monkeypatch, capsys):
    """Runs the README's `keras-dml index` commands and its per-shard SavedModel fan-out."""
    import re
    import shlex
    import shutil

    from PIL import Image

    from keras_dml.cli.main import main

    section = _readme_section()
    bash = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    commands = [shlex.split(line) for line in bash.splitlines() if line.strip()]
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    path, model, images = digits_model
    monkeypatch.chdir(tmp_path)
    shutil.copy(path, "embedder.keras")
    os.mkdir("gallery")
    for row, image in enumerate(np.round(images[:, :, :, 0] * 255).astype("uint8")):
        Image.fromarray(image).save(f"gallery/{row:03d}.png")
    write_tfrecord("items-0.tfrecord", range(0, 40), images[:40])
    write_tfrecord("items-1.tfrecord", range(40, 64), images[40:])
    assert len(commands) == 2 and all(c[0] == "keras-dml" for c in commands)
    for command in commands:
        assert main(command[1:]) == 0, capsys.readouterr().err
    assert "indexed 64 of 64 items into 4 scann shards" in capsys.readouterr().out
    query_images = images[:5]
    namespace = {"query_images": query_images}
    exec(compile(python, "README.md", "exec"), namespace)
    index = namespace["index"]
    assert index.shard_class == "ScaNNIndex" and index.num_shards == 4
    want_ids, want_scores = index.search(model.predict(query_images, verbose=0), k=10)
    np.testing.assert_array_equal(namespace["ids"], want_ids)
    np.testing.assert_allclose(namespace["scores"], want_scores, rtol=1e-4, atol=1e-5)
