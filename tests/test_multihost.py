"""Multi-process data parallelism with Keras 3's JAX engine (`keras_dml.multihost`).

The main test runs `examples/multihost_jax.py --num-processes 2` (its
launcher starts 2 local processes: JAX, gloo collectives on CPU, coordinator
on a free port) and, concurrently, the example as one process without any
distribution, and compares the trained weights:
TripletLoss, MultiSimilarityLoss, MarginModel + ArcFace and S2SD, fed
pre-sharded per process, and TripletLoss and ArcFace from a global
`tf.data.Dataset` that Keras shards. The workers always run under
`KERAS_BACKEND=jax`, whatever backend runs this file.
"""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from keras_dml import multihost

pytest.importorskip("jax")
pytest.importorskip("tensorflow")  # the example's tf.data input

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "multihost_jax.py")
MODELS = ("triplet", "multi_similarity", "arcface", "s2sd")
DATASET_MODELS = ("triplet", "arcface")


def _env():
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    for name in (multihost.ADDRESS_VARIABLE, multihost.NUM_PROCESSES_VARIABLE,
                 multihost.PROCESS_ID_VARIABLE):
        env.pop(name, None)
    return env


def test_launch_local_kills_the_others_when_one_process_fails():
    code = ("import os, sys, time\n"
            "pid = int(os.environ['KERAS_DISTRIBUTION_PROCESS_ID'])\n"
            "assert os.environ['KERAS_DISTRIBUTION_NUM_PROCESSES'] == '3'\n"
            "assert os.environ['KERAS_DISTRIBUTION_JOB_ADDRESSES'].startswith('localhost:')\n"
            "print('process', pid, os.environ['KERAS_BACKEND'])\n"
            "sys.exit(3) if pid == 1 else time.sleep(60)\n")
    start = time.monotonic()
    results = multihost.launch_local([sys.executable, "-c", code], 3, timeout=30, env=_env())
    assert time.monotonic() - start < 20  # not the 60 s sleep of the others
    assert [r.process_id for r in results] == [0, 1, 2]
    assert results[1].returncode == 3 and results[1].stdout.strip() == "process 1 jax"
    assert results[0].returncode < 0 and results[2].returncode < 0  # killed


def test_launch_local_stops_at_the_timeout():
    results = multihost.launch_local(
        [sys.executable, "-c", "import time; time.sleep(60)"], 2, timeout=1, env=_env())
    assert all(r.returncode is not None and r.returncode < 0 for r in results)


def test_without_cluster_variables_a_process_is_alone(monkeypatch):
    for name in (multihost.ADDRESS_VARIABLE, multihost.NUM_PROCESSES_VARIABLE,
                 multihost.PROCESS_ID_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    assert multihost.process_info() == (0, 1)
    assert not multihost.is_worker()
    assert multihost.initialize() == (0, 1)  # nothing to join
    assert multihost.free_port() > 0
    assert doctest.testmod(multihost).failed == 0


def _load(path):
    with np.load(path) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


def test_two_processes_train_like_one_process_on_the_global_batches(tmp_path):
    args = ["--models", ",".join(MODELS), "--dataset-models", ",".join(DATASET_MODELS),
            "--input", "both", "--epochs", "2", "--samples", "256", "--global-batch", "64"]
    reference = subprocess.Popen(
        [sys.executable, EXAMPLE, "--num-processes", "1", "--out", str(tmp_path / "one"),
         *args], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        # The example's own launcher (as in the README): it starts 2 workers with
        # `launch_local` and kills them at its --timeout, before ours.
        two = subprocess.run(
            [sys.executable, EXAMPLE, "--num-processes", "2", "--timeout", "200",
             "--out", str(tmp_path / "two"), *args],
            env=_env(), capture_output=True, text=True, timeout=240)
        reference_output, _ = reference.communicate(timeout=240)
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert reference.returncode == 0, reference_output[-3000:]
    assert "presharded          triplet: loss per epoch" in two.stdout  # process 0 reports

    runs = [f"presharded_{m}" for m in MODELS] + [f"dataset_{m}" for m in DATASET_MODELS]
    for run in runs:
        expected = _load(tmp_path / "one" / "p0" / f"{run}.npz")
        for process in ("p0", "p1"):
            got = _load(tmp_path / "two" / process / f"{run}.npz")
            assert len(got) == len(expected) > 0, run
            for g, e in zip(got, expected, strict=True):
                np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6, err_msg=f"{run} {process}")
    # Same losses, and they fell: training moved the weights.
    one = json.load(open(tmp_path / "one" / "p0" / "history.json"))["history"]
    two = json.load(open(tmp_path / "two" / "p0" / "history.json"))["history"]
    assert set(one) == set(two) == set(runs)
    for run in runs:
        np.testing.assert_allclose(two[run], one[run], rtol=1e-5, err_msg=run)
        assert one[run][-1] < one[run][0], (run, one[run])


def test_module_entry_point_runs_a_script_on_n_processes(tmp_path, capsys):
    script = tmp_path / "hello.py"
    script.write_text(
        "import os\nprint('hello from', os.environ['KERAS_DISTRIBUTION_PROCESS_ID'])\n")
    assert multihost.main(["2", str(script)]) == 0
    out = capsys.readouterr().out
    assert "hello from 0" in out and "hello from 1" in out
    assert multihost.main(["x"]) == 2  # usage
    script.write_text("raise SystemExit(4)\n")
    assert multihost.main(["2", str(script)]) == 1
