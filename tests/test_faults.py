"""Failures a hostile user found (issue #15): nothing lost, nothing silent.

Index persistence and edges, the retrieval SavedModel on empty and
non-finite batches, and the command line's run directories. The losses'
bad inputs inside `fit` are in `tests/test_loss_faults.py` (every backend).
"""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest

from keras_dml import _atomic as atomic
from keras_dml.index import ExactIndex, Index, ScaNNIndex


def _vectors(n=50, dim=8, seed=0):
    return np.random.default_rng(seed).normal(size=(n, dim)).astype("float32")


def _saved(path, n=20, seed=0, overwrite=False):
    index = ExactIndex()
    index.add(_vectors(n, seed=seed))
    index.save(path, overwrite=overwrite)
    return index


# ------------------------------------------------------------ Index.save


def test_overwrite_never_deletes_files_the_index_did_not_write(tmp_path):
    path = tmp_path / "index"
    _saved(path)
    (path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        _saved(path, seed=1, overwrite=True)
    assert (path / "notes.txt").read_text() == "mine"
    assert len(Index.load(path)) == 20


def test_overwrite_refuses_a_directory_that_merely_holds_an_index_json(tmp_path):
    path = tmp_path / "project"
    path.mkdir()
    (path / "index.json").write_text('{"my": "own file"}')
    (path / "data.csv").write_text("1,2")
    index = ExactIndex()
    index.add(_vectors())
    with pytest.raises(FileExistsError, match="not a saved index"):
        index.save(path, overwrite=True)
    assert (path / "data.csv").read_text() == "1,2"


@pytest.mark.parametrize("where", ["_write", "_swap"])
def test_an_interrupted_overwrite_keeps_the_old_index(tmp_path, monkeypatch, where):
    path = tmp_path / "index"
    old = _saved(path)
    new = ExactIndex()
    new.add(_vectors(30, seed=1))
    if where == "_write":
        monkeypatch.setattr(ExactIndex, "_write_extra", _interrupt)
    else:  # at the final rename
        monkeypatch.setattr(atomic, "exchange", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        new.save(path, overwrite=True)
    loaded = Index.load(path)
    np.testing.assert_array_equal(loaded.embeddings, old.embeddings)
    assert sorted(os.listdir(tmp_path)) == ["index"]  # no staging directory left behind
    monkeypatch.undo()
    new.save(path, overwrite=True)
    assert len(Index.load(path)) == 30
    assert sorted(os.listdir(tmp_path)) == ["index"]


def test_overwrite_without_an_atomic_exchange_also_works(tmp_path, monkeypatch):
    path = tmp_path / "index"
    _saved(path)
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    new = ExactIndex()
    new.add(_vectors(30, seed=1))
    new.save(path, overwrite=True)
    assert len(Index.load(path)) == 30
    assert sorted(os.listdir(tmp_path)) == ["index"]


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


_KILLED_WRITER = """
import os, signal, sys
from keras_dml import _atomic
staging = _atomic.make_staging(sys.argv[1])
open(os.path.join(staging, "embeddings.npy"), "wb").write(b"half")
os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_writer_leaves_staging(target):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target)], timeout=120)
    assert done.returncode == -9
    left = [n for n in os.listdir(target.parent) if n.startswith(f".{target.name}.partial-")]
    assert len(left) == 1
    return target.parent / left[0]


def test_a_save_after_a_killed_save_removes_what_it_left(tmp_path):
    path = tmp_path / "index"
    _saved(path)
    stale = _killed_writer_leaves_staging(path)
    live = tmp_path / f".index.partial-{atomic._host_tag()}-1-abc"  # pid 1 is alive
    live.mkdir()
    foreign = tmp_path / ".index.partial-ffffff-999999-abc"  # another host's
    foreign.mkdir()
    _saved(path, seed=1, overwrite=True)
    assert not stale.exists()
    assert live.exists() and foreign.exists()
    assert len(Index.load(path)) == 20


def test_write_text_is_all_or_nothing(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    monkeypatch.setattr(os, "replace", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_text(str(path), "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["metrics.json"]


# ------------------------------------------------------------ ids, headers, values


def test_uint64_ids_beyond_int64_are_refused():
    index = ExactIndex()
    with pytest.raises(ValueError, match="int64"):
        index.add(_vectors(2), ids=np.array([1, 2**63 + 5], dtype=np.uint64))
    index.add(_vectors(2), ids=np.array([1, 2**62], dtype=np.uint64))
    assert index.ids.tolist() == [1, 2**62]


def test_an_edited_header_is_refused(tmp_path):
    path = tmp_path / "index"
    _saved(path)
    header = json.loads((path / "index.json").read_text())
    header["config"]["distance"] = "squared_l2"
    (path / "index.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match="checksum"):
        Index.load(path)
    # Without the checksum (a save from before it existed) the data is still checked.
    raw = ExactIndex(normalize=False)
    raw.add(_vectors() * 3)
    raw.save(tmp_path / "raw")
    raw_header = json.loads((tmp_path / "raw" / "index.json").read_text())
    del raw_header["header_sha256"]
    raw_header["config"]["normalize"] = True
    (tmp_path / "raw" / "index.json").write_text(json.dumps(raw_header))
    with pytest.raises(ValueError, match="not unit-norm"):
        Index.load(tmp_path / "raw")


@pytest.mark.parametrize("cls", [ExactIndex])
def test_squared_l2_on_huge_vectors_orders_correctly_without_nan(cls):
    base = _vectors(40, dim=4, seed=2).astype("float64")
    index = cls(distance="squared_l2")
    index.add((base * 1e20).astype("float32"))
    query = base[:3] * 1e20 + 1e18
    ids, scores = index.search(query.astype("float32"), k=5)
    assert not np.isnan(scores).any()
    exact = ((query[:, None, :] - base[None] * 1e20) ** 2).sum(-1)
    np.testing.assert_array_equal(ids, np.argsort(exact, axis=1)[:, :5])


def test_cosine_index_normalises_huge_vectors():
    index = ExactIndex()
    x = _vectors(10)
    index.add(x * 1e20)
    ids, scores = index.search(x[:2] * 1e20, k=1)
    assert ids[:, 0].tolist() == [0, 1]
    np.testing.assert_allclose(scores[:, 0], 1.0, rtol=1e-5)


# ------------------------------------------------------------ ScaNN


def _clustered(n=12_000, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, dim))
    return (centres[rng.integers(0, 40, n)] + 0.3 * rng.normal(size=(n, dim))).astype("float32")


def test_scann_builds_once_for_concurrent_searches(monkeypatch):
    x = _clustered()
    index = ScaNNIndex()
    index.add(x)
    builds = []
    original = ScaNNIndex._build_unlocked

    def counting(self):
        builds.append(1)
        original(self)

    monkeypatch.setattr(ScaNNIndex, "_build_unlocked", counting)
    results = [None] * 4
    barrier = threading.Barrier(4)

    def search(i):
        barrier.wait()
        results[i] = index.search(x[:50], k=10)[0]

    threads = [threading.Thread(target=search, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    later = index.search(x[:50], k=10)[0]
    for found in results:
        np.testing.assert_array_equal(found, later)


def test_scann_builds_are_deterministic():
    # With ScaNN's random k-means start (seed=None) about half of the builds differ;
    # the default seeded k-means++ start gave identical searchers in every build measured.
    x = _clustered()
    found = []
    for _ in range(4):
        index = ScaNNIndex()
        index.add(x)
        assert index.uses_tree
        found.append(index.search(x[:200], k=10)[0])
    for other in found[1:]:
        np.testing.assert_array_equal(found[0], other)


def test_scann_seed_reaches_the_config_and_is_validated():
    from keras_dml.index.scann_index import _seed_config

    config = _seed_config("partitioning {\n}\nhash {\n asymmetric_hash {\n }\n}", 7)
    assert "partitioning {\n clustering_seed: 7" in config
    assert "asymmetric_hash {\n clustering_seed: 7 sampling_seed: 7" in config
    assert ScaNNIndex.from_config(ScaNNIndex(seed=None).get_config()).seed is None
    assert ScaNNIndex.from_config(ScaNNIndex(seed=3).get_config()).seed == 3
    for bad in (-1, 1.5, True, "0"):
        with pytest.raises(ValueError, match="seed"):
            ScaNNIndex(seed=bad)


# ------------------------------------------------------------ retrieval SavedModel


def test_retrieval_savedmodel_empty_batch_and_nan_input(tmp_path):
    import keras
    import tensorflow as tf

    from keras_dml.export import export_retrieval_model

    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    index = ScaNNIndex()
    index.add(model.predict(_vectors(30, dim=6), verbose=0))
    export_retrieval_model(model, index, str(tmp_path / "retriever"), k=3, use_scann=True)
    loaded = tf.saved_model.load(str(tmp_path / "retriever"))
    for name in ("retrieve_exact", "retrieve_scann"):
        served = loaded.signatures[name]
        out = served(inputs=tf.zeros((0, 6)))
        assert out["ids"].shape == (0, 3) and out["scores"].shape == (0, 3)
        bad = np.ones((2, 6), "float32")
        bad[1, 0] = np.nan
        with pytest.raises(tf.errors.InvalidArgumentError, match="`inputs` contains NaN"):
            served(inputs=tf.constant(bad))
        ids = served(inputs=tf.constant(_vectors(2, dim=6)))["ids"]
        assert ids.shape == (2, 3)


# ------------------------------------------------------------ command line


def test_argument_errors_fail_before_tensorflow_is_imported(tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "keras_dml.cli", "train", "--loss", "nope",
         "--out", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown loss 'nope'" in proc.stderr
    imported = [line.split("|")[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")]
    assert "keras_dml.cli.main" in imported
    assert not any(name.split(".")[0] in ("tensorflow", "keras", "jax") for name in imported)


def test_train_refuses_a_foreign_out_dir_before_training(tmp_path):
    from keras_dml.cli.main import main

    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.json").write_text("my numbers")
    assert main(["train", "--epochs", "1", "--out", str(out)]) == 2
    assert (out / "metrics.json").read_text() == "my numbers"
    assert sorted(os.listdir(out)) == ["metrics.json"]


def test_train_refuses_an_unwritable_out_dir_before_training(tmp_path, monkeypatch, capsys):
    import tempfile

    from keras_dml.cli.main import main

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert main(["train", "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    assert "is not writable" in capsys.readouterr().err


# ------------------------------------------------------------ run directories

TINY_TRAIN = ["train", "--dataset", "digits", "--epochs", "1", "--steps-per-epoch", "2",
              "--max-images", "120", "--verbose", "0"]


def _tensorflow_cli():
    pytest.importorskip("tensorflow")
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("the CLI exports SavedModels and TFLite files")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One complete tiny run; tests work on copies of it."""
    _tensorflow_cli()
    from keras_dml.cli.main import main

    path = tmp_path_factory.mktemp("trained") / "run"
    assert main([*TINY_TRAIN, "--out", str(path)]) == 0
    return path


@pytest.fixture
def run(trained_run, tmp_path):
    import shutil

    path = tmp_path / "run"
    shutil.copytree(trained_run, path)
    return path


def _snapshot(path):
    import hashlib

    files = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                files[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return files


def _cli(argv, capsys):
    from keras_dml.cli.main import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, *needles):
    assert code == 1, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("where", ["writing", "swap"])
def test_an_interrupted_train_keeps_the_previous_run(run, monkeypatch, capsys, where):
    from keras_dml.runs import report

    before = _snapshot(run)
    if where == "writing":  # Ctrl-C while the plots are drawn, after the models were saved
        monkeypatch.setattr(report, "write_plots", _interrupt)
    else:  # Ctrl-C at the final rename
        monkeypatch.setattr(atomic, "exchange", _interrupt)
    code, _, err = _cli([*TINY_TRAIN, "--seed", "3", "--out", run], capsys)
    assert code == 130 and "interrupted" in err
    assert _snapshot(run) == before  # the previous run, whole, and nothing of the new one
    assert sorted(os.listdir(run.parent)) == ["run"]  # no partial run left beside it
    monkeypatch.undo()
    code, out, _ = _cli(["search", run, "--query-index", "0", "-k", "3"], capsys)
    assert code == 0 and "precision@3" in out
    if where == "writing":
        # A complete train replaces the previous run; a file of the user's in it is kept.
        old_id = json.loads((run / "config.json").read_text())["run_id"]
        (run / "notes.txt").write_text("mine")
        code, out, _ = _cli([*TINY_TRAIN, "--seed", "3", "--out", run], capsys)
        assert code == 0
        assert json.loads((run / "config.json").read_text())["run_id"] != old_id
        assert not (run / "notes.txt").exists() and not (run / "search_0.png").exists()
        kept = [name for name in os.listdir(run.parent) if name != "run"]
        assert kept == [f"run.previous-{old_id[:12]}"] and kept[0] in out
        assert (run.parent / kept[0] / "notes.txt").read_text() == "mine"


def test_a_train_after_a_killed_train_removes_what_it_left(run, capsys):
    stale = _killed_writer_leaves_staging(run)
    code, _, err = _cli([*TINY_TRAIN, "--seed", "3", "--out", run], capsys)
    assert code == 0, err
    assert not stale.exists()
    assert sorted(os.listdir(run.parent)) == ["run"]


@pytest.mark.parametrize("where", ["metrics", "plot", "projector"])
def test_an_interrupted_evaluate_keeps_every_file_whole(run, monkeypatch, capsys, where):
    import matplotlib.figure

    from keras_dml.runs import rundir

    before = _snapshot(run)
    if where == "metrics":
        monkeypatch.setattr(atomic, "write_text", _interrupt)
    elif where == "plot":  # half a PNG written, then Ctrl-C
        def half_then_interrupt(self, fname, *args, **kwargs):
            with open(fname, "wb") as f:
                f.write(b"\x89PNG")
            raise KeyboardInterrupt

        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_interrupt)
    else:
        real = rundir.replace_file

        def interrupted(path, write):
            def write_then_interrupt(tmp):
                write(tmp)
                raise KeyboardInterrupt

            return real(path, write_then_interrupt)

        monkeypatch.setattr(rundir, "replace_file", interrupted)
    code, _, err = _cli(["evaluate", run], capsys)
    assert code == 130 and "interrupted" in err
    after = _snapshot(run)
    assert sorted(after) == sorted(before)  # no temporary file left, nothing removed
    changed = [name for name in before if after[name] != before[name]]
    # Only what evaluate had finished before the interruption is new, and it is whole.
    assert changed == ([] if where == "metrics" else ["metrics.json"])
    assert json.loads((run / "metrics.json").read_text())["unseen"]
    assert sorted(os.listdir(run.parent)) == ["run"]


def test_every_artefact_of_a_run_carries_its_run_id(run):
    from keras_dml.cli import rundir
    from keras_dml.index import Index

    run_id = json.loads((run / "config.json").read_text())["run_id"]
    for name in ("model.keras", "embedding.keras", "saved_model", "retrieval_model",
                 "embedding.tflite"):
        assert rundir.read_stamp(str(run / name)) == run_id, name
    assert Index.saved_info(run / "index") == {"run_id": run_id}
    assert json.loads((run / "metrics.json").read_text())["run_id"] == run_id


def _other_model():
    import keras

    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(32)])


def test_a_stale_tflite_is_refused_by_evaluate(run, capsys):
    from keras_dml.export import export_tflite

    stale = run / "embedding_int8.tflite"  # left by an older model, with its run id
    export_tflite(_other_model(), str(stale))
    (run / "embedding_int8.tflite.run_id").write_text("0" * 32 + "\n")
    code, _, err = _cli(["evaluate", run, "--using", "tflite-int8"], capsys)
    _one_line_error(code, err, "embedding_int8.tflite comes from another run", "0" * 32,
                    "keras-dml export")
    os.remove(str(stale) + ".run_id")  # written before run ids, or copied without its sidecar
    code, _, err = _cli(["evaluate", run, "--using", "tflite-int8"], capsys)
    _one_line_error(code, err, "embedding_int8.tflite has no run id")
    assert not (run / "metrics_tflite-int8.json").exists()


def test_export_stamps_the_run_id_and_evaluate_accepts_it(run, capsys):
    code, _, err = _cli(["export", run, "--tflite", "float16"], capsys)
    assert code == 0, err
    run_id = json.loads((run / "config.json").read_text())["run_id"]
    assert (run / "embedding_float16.tflite.run_id").read_text().strip() == run_id
    assert (run / "saved_model" / "assets.extra" / "run_id").read_text().strip() == run_id
    assert sorted(n for n in os.listdir(run) if n.startswith(".")) == []  # no staging left
    code, _, err = _cli(["evaluate", run, "--using", "tflite-float16"], capsys)
    assert code == 0, err
    assert json.loads((run / "metrics_tflite-float16.json").read_text())["run_id"] == run_id


def test_a_model_or_index_from_another_run_is_refused(run, capsys):
    import shutil

    from keras_dml.index import Index, ScaNNIndex

    # An index built from other embeddings (same items, same labels), stamped by another run.
    index = Index.load(run / "index")
    other = ScaNNIndex()
    other.add(index.embeddings[::-1].copy(), ids=index.ids, metadata=index.metadata)
    shutil.rmtree(run / "index")
    other.save(run / "index", info={"run_id": "f" * 32})
    code, _, err = _cli(["search", run, "--query-index", "0"], capsys)
    _one_line_error(code, err, "index comes from another run", "f" * 32)
    # An embedding model copied in from elsewhere (no run id).
    _other_model().save(run / "embedding.keras")
    for argv in (["evaluate", run], ["export", run, "--tflite", "float32"]):
        code, _, err = _cli(argv, capsys)
        _one_line_error(code, err, "embedding.keras has no run id")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "broken, commands, message",
    [
        ("test_labels.npy", [["search", "--query-index", "0"]], "test_labels.npy does not exist"),
        ("config.json", [["search", "--query-index", "0"], ["evaluate"],
                         ["export", "--tflite", "float32"]], "config.json is truncated"),
        ("index/embeddings.npy", [["search", "--query-index", "0"]], "embeddings.npy has"),
        ("embedding.keras", [["evaluate"], ["export", "--tflite", "float32"]],
         "embedding.keras is truncated"),
        ("embedding.tflite", [["evaluate", "--using", "tflite"]],
         "embedding.tflite cannot be read"),
    ],
)
def test_a_half_written_run_gives_one_line_naming_the_file(run, capsys, broken, commands,
                                                          message):
    path = run / broken
    if broken == "test_labels.npy":
        path.unlink()
    else:
        _truncate(path)
    for command in commands:
        code, _, err = _cli([command[0], run, *command[1:]], capsys)
        _one_line_error(code, err, message)
