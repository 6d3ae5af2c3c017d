"""RetrievalMetricsCallback feeds Keras's own callbacks; export_embedding_projector's files."""

from __future__ import annotations

import importlib.util
import os
import warnings

import keras
import numpy as np
import pytest

import keras_dml
from keras_dml.callbacks import RetrievalMetricsCallback, export_embedding_projector


def blobs(n_per_class=30, classes=4, dim=16, seed=0):
    """Gaussian clusters: easy to retrieve, so metrics are well above chance."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 3
    y = np.repeat(np.arange(classes), n_per_class)
    x = (centres[y] + rng.normal(size=(len(y), dim))).astype("float32")
    return x, y.astype("int32")


def small_model(learning_rate=1e-2, seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8),
                              keras.layers.UnitNormalization()])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate),
                  loss=keras_dml.TripletLoss(margin=0.2))
    return model


def test_early_stopping_checkpoint_and_plateau_see_the_metric(tmp_path):
    x, y = blobs()
    x_val, y_val = blobs(seed=1)
    path = str(tmp_path / "best.keras")
    checkpoint = keras.callbacks.ModelCheckpoint(path, monitor="val_map_at_r", mode="max",
                                                 save_best_only=True)
    callbacks = [
        RetrievalMetricsCallback((x_val, y_val), k=(1, 2)),
        keras.callbacks.EarlyStopping(monitor="val_map_at_r", mode="max", patience=5),
        checkpoint,
        keras.callbacks.ReduceLROnPlateau(monitor="val_map_at_r", mode="max", patience=5),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = small_model().fit(x, y, batch_size=40, epochs=3, callbacks=callbacks,
                                    verbose=0)
    unavailable = [str(w.message) for w in caught if "val_map_at_r" in str(w.message)]
    assert unavailable == []
    logs = history.history
    for name in ("val_precision_at_1", "val_recall_at_1", "val_recall_at_2", "val_r_precision",
                 "val_map_at_r", "val_nmi"):
        assert len(logs[name]) == 3
        assert all(0.0 <= v <= 1.0 for v in logs[name])
    assert os.path.exists(path)
    assert checkpoint.best == pytest.approx(max(logs["val_map_at_r"]))


def test_early_stopping_stops_when_map_at_r_stalls():
    x, y = blobs()
    # A zero learning rate freezes the model: MAP@R cannot improve after epoch 1.
    model = small_model(learning_rate=0.0)
    callbacks = [RetrievalMetricsCallback((x, y), nmi=False),
                 keras.callbacks.EarlyStopping(monitor="val_map_at_r", mode="max", patience=1)]
    history = model.fit(x, y, batch_size=40, epochs=10, callbacks=callbacks, verbose=0)
    assert len(history.history["loss"]) == 2
    assert "val_nmi" not in history.history


def test_every_n_epochs_and_dataset_validation_data():
    import tensorflow as tf

    x, y = blobs()
    as_arrays = RetrievalMetricsCallback((x, y), every_n_epochs=2, prefix="probe_")
    as_dataset = RetrievalMetricsCallback(tf.data.Dataset.from_tensor_slices((x, y)).batch(32),
                                          every_n_epochs=2, prefix="probe_")
    model = small_model()
    model.fit(x, y, batch_size=40, epochs=4, callbacks=[as_arrays, as_dataset], verbose=0)
    assert sorted(as_arrays.history) == [1, 3]
    assert sorted(as_dataset.history) == [1, 3]
    for epoch in (1, 3):
        a, b = as_arrays.history[epoch], as_dataset.history[epoch]
        assert set(a) == {"probe_precision_at_1", "probe_recall_at_1", "probe_recall_at_2",
                          "probe_recall_at_4", "probe_recall_at_8", "probe_r_precision",
                          "probe_map_at_r", "probe_nmi"}
        for name in a:
            assert a[name] == pytest.approx(b[name], abs=1e-6)


def test_embedding_model_argument_is_used():
    x, y = blobs()
    model = small_model()
    model.fit(x, y, batch_size=40, epochs=1, verbose=0)
    # Identity "embedding model": the metrics of the raw inputs, whatever the model.
    callback = RetrievalMetricsCallback((x, y), embedding_model=lambda inputs: inputs, nmi=False)
    callback.set_model(model)
    expected = keras_dml.evaluation.retrieval_metrics(x, y, nmi=False)
    assert callback.compute_metrics()["val_map_at_r"] == pytest.approx(expected["map_at_r"])


def test_reference_data_makes_a_gallery():
    x, y = blobs()
    queries, query_labels = blobs(n_per_class=5, seed=2)
    callback = RetrievalMetricsCallback((queries, query_labels), reference_data=(x, y),
                                        embedding_model=lambda inputs: inputs, nmi=False)
    expected = keras_dml.evaluation.retrieval_metrics(queries, query_labels, x, y, nmi=False)
    assert callback.compute_metrics() == {f"val_{k}": v for k, v in expected.items()}


@pytest.mark.parametrize(
    "kwargs, match",
    [({"every_n_epochs": 0}, "every_n_epochs"), ({"prefix": 3}, "prefix")],
)
def test_bad_arguments(kwargs, match):
    x, y = blobs()
    with pytest.raises(ValueError, match=match):
        RetrievalMetricsCallback((x, y), **kwargs)


def test_bad_validation_data():
    with pytest.raises(ValueError, match="validation_data"):
        RetrievalMetricsCallback((np.zeros((4, 2)),))
    with pytest.raises(ValueError, match="validation_data"):
        RetrievalMetricsCallback(3)


def test_projector_files(tmp_path):
    from google.protobuf import text_format
    from PIL import Image
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(10, 4)).astype("float32")
    images = rng.random((10, 8, 6, 1)).astype("float32")
    paths = export_embedding_projector(str(tmp_path), embeddings, labels=np.arange(10) % 3,
                                       metadata={"name": [f"item\t{i}" for i in range(10)]},
                                       images=images)
    config = text_format.Parse(open(paths["config"]).read(), ProjectorConfig())
    (info,) = config.embeddings
    assert info.tensor_path == "embeddings.tsv"
    assert list(info.tensor_shape) == [10, 4]
    assert list(info.sprite.single_image_dim) == [6, 8]
    np.testing.assert_allclose(np.loadtxt(paths["tensors"], delimiter="\t"), embeddings,
                               rtol=1e-5)
    rows = open(paths["metadata"]).read().splitlines()
    assert rows[0] == "label\tname"  # a header row, since there are two columns
    assert rows[1] == "0\titem 0"  # tabs inside values would break the TSV
    assert len(rows) == 11
    sprite = Image.open(paths["sprite"])
    assert sprite.size == (4 * 6, 4 * 8)  # ceil(sqrt(10)) = 4 thumbnails a side


def test_projector_single_column_has_no_header(tmp_path):
    paths = export_embedding_projector(str(tmp_path), np.eye(3), labels=["a", "b", "c"])
    assert open(paths["metadata"]).read().splitlines() == ["a", "b", "c"]
    assert "sprite" not in paths


def test_projector_rejects_mismatched_lengths(tmp_path):
    with pytest.raises(ValueError, match="label"):
        export_embedding_projector(str(tmp_path), np.eye(3), labels=[0, 1])
    with pytest.raises(ValueError, match="images"):
        export_embedding_projector(str(tmp_path), np.eye(3), images=np.zeros((2, 4, 4)))


def test_backend_is_checked_like_retrieval_metrics():
    x, y = blobs()
    with pytest.raises(ValueError) as from_callback:
        RetrievalMetricsCallback((x, y), backend="scann")
    with pytest.raises(ValueError) as from_function:
        keras_dml.evaluation.retrieval_metrics(x, y, backend="scann")
    assert str(from_callback.value) == str(from_function.value)
    assert "`backend` must be one of ('numpy', 'faiss')" in str(from_callback.value)


def test_get_config_round_trip():
    x, y = blobs()
    reference = blobs(n_per_class=5, seed=2)
    callback = RetrievalMetricsCallback(
        (x, y), k=(1, 3), every_n_epochs=2, prefix="probe_", distance="euclidean", nmi="exact",
        reference_data=reference, batch_size=64, verbose=1, backend="faiss",
    )
    config = callback.get_config()
    assert config["backend"] == "faiss" and config["nmi"] == "exact"
    assert config["validation_data"][0] is x and config["reference_data"] is reference
    restored = RetrievalMetricsCallback.from_config(config)
    assert restored.get_config() == config
    assert restored.backend == "faiss"


@pytest.mark.skipif(importlib.util.find_spec("faiss") is None,
                    reason="faiss is not installed (optional)")
def test_faiss_backend_equals_numpy_after_fit():
    x, y = blobs()
    x_val, y_val = blobs(seed=1)
    runs = {}
    for backend in ("numpy", "faiss"):
        callback = RetrievalMetricsCallback((x_val, y_val), k=(1, 2), backend=backend)
        small_model().fit(x, y, batch_size=40, epochs=2, callbacks=[callback], verbose=0)
        runs[backend] = callback.history
    assert runs["faiss"].keys() == runs["numpy"].keys() == {0, 1}
    for epoch, metrics in runs["numpy"].items():
        got = runs["faiss"][epoch]
        assert got.keys() == metrics.keys()
        for name, value in metrics.items():
            # NMI: faiss's k-means from the same seeds, not scikit-learn's.
            tolerance = 0.05 if name == "val_nmi" else 1e-6
            assert got[name] == pytest.approx(value, abs=tolerance), name
