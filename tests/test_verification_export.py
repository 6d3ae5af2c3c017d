"""Tests for keras_dml.export.verification: a calibrated verifier served from a fresh process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from sklearn.datasets import load_digits

from keras_dml.evaluation.verification import calibrate_threshold, pair_scores
from keras_dml.export.verification import export_verification_model, load_calibration
from keras_dml.models.siamese import SiameseModel, make_pair_indices, make_pairs

_QUIET_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

# The fresh process imports TensorFlow only (no keras_dml, no Keras model
# code) and lists any op that stock TensorFlow does not register.
_SERVE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.framework import op_def_registry

    args = json.loads(sys.argv[1])
    inputs = np.load(args["inputs"])

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

    report = {}
    for name, path in args["models"].items():
        model = tf.saved_model.load(path)
        arrays = {}
        for split in ("test", "val"):
            out = model.signatures["serving_default"](
                inputs_a=tf.constant(inputs[split + "_a"]),
                inputs_b=tf.constant(inputs[split + "_b"]),
            )
            arrays.update({split + "/" + key: value.numpy() for key, value in out.items()})
        embed = model.signatures["embed"](inputs=tf.constant(inputs["test_a"]))
        arrays["embeddings"] = embed["embeddings"].numpy()
        np.savez(os.path.join(args["out"], name + ".npz"), **arrays)
        constants = model.signatures["calibration"]()
        report[name] = {
            "unknown_ops": unknown_ops(path),
            "signatures": sorted(model.signatures.keys()),
            "threshold": float(constants["threshold"].numpy()),
            "far": float(constants["far"].numpy()),
            "distance": constants["distance"].numpy().decode(),
            "higher_is_same": bool(constants["higher_is_same"].numpy()),
            "variables": [float(model.threshold.numpy()), float(model.far.numpy())],
        }
    print("REPORT=" + json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = (data.images / 16.0).astype("float32")[..., np.newaxis]
    return x, data.target


@pytest.fixture(scope="module")
def siamese(digits):
    """A Siamese model trained briefly on pairs of digits 0-4."""
    x, y = digits
    keras.utils.set_random_seed(0)
    backbone = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(16),
            keras.layers.UnitNormalization(),
        ]
    )
    model = SiameseModel(backbone, distance="euclidean")
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    seen = y < 5
    model.fit(*make_pairs(x[seen], y[seen], num_pairs=3000, seed=0), epochs=3, verbose=0)
    return model


@pytest.fixture(scope="module")
def served(digits, siamese, tmp_path_factory):
    """Calibrates on pairs of digits 5-9, exports two verifiers and serves both in one process."""
    root = tmp_path_factory.mktemp("verifiers")
    x, y = digits
    unseen = np.flatnonzero(y >= 5)
    x, y = x[unseen], y[unseen]
    val_a, val_b, val_same = make_pair_indices(y, num_pairs=4000, seed=1)
    test_a, test_b, test_same = make_pair_indices(y, num_pairs=300, seed=2)
    embed = siamese.embedding_model()
    e = embed.predict(x, verbose=0)
    calibration = calibrate_threshold(e[val_a], e[val_b], val_same, distance="euclidean", far=1e-2)
    paths = {"calibrated": str(root / "calibrated"), "manual": str(root / "manual")}
    export_verification_model(siamese, paths["calibrated"], calibration)
    export_verification_model(embed, paths["manual"], threshold=0.8, distance="cosine")
    inputs = str(root / "inputs.npz")
    np.savez(
        inputs, val_a=x[val_a], val_b=x[val_b], test_a=x[test_a], test_b=x[test_b]
    )
    args = {"models": paths, "inputs": inputs, "out": str(root)}
    result = subprocess.run(
        [sys.executable, "-c", _SERVE_SCRIPT, json.dumps(args)],
        capture_output=True, text=True, env=_QUIET_ENV, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.split("REPORT=")[-1])
    outputs = {name: dict(np.load(root / f"{name}.npz")) for name in paths}
    return {
        "report": report, "outputs": outputs, "paths": paths, "calibration": calibration,
        "e": e, "pairs": {"val": (val_a, val_b, val_same), "test": (test_a, test_b, test_same)},
    }


def test_served_models_use_stock_ops_only(served):
    for report in served["report"].values():
        assert report["unknown_ops"] == []
        assert report["signatures"] == ["calibration", "embed", "serving_default", "verify"]


def test_served_scores_and_decisions_match_in_process(served):
    e = served["e"]
    a, b, _ = served["pairs"]["test"]
    for name, distance, threshold in (
        ("calibrated", "euclidean", served["calibration"].threshold),
        ("manual", "cosine", 0.8),
    ):
        out = served["outputs"][name]
        expected = pair_scores(e[a], e[b], distance)
        np.testing.assert_allclose(out["test/score"], expected, atol=1e-5)
        decided = expected >= threshold if distance == "cosine" else expected <= threshold
        clear = np.abs(expected - threshold) > 1e-5
        np.testing.assert_array_equal(out["test/same"][clear], decided[clear])
        assert out["test/same"].dtype == bool
        np.testing.assert_allclose(out["test/threshold"], np.float32(threshold))
        # Both outcomes occur: the test is not vacuous.
        assert 0 < out["test/same"].sum() < len(a)


def test_served_model_reproduces_its_stated_far(served):
    calibration = served["calibration"]
    _, _, same = served["pairs"]["val"]
    out = served["outputs"]["calibrated"]
    served_far = np.mean(out["val/same"][same == 0])
    # Float rounding may flip the one pair that sits on the threshold.
    assert abs(served_far - calibration.measured_far) <= 1.0 / calibration.num_negative
    assert served_far <= calibration.far + 1.0 / calibration.num_negative
    np.testing.assert_allclose(out["val/far"], np.float32(1e-2))


def test_calibration_constants_and_record(served):
    calibrated = served["report"]["calibrated"]
    calibration = served["calibration"]
    assert calibrated["threshold"] == pytest.approx(calibration.threshold, abs=1e-7)
    assert calibrated["far"] == pytest.approx(1e-2)
    assert calibrated["distance"] == "euclidean" and calibrated["higher_is_same"] is False
    assert calibrated["variables"] == [calibrated["threshold"], calibrated["far"]]
    record = load_calibration(served["paths"]["calibrated"])
    assert record["threshold"] == pytest.approx(calibration.threshold)
    assert record["decision"] == "score <= threshold"
    assert record["calibration"]["measured_far"] == calibration.measured_far
    assert record["calibration"]["num_negative"] == calibration.num_negative

    manual = served["report"]["manual"]
    assert math.isnan(manual["far"]) and manual["distance"] == "cosine"
    assert manual["higher_is_same"] is True
    assert np.all(np.isnan(served["outputs"]["manual"]["test/far"]))
    record = load_calibration(served["paths"]["manual"])
    assert record["far"] is None and record["calibration"] is None


def test_embed_signature(served):
    a, _, _ = served["pairs"]["test"]
    e = served["e"][a]
    cosine_embeddings = served["outputs"]["manual"]["embeddings"]
    np.testing.assert_allclose(
        cosine_embeddings, e / np.linalg.norm(e, axis=1, keepdims=True), atol=1e-5
    )


def test_export_argument_errors(siamese, served, tmp_path):
    calibration = served["calibration"]
    embed = siamese.embedding_model()
    with pytest.raises(ValueError, match="contradicts"):
        export_verification_model(embed, str(tmp_path / "a"), calibration, far=0.5)
    with pytest.raises(ValueError, match="differs"):
        export_verification_model(siamese, str(tmp_path / "b"), 0.5, distance="cosine")
    with pytest.raises(ValueError, match="finite"):
        export_verification_model(embed, str(tmp_path / "c"), float("nan"))
    with pytest.raises(ValueError, match="distance"):
        export_verification_model(embed, str(tmp_path / "d"), 0.5, distance="manhattan")
    with pytest.raises(ValueError, match="far"):
        export_verification_model(embed, str(tmp_path / "e"), 0.5, far=2.0)
