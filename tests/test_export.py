"""Tests for keras_dml.export: SavedModels served in a fresh process and TFLite / LiteRT files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from sklearn.datasets import load_digits

from keras_dml.export import (
    export_embedding_model,
    export_retrieval_model,
    export_tflite,
)
from keras_dml.index import ExactIndex, ScaNNIndex

K = 5
_QUIET_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = (data.images / 16.0).astype("float32")[..., np.newaxis]
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], data.target[order]
    return x[:1200], y[:1200], x[1200:], y[1200:]


@pytest.fixture(scope="module")
def embedder(digits):
    """A small conv embedder, trained briefly through a softmax head to be meaningful."""
    x_train, y_train, _, _ = digits
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(16, 3, activation="relu")(inputs)
    h = keras.layers.Conv2D(32, 3, activation="relu")(h)
    embedding = keras.layers.Dense(32, name="embedding")(keras.layers.Flatten()(h))
    logits = keras.layers.Dense(10)(keras.layers.Activation("relu")(embedding))
    classifier = keras.Model(inputs, logits)
    classifier.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    classifier.fit(x_train, y_train, epochs=3, batch_size=64, verbose=0)
    return keras.Model(inputs, embedding)


def keras_embeddings(model, x, normalize=True):
    e = np.asarray(model.predict(x, verbose=0), np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True) if normalize else e


# The fresh process loads each stock SavedModel *before* importing ScaNN, so
# any op that stock TensorFlow does not register shows up as unknown.
_SERVE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.framework import op_def_registry

    args = json.loads(sys.argv[1])
    queries = tf.constant(np.load(args["queries"]))

    def unknown_ops(path):
        proto = saved_model_pb2.SavedModel()
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            proto.ParseFromString(f.read())
        ops, functions = set(), set()
        for graph in proto.meta_graphs:
            ops |= {node.op for node in graph.graph_def.node}
            for fn in graph.graph_def.library.function:
                functions.add(fn.signature.name)
                ops |= {node.op for node in fn.node_def}
        return sorted(op for op in ops - functions if op_def_registry.get(op) is None)

    def run(name, path, signatures):
        model = tf.saved_model.load(path)
        arrays = {}
        for signature in signatures:
            for key, value in model.signatures[signature](inputs=queries).items():
                value = value.numpy()
                # tf.string comes back as an object array; npz keeps bytes.
                if value.dtype == object:
                    value = value.astype("S")
                arrays[signature + "/" + key] = value
        np.savez(os.path.join(args["out"], name + ".npz"), **arrays)

    report = {name: unknown_ops(path) for name, path in {**args["stock"], **args["scann"]}.items()}
    for name, path in args["stock"].items():
        run(name, path, args["signatures"][name])
    import scann  # registers ScaNN's TensorFlow ops
    for name, path in args["scann"].items():
        run(name, path, args["signatures"][name])
    print("UNKNOWN_OPS=" + json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def served(digits, embedder, tmp_path_factory):
    """Exports four retrieval models and an embedder, serves them all in one fresh process."""
    root = tmp_path_factory.mktemp("served")
    x_train, _, x_test, _ = digits
    train = keras_embeddings(embedder, x_train, normalize=False)
    queries = keras_embeddings(embedder, x_test[:40], normalize=False)
    indexes = {
        "exact_dot": ExactIndex(),
        "exact_l2": ExactIndex(distance="squared_l2"),
        "scann_tree": ScaNNIndex(brute_force_threshold=500),
        "scann_brute_l2": ScaNNIndex(distance="squared_l2"),
    }
    for name, index in indexes.items():
        ids = [f"digit-{i}" for i in range(len(train))] if name == "exact_dot" else None
        index.add(train, ids=ids)
    paths = {name: str(root / name) for name in [*indexes, "embedder"]}
    export_embedding_model(embedder, paths["embedder"])
    for name, index in indexes.items():
        export_retrieval_model(embedder, index, paths[name], k=K, use_scann="scann" in name)
    np.save(root / "queries.npy", x_test[:40])
    retrieval = ["serving_default", "retrieve_exact", "embed"]
    args = {
        "queries": str(root / "queries.npy"),
        "out": str(root),
        "stock": {name: paths[name] for name in ["embedder", "exact_dot", "exact_l2"]},
        "scann": {name: paths[name] for name in ["scann_tree", "scann_brute_l2"]},
        "signatures": {
            "embedder": ["serving_default"],
            "exact_dot": retrieval,
            "exact_l2": retrieval,
            "scann_tree": [*retrieval, "retrieve_scann"],
            "scann_brute_l2": [*retrieval, "retrieve_scann"],
        },
    }
    process = subprocess.run(
        [sys.executable, "-c", _SERVE_SCRIPT, json.dumps(args)],
        capture_output=True,
        text=True,
        env=_QUIET_ENV,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    report_line = [line for line in process.stdout.splitlines() if line.startswith("UNKNOWN_OPS=")]
    outputs = {name: dict(np.load(root / f"{name}.npz")) for name in paths}
    return {
        "indexes": indexes,
        "paths": paths,
        "queries": queries,
        "raw_queries": x_test[:40],
        "outputs": outputs,
        "unknown_ops": json.loads(report_line[0].split("=", 1)[1]),
        "root": root,
    }


def score_tolerance(index, queries):
    """Absolute float32 tolerance; squared distances of raw vectors carry |q|^2 rounding."""
    if index.distance == "dot":
        return 1e-5
    return 1e-6 * float(np.max(np.sum(queries**2, 1)) + np.max(np.sum(index.embeddings**2, 1)))


def assert_same_top_k(ids, scores, want_ids, want_scores, atol=1e-5):
    """Same ids and scores, except that members of a numerical tie may swap places."""
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=atol)
    for row, column in zip(*np.nonzero(ids != want_ids), strict=True):
        neighbours = want_scores[row, max(column - 1, 0) : column + 2]
        assert np.sum(np.abs(neighbours - want_scores[row, column]) <= atol) > 1, (row, column)
        assert ids[row, column] in want_ids[row] or column == want_ids.shape[1] - 1


# ------------------------------------------------------------------ SavedModels


def test_embedding_saved_model_matches_keras(tmp_path, digits, embedder):
    export_embedding_model(embedder, str(tmp_path / "embedder"))
    serve = tf.saved_model.load(str(tmp_path / "embedder")).signatures["serving_default"]
    x_test = digits[2]
    want = keras_embeddings(embedder, x_test)
    for batch in (x_test[:1], x_test):  # the batch dimension is dynamic
        got = serve(inputs=tf.constant(batch))["embeddings"].numpy()
        assert np.abs(got - want[: len(batch)]).max() <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_stock_exports_contain_only_stock_ops(served):
    unknown = served["unknown_ops"]
    assert unknown["embedder"] == [] and unknown["exact_dot"] == [] and unknown["exact_l2"] == []
    # The ScaNN flavour is the one that needs a ScaNN-enabled server.
    assert unknown["scann_tree"] and all(op.startswith("Scann>") for op in unknown["scann_tree"])


def test_embedder_and_embed_signature_in_fresh_process(served, embedder):
    want = keras_embeddings(embedder, served["raw_queries"])
    got = served["outputs"]["embedder"]["serving_default/embeddings"]
    assert np.abs(got - want).max() <= 1e-5
    embed = served["outputs"]["scann_tree"]["embed/embeddings"]
    assert np.abs(embed - want).max() <= 1e-5


@pytest.mark.parametrize("name", ["exact_dot", "exact_l2"])
def test_exact_retrieval_model_in_fresh_process_matches_index(served, name):
    index, outputs = served["indexes"][name], served["outputs"][name]
    want_ids, want_scores = index.search(served["queries"], k=K)
    ids = outputs["serving_default/ids"]
    if name == "exact_dot":
        ids = np.char.decode(ids, "utf-8")  # tf.string comes back as bytes
        assert ids[0, 0].startswith("digit-")
    atol = score_tolerance(index, served["queries"])
    assert_same_top_k(ids, outputs["serving_default/scores"], want_ids, want_scores, atol)
    np.testing.assert_array_equal(outputs["retrieve_exact/ids"], outputs["serving_default/ids"])


@pytest.mark.parametrize("name", ["scann_tree", "scann_brute_l2"])
def test_scann_retrieval_model_in_fresh_process_matches_index(served, name):
    index, outputs = served["indexes"][name], served["outputs"][name]
    if name == "scann_tree":
        assert index.uses_tree  # partitioning, hashing and reordering all go through the export
    want_ids, want_scores = index.search(served["queries"], k=K)
    atol = score_tolerance(index, served["queries"])
    assert_same_top_k(
        outputs["serving_default/ids"],
        outputs["serving_default/scores"],
        want_ids,
        want_scores,
        atol,
    )
    np.testing.assert_array_equal(outputs["retrieve_scann/ids"], outputs["serving_default/ids"])
    exact = ExactIndex(distance=index.distance)
    exact.add(index.embeddings)
    exact_ids, exact_scores = exact.search(served["queries"], k=K)
    assert_same_top_k(
        outputs["retrieve_exact/ids"],
        outputs["retrieve_exact/scores"],
        exact_ids,
        exact_scores,
        atol,
    )


def _saved_model_cli(args, import_scann=False):
    if import_scann:
        # saved_model_cli cannot load op libraries; register ScaNN's ops first.
        code = (
            "import sys, scann\n"
            "from tensorflow.python.tools.saved_model_cli import main\n"
            "sys.argv = ['saved_model_cli'] + sys.argv[1:]\n"
            "main()\n"
        )
        command = [sys.executable, "-c", code, *args]
    else:
        command = [os.path.join(os.path.dirname(sys.executable), "saved_model_cli"), *args]
    return subprocess.run(command, capture_output=True, text=True, env=_QUIET_ENV, timeout=300)


@pytest.mark.parametrize("name", ["exact_l2", "scann_tree"])
def test_saved_model_cli_runs_the_retrieval_model(served, name):
    out = served["root"] / f"cli_{name}"
    process = _saved_model_cli(
        [
            "run",
            "--dir",
            served["paths"][name],
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
            "--inputs",
            f"inputs={served['root'] / 'queries.npy'}",
            "--outdir",
            str(out),
        ],
        import_scann=name.startswith("scann"),
    )
    assert process.returncode == 0, process.stderr[-3000:]
    outputs = served["outputs"][name]
    np.testing.assert_array_equal(np.load(out / "ids.npy"), outputs["serving_default/ids"])
    np.testing.assert_allclose(
        np.load(out / "scores.npy"), outputs["serving_default/scores"], rtol=1e-5, atol=1e-6
    )


def test_retrieval_export_errors(tmp_path, embedder):
    exact = ExactIndex()
    with pytest.raises(ValueError, match="`index` is empty"):
        export_retrieval_model(embedder, exact, str(tmp_path / "m"))
    exact.add(np.eye(32, dtype="float32")[:3])
    with pytest.raises(ValueError, match=r"`k` must be an integer in \[1, 3\]"):
        export_retrieval_model(embedder, exact, str(tmp_path / "m"), k=4)
    with pytest.raises(ValueError, match="`use_scann=True` needs a ScaNNIndex"):
        export_retrieval_model(embedder, exact, str(tmp_path / "m"), k=2, use_scann=True)
    with pytest.raises(ValueError, match="`index` must be a keras_dml.index index"):
        export_retrieval_model(embedder, np.eye(3), str(tmp_path / "m"))


def test_model_input_and_output_errors(tmp_path):
    a, b = keras.Input((4,)), keras.Input((4,))
    two_inputs = keras.Model([a, b], keras.layers.Add()([a, b]))
    with pytest.raises(ValueError, match="single input tensor"):
        export_embedding_model(two_inputs, str(tmp_path / "m"))

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    model = Subclassed()
    model(np.zeros((1, 4), "float32"))
    with pytest.raises(ValueError, match="pass `input_signature"):
        export_embedding_model(model, str(tmp_path / "m"))
    export_embedding_model(
        model, str(tmp_path / "m"), input_signature=tf.TensorSpec((None, 4), tf.float32)
    )
    out = tf.saved_model.load(str(tmp_path / "m")).signatures["serving_default"](
        inputs=tf.ones((2, 4))
    )
    np.testing.assert_allclose(np.linalg.norm(out["embeddings"], axis=1), 1.0, atol=1e-6)
    image = keras.Input((4, 4))
    with pytest.raises(ValueError, match=r"shape \(batch, dim\)"):
        export_embedding_model(keras.Model(image, image), str(tmp_path / "m2"))


# ------------------------------------------------------------------------ TFLite


def run_litert(path, x):
    interpreter = Interpreter(model_path=str(path))
    details = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(details["index"], list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(details["index"], x)
    interpreter.invoke()
    output = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    op_names = {op["op_name"] for op in interpreter._get_ops_details()}
    return output, op_names


@pytest.fixture(scope="module")
def tflite_files(digits, embedder, tmp_path_factory):
    root = tmp_path_factory.mktemp("tflite")
    x_train = digits[0]
    paths = {}
    for quantization in (None, "float16", "int8"):
        paths[quantization] = root / f"embedder_{quantization}.tflite"
        representative = x_train[:300] if quantization == "int8" else None
        export_tflite(embedder, str(paths[quantization]), quantization, representative)
    return paths


def test_tflite_float32_matches_keras(digits, embedder, tflite_files):
    x_test = digits[2]
    got, op_names = run_litert(tflite_files[None], x_test)
    assert np.abs(got - keras_embeddings(embedder, x_test)).max() <= 1e-5
    # Builtin ops only: no Flex (Select TF) or custom ops to ship to phones.
    assert not any(name.startswith("Flex") or name == "CUSTOM" for name in op_names)
    assert "L2_NORMALIZATION" in op_names


@pytest.mark.parametrize("quantization", ["float16", "int8"])
def test_quantized_tflite_keeps_embedding_direction(digits, embedder, tflite_files, quantization):
    x_test = digits[2]
    got, op_names = run_litert(tflite_files[quantization], x_test)
    want = keras_embeddings(embedder, x_test)
    cosine = np.sum(got * want, axis=1) / np.linalg.norm(got, axis=1)
    assert cosine.min() >= 0.99
    if quantization == "int8":
        assert "QUANTIZE" in op_names  # float in, int8 inside, float out


def test_quantized_tflite_files_are_smaller(tflite_files):
    sizes = {q: os.path.getsize(path) for q, path in tflite_files.items()}
    assert sizes["int8"] < sizes["float16"] < sizes[None]


def test_tflite_errors(tmp_path, embedder, digits):
    path = str(tmp_path / "m.tflite")
    with pytest.raises(ValueError, match="`representative_data` is required"):
        export_tflite(embedder, path, quantization="int8")
    with pytest.raises(ValueError, match="`quantization` must be one of"):
        export_tflite(embedder, path, quantization="int4")
    with pytest.raises(ValueError, match="only used with quantization='int8'"):
        export_tflite(embedder, path, quantization="float16", representative_data=digits[0])
    with pytest.raises(
        ValueError, match=r"`representative_data` must hold .* \(num_samples, 8, 8, 1\)"
    ):
        export_tflite(embedder, path, quantization="int8", representative_data=np.zeros((5, 64)))
    assert not os.path.exists(path)
