"""Losses with `miner=` under `tf.distribute.MirroredStrategy`: the global batch equals one device.

Runs tests/miner_replica_checks.py (2 logical CPU devices, a fresh interpreter)
and asserts on its differences.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import pytest

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="tf.distribute is TensorFlow's"
)


def test_mirrored_strategy_with_miners_equals_one_device():
    script = os.path.join(os.path.dirname(__file__), "miner_replica_checks.py")
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env,
                            timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, result.stdout[-2000:] + result.stderr[-4000:]
    results = json.loads(lines[-1][len("RESULTS "):])
    assert len(results) == 6
    for name, diff in results.items():
        assert diff["nonzero_loss"], name
        assert diff["loss"] < 1e-5, (name, diff)
        assert diff["weights"] < 1e-5, (name, diff)
