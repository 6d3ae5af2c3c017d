"""ARCHITECTURE.md's worked example runs: the doc cannot rot.

The python block under "Worked example: adding a loss" is executed as it is
written, and the loss it defines trains a small model for one `fit` step and
behaves as the page says (read-only options, canonical distance name,
config round trip).
"""

from __future__ import annotations

import pathlib
import re

import keras
import numpy as np
import pytest

ARCHITECTURE = pathlib.Path(__file__).resolve().parents[1] / "ARCHITECTURE.md"


def worked_example_source() -> str:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    section = text.split("## Worked example", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the worked example must hold one python block"
    return blocks[0]


@pytest.fixture(scope="module")
def example():
    namespace = {"__name__": "architecture_worked_example"}
    # Registering the class twice in one process would fail: run the block once.
    exec(compile(worked_example_source(), str(ARCHITECTURE), "exec"), namespace)  # noqa: S102
    return namespace


def test_worked_example_loss_trains_one_step(example):
    loss = example["HingePairsLoss"](margin=0.5, distance="L2")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6)).astype("float32")
    y = np.arange(16) % 4
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    before = [np.array(w) for w in model.get_weights()]
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = model.get_weights()
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))


def test_worked_example_options_are_as_documented(example):
    loss = example["HingePairsLoss"](margin=0.3, distance="L2")
    assert loss.margin == 0.3 and loss.distance == "euclidean"
    with pytest.raises(AttributeError):
        loss.margin = 1.0
    config = loss.get_config()
    assert config["margin"] == 0.3 and config["distance"] == "euclidean"
    clone = example["HingePairsLoss"].from_config(config)
    assert clone.get_config() == config
    value = example["hinge_pairs_loss"](np.array([0, 0, 1, 1]),
                                        np.eye(4, dtype="float32"), margin=2.0)
    assert float(value) > 0
