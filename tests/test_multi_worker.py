"""TensorFlow `MultiWorkerMirroredStrategy` with 2 local workers, against one device.

Keras 3 cannot `fit` under `MultiWorkerMirroredStrategy` (keras-team/keras#20585);
`keras_dml.distributed.prepare_multi_worker_fit` works around it. Each worker
of `tests/multi_worker_checks.py` trains TripletLoss, MultiSimilarityLoss,
MarginModel + ArcFace and S2SD from a global `tf.data` dataset sharded by
data and compares with one device on the same global batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import keras
import numpy as np
import pytest

from keras_dml import distributed
from keras_dml.multihost import free_port

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                reason="tf.distribute is TensorFlow's")

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multi_worker_checks.py")
ROOT = os.path.dirname(os.path.dirname(SCRIPT))


def test_two_workers_train_like_one_device_on_the_global_batches():
    ports = [str(free_port()), str(free_port())]
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("TF_CONFIG", None)
    procs, logs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for index in range(2):
                log = open(os.path.join(tmp, f"{index}.log"), "w+")  # noqa: SIM115
                logs.append(log)
                procs.append(subprocess.Popen([sys.executable, SCRIPT, str(index), *ports],
                                              stdout=log, stderr=subprocess.STDOUT, env=env))
            for p in procs:
                p.wait(timeout=240)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
    for p, output in zip(procs, outputs, strict=True):
        assert p.returncode == 0, output[-4000:]
    for output in outputs:
        line = next(x for x in output.splitlines() if x.startswith("RESULTS "))
        results = json.loads(line[len("RESULTS "):])
        assert results["num_replicas"] == 2
        assert set(results["models"]) == {"triplet", "multi_similarity", "arcface", "s2sd"}
        for name, r in results["models"].items():
            assert r["moved"] > 1e-3, (name, r)
            assert r["weight_error"] < 1e-5, (name, r)
            np.testing.assert_allclose(r["loss"], r["reference_loss"], rtol=1e-5, err_msg=name)
        # Without the workaround Keras's fit fails (keras-team/keras#20585). When this
        # fails, Keras has fixed it: update the README and the docstring.
        line = next(x for x in output.splitlines() if x.startswith("PLAIN_FIT "))
        plain = json.loads(line[len("PLAIN_FIT "):])
        assert plain["error"] == "ValueError" and "PerReplica" in plain["message"], plain


def test_prepare_multi_worker_fit_leaves_single_device_training_unchanged():
    # The patched steps still train: the same weights as an unpatched model.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = (np.arange(64) % 4).astype("int32")

    def trained(patch):
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
        import keras_dml

        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras_dml.TripletLoss())
        if patch:
            assert distributed.prepare_multi_worker_fit(model, x[:8], y[:8]) is model
        history = model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0).history
        return model.get_weights(), history["loss"], model.evaluate(x, y, verbose=0)

    (w0, l0, e0), (w1, l1, e1) = trained(False), trained(True)
    for a, b in zip(w0, w1, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    np.testing.assert_allclose(e1, e0, rtol=1e-6)
