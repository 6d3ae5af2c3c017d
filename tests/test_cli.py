"""The `keras-dml` command line: one training run, then evaluate/search/export on its directory.

Commands run in-process through `keras_dml.cli.main.main(argv)`; only the
checks of the real console entry point (exit status, one-line stderr, no
traceback) start subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow")
import keras  # noqa: E402

from keras_dml.cli import registry  # noqa: E402
from keras_dml.cli.main import main  # noqa: E402

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                reason="the CLI exports SavedModels and TFLite files")

METRICS = {"precision_at_1", "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8",
           "r_precision", "map_at_r", "nmi"}


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "digits")
    code = main(["train", "--dataset", "digits", "--loss", "triplet", "--epochs", "1",
                 "--max-images", "240", "--verbose", "0", "--out", out])
    assert code == 0
    return out


def test_train_writes_every_artefact(run_dir):
    for name in ("model.keras", "embedding.keras", "saved_model", "retrieval_model",
                 "embedding.tflite", "index", "metrics.json", "history.json", "config.json",
                 "embeddings_2d.png", "retrieval.png", "distances.png", "training_curves.png",
                 "projector/projector_config.pbtxt", "test_labels.npy", "test_thumbnails.npy"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    # Both splits are reported, next to the raw-pixel and untrained baselines.
    for split in ("seen", "unseen"):
        assert set(metrics[split]) == METRICS
        assert set(metrics["baselines"]["raw_pixels"][split]) == METRICS
        assert set(metrics["baselines"]["untrained"][split]) == METRICS
        assert set(metrics["features"][split]) == METRICS  # the trained backbone's φ
    assert metrics["sizes"]["unseen"] == 896
    history = json.load(open(os.path.join(run_dir, "history.json")))
    assert "val_map_at_r" in history  # RetrievalMetricsCallback on held-out seen images


def test_exports_agree_with_the_keras_model(run_dir):
    import tensorflow as tf

    from keras_dml.index import Index

    embedder = keras.saving.load_model(os.path.join(run_dir, "embedding.keras"), compile=False)
    x = np.random.default_rng(0).random((4, 8, 8, 1)).astype("float32")
    expected = embedder.predict(x, verbose=0)
    serve = tf.saved_model.load(os.path.join(run_dir, "saved_model")).signatures[
        "serving_default"]
    np.testing.assert_allclose(serve(inputs=tf.constant(x))["embeddings"].numpy(), expected,
                               atol=1e-5)
    from keras_dml.runs.embed import tflite_embed_fn

    tflite = tflite_embed_fn(os.path.join(run_dir, "embedding.tflite"))(x)
    np.testing.assert_allclose(tflite, expected, atol=1e-4)
    index = Index.load(os.path.join(run_dir, "index"))
    assert len(index) == 896 and type(index).__name__ == "ScaNNIndex"


def test_evaluate_prints_metrics_table_and_artefacts(run_dir, capsys):
    code, out, _ = run(["evaluate", run_dir], capsys)
    assert code == 0
    assert "held-out images, seen classes" in out and "unseen classes" in out
    assert "map_at_r" in out and "raw px" in out
    assert f"{os.path.join(run_dir, 'embedding.tflite')}" in out


def test_search_prints_neighbours_and_saves_a_strip(run_dir, capsys):
    code, out, _ = run(["search", run_dir, "--query-index", "3", "-k", "4"], capsys)
    assert code == 0
    labels = np.load(os.path.join(run_dir, "test_labels.npy"))
    assert f"query: test image 3, label {labels[3]}" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4]
    assert all(int(r[2]) == labels[int(r[1])] for r in rows)  # printed labels are the truth
    assert os.path.exists(os.path.join(run_dir, "search_3.png"))


def test_export_int8_then_evaluate_it(run_dir, capsys):
    code, out, _ = run(["export", run_dir, "--tflite", "int8"], capsys)
    assert code == 0
    assert os.path.exists(os.path.join(run_dir, "embedding_int8.tflite"))
    mean_cosine = float(out.split("cosine similarity mean ")[1].split(",")[0])
    assert mean_cosine > 0.98
    code, out, _ = run(["evaluate", run_dir, "--using", "tflite-int8"], capsys)
    assert code == 0
    metrics = json.load(open(os.path.join(run_dir, "metrics_tflite-int8.json")))
    assert set(metrics["unseen"]) == METRICS


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--dataset", "imagenet", "--out", "x"], "unknown dataset 'imagenet'"),
        (["train", "--loss", "hinge", "--out", "x"], "unknown loss 'hinge'"),
        (["train", "--epochs", "0", "--out", "x"], "--epochs"),
        (["train", "--s2sd-features", "--out", "x"], "--s2sd-features needs --s2sd"),
        (["train", "--dataset", "digits", "--max-classes", "5", "--out", "x"],
         "--max-classes applies to --dataset glyphs only"),
        (["train", "--max-classes", "1", "--out", "x"], "--max-classes must be at least 2"),
        (["evaluate", "/nonexistent/run"], "does not exist"),
        (["search", "/nonexistent/run", "--query-index", "0"], "does not exist"),
        (["export", "/nonexistent/run", "--tflite", "int8"], "does not exist"),
    ],
)
def test_usage_errors_are_one_line(argv, message, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("keras-dml ") and message in err
    assert "Traceback" not in err and out == ""


def test_not_a_run_directory_and_bad_query(tmp_path, run_dir, capsys):
    code, _, err = run(["evaluate", str(tmp_path)], capsys)
    assert code == 2 and "no config.json" in err
    code, _, err = run(["search", run_dir, "--query-index", "100000"], capsys)
    assert code == 1 and err.count("\n") == 1 and "out of range" in err
    code, _, err = run(["evaluate", run_dir, "--using", "tflite-float16"], capsys)
    assert code == 1 and "keras-dml export" in err


def test_transfer_note_is_honest():
    from keras_dml.cli.commands import transfer_note

    metrics = {"unseen": {"map_at_r": 0.4},
               "baselines": {"raw_pixels": {"unseen": {"map_at_r": 0.6}},
                             "untrained": {"unseen": {"map_at_r": 0.5}}}}
    note = transfer_note(metrics)
    assert "worse than raw pixels (MAP@R 0.400 vs 0.600)" in note
    assert "does not transfer" in note
    # Backbone features that beat the baseline are pointed to; ones that do not, are not.
    metrics["features"] = {"unseen": {"map_at_r": 0.65}}
    note = transfer_note(metrics)
    assert "features before the embedding layer do transfer (MAP@R 0.650)" in note
    metrics["features"]["unseen"]["map_at_r"] = 0.55
    assert "does not transfer" in transfer_note(metrics)
    metrics["unseen"]["map_at_r"] = 0.7
    assert transfer_note(metrics) is None


def test_metrics_table_shows_the_features_column():
    from keras_dml.cli.commands import format_metrics_table

    scores = dict.fromkeys(METRICS, 0.5)
    table = format_metrics_table({"seen": scores, "unseen": scores,
                                  "features": {"seen": scores, "unseen": scores}})
    header = table.splitlines()[1]
    assert header.count("trained") == 2 and header.count("features") == 2


@pytest.mark.parametrize("loss, s2sd", [("triplet", False), ("cosface", False),
                                        ("multisimilarity", True)])
def test_one_backbone_pass_gives_the_embedding_and_the_features(loss, s2sd):
    from keras_dml.runs.build import build_training_model, embedding_and_features_model

    config = {"loss": loss, "backbone": "small_conv", "embedding_dim": 8, "learning_rate": 1e-3,
              "centers_lr_multiplier": 10.0, "s2sd": s2sd, "s2sd_target_dims": [16, 32]}
    _, embedder, features = build_training_model(config, (8, 8, 1), num_classes=5)
    both = embedding_and_features_model(embedder, features)
    x = np.random.default_rng(0).normal(size=(6, 8, 8, 1)).astype("float32")
    embeddings, phi = (np.asarray(o) for o in both.predict_on_batch(x))
    np.testing.assert_allclose(embeddings, np.asarray(embedder.predict_on_batch(x)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(phi, np.asarray(features.predict_on_batch(x)), rtol=1e-5,
                               atol=1e-6)
    assert embeddings.shape == (6, 8) and phi.shape == (6, 1024)
    # Only the backbone's own weights, shared with the embedder: no copy.
    assert {id(w) for w in both.weights} == {id(w) for w in embedder.weights}
    with pytest.raises(ValueError, match="does not start with the backbone"):
        embedding_and_features_model(embedder, build_training_model(config, (8, 8, 1), 5)[2])


def test_names_are_forgiving():
    assert registry.canonical_loss("Multi_Similarity") == "multisimilarity"
    assert registry.canonical_loss("ProxyAnchor") == "proxy-anchor"
    assert registry.canonical_dataset("CUB") == "caltech_birds2011"
    assert registry.canonical_dataset("sop") == "stanford_online_products"
    for spec in registry.LOSSES.values():
        spec.resolve()  # every advertised loss exists in this keras-dml


# Mocked classes are mostly singletons: their retrieval metrics are NaN, with a warning.
@pytest.mark.filterwarnings("ignore:No query has a reference")
def test_tfds_dataset_with_a_margin_head_and_s2sd(tmp_path, capsys):
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("keras_dml.models.s2sd")
    out = str(tmp_path / "cub")
    with tfds.testing.mock_data(num_examples=48):
        code, stdout, _ = run(["train", "--dataset", "cub", "--loss", "cosface", "--s2sd",
                               "--backbone", "small_conv", "--image-size", "16", "--epochs", "1",
                               "--verbose", "0", "--out", out], capsys)
    assert code == 0, stdout
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["num_train_classes"] == 100 and config["input_shape"] == [16, 16, 3]
    assert config["s2sd_target_dims"] == [128, 256, 512]
    assert os.path.exists(os.path.join(out, "embedding.tflite"))
    assert np.load(os.path.join(out, "test_labels.npy")).min() >= 100


def test_s2sd_with_feature_distillation_on_digits(tmp_path, capsys):
    pytest.importorskip("keras_dml.models.s2sd")
    out = str(tmp_path / "msdf")
    code, stdout, _ = run(["train", "--dataset", "digits", "--loss", "multisimilarity",
                           "--s2sd", "--s2sd-features",
                           "--epochs", "2", "--steps-per-epoch", "8", "--max-images", "240",
                           "--verbose", "0", "--out", out], capsys)
    assert code == 0, stdout
    assert "S2SD (MSDF)" in stdout
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["s2sd_feature_delay"] == 2  # an eighth of 2 x 8 steps
    history = json.load(open(os.path.join(out, "history.json")))
    assert "feature_distillation" in history and "distillation" in history
    assert np.isfinite(history["loss"]).all()


def _console(tmp_path):
    script = shutil.which("keras-dml", path=os.path.dirname(sys.executable))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return ([script] if script else [sys.executable, "-m", "keras_dml.cli"]), env


def test_console_unknown_loss_is_one_line(tmp_path):
    command, env = _console(tmp_path)
    result = subprocess.run([*command, "train", "--loss", "nope", "--out", str(tmp_path / "x")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "keras-dml train: error: unknown loss 'nope'; choose from: "
        + ", ".join(registry.LOSSES)]


def test_console_unavailable_tfds_dataset_is_one_line(tmp_path):
    command, env = _console(tmp_path)
    empty = tmp_path / "tfds"
    empty.mkdir()
    result = subprocess.run(
        [*command, "train", "--dataset", "cars196", "--data-dir", str(empty), "--out",
         str(tmp_path / "x")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("keras-dml")]
    assert len(lines) == 1 and "not available offline" in lines[0]
    assert "Traceback" not in result.stderr


def test_glyphs_are_the_default_dataset_and_train_end_to_end(tmp_path, capsys):
    # The default run: many-class glyphs, scored on characters never trained on.
    out = str(tmp_path / "glyphs")
    code, printed, _ = run(["train", "--epochs", "1", "--steps-per-epoch", "3",
                            "--max-classes", "40", "--verbose", "0", "--out", out], capsys)
    assert code == 0
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["dataset"] == "glyphs" and config["backbone"] == "small_conv"
    assert config["input_shape"] == [32, 32, 1]
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    unseen_classes = np.unique(np.load(os.path.join(out, "test_labels.npy")))
    assert config["num_train_classes"] == 24 and config["max_classes"] == 40
    assert list(unseen_classes) == list(range(24, 40))
    for source in ("raw_pixels", "untrained"):
        assert set(metrics["baselines"][source]["unseen"]) == METRICS
    assert "unseen classes" in printed and "raw px" in printed
