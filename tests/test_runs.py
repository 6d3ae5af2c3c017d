"""The run library (`keras_dml.runs`): `TrainConfig`, `train_run`, `RunDir`.

`TrainConfig` is checked here on its own (types, ranges, unknown keys, the
round trip of today's and older `config.json` shapes); `train_run` is run
once on digits with a tiny budget and its run directory read back.
"""

from __future__ import annotations

import dataclasses
import doctest
import json
import os

import keras
import numpy as np
import pytest

from keras_dml.runs import RunDir, TrainConfig
from keras_dml.runs import config as config_module
from keras_dml.runs.rundir import RUN_FILES

# A config.json as `keras-dml train --dataset digits --epochs 1 --steps-per-epoch 2
# --max-images 120 --verbose 0 --s2sd --s2sd-features` writes it (run id and time aside),
# in the order it writes it.
TODAYS_CONFIG_JSON = """{
  "command": "train", "dataset": "digits", "loss": "triplet", "s2sd": true,
  "s2sd_target_dims": [128, 256, 512], "distillation_weight": 50.0, "s2sd_features": true,
  "epochs": 1, "steps_per_epoch": 2, "batch_size": null, "classes_per_batch": 5,
  "embedding_dim": 32, "learning_rate": 0.001, "centers_lr_multiplier": 10.0,
  "backbone": "small_conv", "weights": "imagenet", "image_size": null, "holdout": 0.2,
  "max_images": 120, "max_classes": null, "data_dir": null, "download": false,
  "projection": "pca", "seed": 0, "verbose": 0, "out": "/tmp/runs/ref2", "pipeline_args": [],
  "version": 1, "run_id": "ee9eb6858daf4fa080c458172616bf8c", "preprocessing": "unit",
  "input_shape": [8, 8, 1], "num_train_classes": 5, "samples_per_class": 16,
  "s2sd_feature_delay": 0, "fit_seconds": 22.9
}"""

# The shape written before run ids, --max-classes and --s2sd-features existed (and before
# `keras-dml index` added `pipeline_args`).
OLD_CONFIG = {
    "command": "train", "dataset": "cars196", "loss": "arcface", "s2sd": False,
    "s2sd_target_dims": None, "distillation_weight": 50.0, "epochs": 15,
    "steps_per_epoch": 100, "batch_size": None, "classes_per_batch": 16, "embedding_dim": 128,
    "learning_rate": 0.0001, "centers_lr_multiplier": 10.0, "backbone": "resnet50",
    "weights": "imagenet", "image_size": 224, "holdout": 0.2, "max_images": None,
    "data_dir": None, "download": False, "projection": "pca", "seed": 0, "verbose": 1,
    "out": "runs/cars", "version": 1, "preprocessing": "caffe", "input_shape": [224, 224, 3],
    "num_train_classes": 98, "samples_per_class": 4, "fit_seconds": 812.5,
}


def test_defaults_are_the_command_line_defaults():
    from keras_dml.cli.main import build_parser

    args = build_parser().parse_args(["train", "--out", "runs/x"])
    args.pipeline_args = []  # as `main` sets it
    options = {key: value for key, value in vars(args).items() if key != "handler"}
    assert TrainConfig.from_dict(options) == TrainConfig(out="runs/x")
    # Every option of `keras-dml train` is a key of TrainConfig, and nothing else is.
    assert set(options) == set(TrainConfig.all_keys()) - {
        f.name for f in dataclasses.fields(TrainConfig) if f.metadata["run"]}


def test_todays_config_json_round_trips_exactly():
    written = json.loads(TODAYS_CONFIG_JSON)
    config = TrainConfig.from_dict(written)
    assert config.s2sd_target_dims == (128, 256, 512) and config.input_shape == (8, 8, 1)
    assert config.learning_rate == 0.001 and config.s2sd_feature_delay == 0
    again = config.to_dict()
    assert again == written
    assert list(again) == list(written)  # key order too: the file is written byte for byte
    assert json.dumps(again, indent=2) == json.dumps(written, indent=2)
    assert TrainConfig.from_dict(again) == config


def test_an_old_config_json_still_loads():
    config = TrainConfig.from_dict(OLD_CONFIG)
    assert config.run_id is None and config.max_classes is None and not config.s2sd_features
    assert config.dataset == "cars196" and config.num_train_classes == 98
    written = config.to_dict()
    # What the old file had is kept; the keys it lacked are written with their defaults.
    assert {key: written[key] for key in OLD_CONFIG} == OLD_CONFIG
    assert set(written) - set(OLD_CONFIG) == {"s2sd_features", "max_classes", "pipeline_args"}
    assert written["pipeline_args"] == [] and written["max_classes"] is None


def test_a_config_before_the_run_has_no_run_keys():
    written = TrainConfig(dataset="digits").to_dict()
    assert "run_id" not in written and "fit_seconds" not in written
    assert list(written)[:3] == ["command", "dataset", "loss"]
    assert written["s2sd_target_dims"] is None  # an option left to the run is written as null


def test_unknown_keys_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown train config key.*: epoch, lr;"):
        TrainConfig.from_dict({"dataset": "digits", "epoch": 1, "lr": 0.1})
    with pytest.raises(ValueError, match="`command` must be 'train'"):
        TrainConfig.from_dict({"command": "evaluate"})
    with pytest.raises(ValueError, match="`pipeline_args` must be"):
        TrainConfig.from_dict({"pipeline_args": ["--runner=X"]})
    with pytest.raises(ValueError, match="must be a dict"):
        TrainConfig.from_dict([("dataset", "digits")])
    with pytest.raises(TypeError):  # the constructor itself takes only its fields
        TrainConfig(epoch=1)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"dataset": "imagenet"}, "unknown dataset 'imagenet'"),
        ({"dataset": 3}, "`dataset` must be a non-empty string"),
        ({"loss": "hinge"}, "unknown loss 'hinge'"),
        ({"epochs": 0}, "`epochs` must be a positive integer, got 0"),
        ({"epochs": 2.0}, "`epochs` must be a positive integer, got 2.0"),
        ({"epochs": True}, "`epochs` must be a positive integer"),
        ({"steps_per_epoch": -1}, "`steps_per_epoch` must be a positive integer"),
        ({"batch_size": "80"}, "`batch_size` must be a positive integer"),
        ({"learning_rate": 0.0}, "`learning_rate` must be > 0"),
        ({"learning_rate": float("nan")}, "`learning_rate` must be a finite number"),
        ({"distillation_weight": -1.0}, "`distillation_weight` must be >= 0"),
        ({"centers_lr_multiplier": "10"}, "`centers_lr_multiplier` must be a finite number"),
        ({"holdout": 1.0}, "`holdout` must be a fraction in \\[0, 1\\)"),
        ({"holdout": -0.1}, "`holdout` must be >= 0"),
        ({"seed": -1}, "`seed` must be an integer >= 0"),
        ({"verbose": 3}, "`verbose` must be one of 0, 1, 2"),
        ({"backbone": "vgg16"}, "`backbone` must be one of auto, small_conv, resnet50"),
        ({"weights": "random"}, "`weights` must be one of imagenet, none"),
        ({"projection": "tsne"}, "`projection` must be one of pca, umap, auto"),
        ({"s2sd": 1}, "`s2sd` must be True or False"),
        ({"download": "yes"}, "`download` must be True or False"),
        ({"s2sd_target_dims": [128, 0]}, "`s2sd_target_dims\\[1\\]` must be a positive integer"),
        ({"s2sd_target_dims": "128"}, "`s2sd_target_dims` must be a list"),
        ({"max_classes": 1}, "`max_classes` must be an integer >= 2"),
        ({"max_classes": 5, "dataset": "digits"}, "`max_classes` applies to dataset 'glyphs'"),
        ({"s2sd_features": True}, "`s2sd_features=True` needs `s2sd=True`"),
        ({"data_dir": ""}, "`data_dir` must be a non-empty string"),
        ({"input_shape": [8, 8, 0]}, "`input_shape\\[2\\]` must be a positive integer"),
        ({"fit_seconds": -1.0}, "`fit_seconds` must be >= 0"),
    ],
)
def test_bad_values_raise_a_value_error_naming_the_key(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(options)


def test_values_are_stored_in_their_type_and_canonical():
    config = TrainConfig(dataset="CUB", loss="Multi_Similarity", epochs=np.int64(3),
                         learning_rate=1, s2sd=True, s2sd_target_dims=[64, 128])
    assert config.dataset == "caltech_birds2011" and config.loss == "multisimilarity"
    assert type(config.epochs) is int and type(config.learning_rate) is float
    assert config.s2sd_target_dims == (64, 128)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 4
    assert config.replace(epochs=4).epochs == 4 and config.epochs == 3
    with pytest.raises(ValueError, match="`epochs`"):
        config.replace(epochs=0)


def test_the_cli_modules_re_export_the_library():
    from keras_dml.cli import registry as cli_registry
    from keras_dml.cli import rundir as cli_rundir
    from keras_dml.cli.errors import CommandError
    from keras_dml.runs import RunError, registry, rundir

    assert cli_rundir.RunDir is RunDir and cli_rundir.RUN_FILES is RUN_FILES
    assert cli_rundir.write_run is rundir.write_run
    assert cli_registry.LOSSES is registry.LOSSES
    assert CommandError is RunError


@pytest.mark.parametrize("module", ["config", "rundir", "data", "build"])
def test_docstring_examples_run(module):
    import importlib

    found = importlib.import_module(f"keras_dml.runs.{module}")
    result = doctest.testmod(found, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_rundir_train_config_names_a_bad_file(tmp_path):
    from keras_dml.runs import RunError

    (tmp_path / "config.json").write_text(json.dumps({"dataset": "digits", "holdout": 0.2,
                                                      "seed": 0, "epochs": 0}))
    with pytest.raises(RunError, match="config.json is not a train config .*`epochs`"):
        RunDir(tmp_path).train_config()
    assert config_module.as_train_config({"dataset": "digits"}).dataset == "digits"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("train_run writes SavedModels and TFLite files")
    from keras_dml.runs import train_run

    out = str(tmp_path_factory.mktemp("runs") / "digits")
    lines = []
    result = train_run({"dataset": "digits", "epochs": 1, "steps_per_epoch": 2,
                        "max_images": 120, "verbose": 0}, out, log=lines.append)
    return out, result, lines


def test_train_run_writes_the_run_directory(trained):
    out, result, lines = trained
    run = RunDir(out)
    assert result.run.path == out and result.kept is None
    for role in RUN_FILES:
        if role not in ("tflite_float16", "tflite_int8"):  # written by export_run only
            assert os.path.exists(run.file(role)), role
    assert lines == ["keras-dml: training triplet on digits (120 images of 5 classes; "
                     "5 classes x 16 images per batch, 2 steps per epoch)"]
    config = result.config
    assert config.backbone == "small_conv" and config.embedding_dim == 32
    assert config.input_shape == (8, 8, 1) and config.out == out and config.fit_seconds >= 0
    written = json.loads(open(run.config).read())
    assert written == config.to_dict() and run.train_config() == config
    metrics = json.loads(open(run.metrics).read())
    assert metrics == json.loads(json.dumps(result.metrics))
    assert metrics["run_id"] == config.run_id and metrics["sizes"]["train"] == 120
    assert 0.0 <= metrics["unseen"]["map_at_r"] <= 1.0


def test_evaluate_and_search_a_trained_run(trained):
    from keras_dml.runs import evaluate_run, search_run

    out, result, _ = trained
    evaluated = evaluate_run(out)
    assert evaluated.path == RunDir(out).metrics and evaluated.config == result.config
    # The same Keras model on the same data: the same scores as training wrote.
    for key, value in result.metrics["unseen"].items():
        assert evaluated.metrics["unseen"][key] == pytest.approx(value, abs=1e-6), key
    found = search_run(out, query_index=3, k=4)
    labels = np.load(RunDir(out).test_labels)
    assert found.k == 4 and 3 not in found.ids and found.query_label == labels[3]
    np.testing.assert_array_equal(found.labels, labels[found.ids])
    assert np.all(np.diff(found.scores) <= 1e-6) and os.path.exists(found.png)


def test_train_run_refuses_a_bad_config_before_training(tmp_path):
    from keras_dml.runs import train_run

    with pytest.raises(ValueError, match="unknown train config key"):
        train_run({"dataset": "digits", "epoch": 1}, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_the_command_line_reports_a_bad_option_as_one_usage_line(tmp_path, capsys):
    from keras_dml.cli.main import main

    code = main(["train", "--learning-rate", "0", "--out", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err == "keras-dml train: error: `learning_rate` must be > 0.0, got 0.0.\n"
    assert not (tmp_path / "run").exists()
