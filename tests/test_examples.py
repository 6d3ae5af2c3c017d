"""Every example runs offline on the bundled digits with a tiny budget (one epoch, few images)."""

from __future__ import annotations

import importlib.util
import os

import pytest

pytest.importorskip("tensorflow")
import keras  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                reason="the examples use tf.data, SavedModel and TFLite")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}",
                                                  os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mnist_triplet(tmp_path):
    metrics = load_example("mnist_triplet").main(
        ["--epochs", "1", "--max-images", "200", "--out", str(tmp_path)])
    assert 0.0 <= metrics["map_at_r"] <= 1.0
    for name in ("embeddings_2d_train.png", "embeddings_2d_test.png", "embeddings_64d_test.png"):
        assert (tmp_path / name).exists()


def test_arcface_digits(tmp_path):
    results = load_example("arcface_digits").main(
        ["--epochs", "1", "--samples-per-class", "8", "--out", str(tmp_path)])
    assert set(results) == {"seen (held-out 0-4)", "unseen (5-9)", "unseen, raw pixels"}
    assert (tmp_path / "best.weights.h5").exists()


def test_s2sd_digits():
    pytest.importorskip("keras_dml.models.s2sd")
    results = load_example("s2sd_digits").main(["--epochs", "1", "--steps", "2"])
    # The target heads are dropped: the embedding model is the same size either way.
    assert (results["baseline"]["parameters at test time"]
            == results["MSDF"]["parameters at test time"])


def test_loco_digits():
    pytest.importorskip("keras_dml.models.loco")
    results = load_example("loco_digits").main(
        ["--epochs", "1", "--variants", "loco", "--max-images", "256"])
    assert set(results) == {"raw pixels", "loco"}


def test_serve_scann(tmp_path):
    results = load_example("serve_scann").main(["--epochs", "1", "--out", str(tmp_path)])
    assert (tmp_path / "retriever" / "1" / "saved_model.pb").exists()
    assert results["scann_exact_overlap"] > 0.9  # brute force below ScaNN's tree threshold


def test_tflite_edge(tmp_path):
    results = load_example("tflite_edge").main(
        ["--epochs", "1", "--timing-runs", "2", "--out", str(tmp_path)])
    assert set(results) == {"float32", "float16", "int8"}
    assert results["int8"]["kib"] < results["float32"]["kib"]
    assert results["float32"]["mean_cosine_to_keras"] > 0.999
