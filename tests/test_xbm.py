"""Cross-batch memory: `keras_dml.layers.CrossBatchMemory` and `keras_dml.models.XBMModel`.

Checked against a NumPy ring buffer + loop reference, and against
pytorch-metric-learning's `CrossBatchMemory` over consecutive batches (same
losses and gradients); saved and loaded with the model; under
`tf.distribute` (2 logical CPUs, a subprocess) and mixed precision.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import mixed_precision

import keras_dml
from keras_dml.layers import CrossBatchMemory
from keras_dml.losses import ContrastiveLoss, MultiSimilarityLoss, TripletLoss
from keras_dml.models import XBMModel

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="gradients taken with tf.GradientTape"
)

D = 6
M = 20  # 4 batches of 8 wrap around the memory


def batches(n=4, size=8, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        labels = rng.integers(0, classes, size).astype("int64")
        out.append((labels, rng.normal(size=(size, D)).astype("float32")))
    return out


# -- NumPy reference: a ring buffer and the contrastive loss by loops ----------------


class RingBuffer:
    def __init__(self, size, dim):
        self.emb = np.zeros((size, dim))
        self.lab = np.zeros(size, "int64")
        self.ptr, self.filled, self.size = 0, 0, size

    def enqueue(self, labels, emb):
        slots = [(self.ptr + i) % self.size for i in range(len(labels))]
        for i, s in enumerate(slots):
            self.emb[s], self.lab[s] = emb[i], labels[i]
        self.ptr = (self.ptr + len(labels)) % self.size
        self.filled = min(self.filled + len(labels), self.size)
        return slots


def ref_contrastive_vs_memory(labels, emb, buffer, slots, neg_margin=1.0):
    pos, neg = [], []
    for i in range(len(labels)):
        for j in range(buffer.filled):
            if j == slots[i]:
                continue
            d = np.linalg.norm(emb[i] - buffer.emb[j])
            if labels[i] == buffer.lab[j]:
                pos.append(d)
            else:
                neg.append(max(neg_margin - d, 0.0))
    return (np.mean(pos) if pos else 0.0) + (np.mean(neg) if neg else 0.0)


def test_memory_matches_a_numpy_ring_buffer_and_loop_reference():
    memory = CrossBatchMemory(M, D)
    buffer = RingBuffer(M, D)
    loss = ContrastiveLoss()
    for labels, emb in batches(n=5):
        refs = memory.enqueue(labels, emb)
        slots = buffer.enqueue(labels, emb.astype("float64"))
        value = float(loss.compute(labels.astype("int32"), emb, references=refs))
        np.testing.assert_allclose(value, ref_contrastive_vs_memory(labels, emb, buffer, slots),
                                   rtol=1e-5)
        np.testing.assert_array_equal(memory.embeddings.numpy(), buffer.emb.astype("float32"))
        np.testing.assert_array_equal(memory.labels.numpy(), buffer.lab)
        assert int(memory.pointer.numpy()) == buffer.ptr
        assert int(memory.size.numpy()) == buffer.filled
    assert int(memory.writes.numpy()) == 5


# -- parity with pytorch-metric-learning ---------------------------------------------


def pml_pair(name):
    """(keras-dml loss, PML loss) computing the same thing on the same pairs."""
    pytest.importorskip("torch")
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import distances, losses, reducers

    if name == "contrastive":
        # PML's default AvgNonZeroReducer averages only the non-zero pair losses;
        # keras-dml averages every positive and every negative pair (MeanReducer).
        return ContrastiveLoss(), losses.ContrastiveLoss(
            pos_margin=0.0, neg_margin=1.0, reducer=reducers.MeanReducer(),
            distance=distances.LpDistance(normalize_embeddings=False))
    if name == "triplet_all":
        # Batch-all triplets, mean over the triplets with a non-zero loss (both).
        return TripletLoss(margin=0.2, negative_mining="all"), losses.TripletMarginLoss(
            margin=0.2, distance=distances.LpDistance(normalize_embeddings=False))
    if name == "multi_similarity":
        # PML's loss has no mining (its miner is separate); a huge epsilon keeps every pair.
        return MultiSimilarityLoss(epsilon=100.0), losses.MultiSimilarityLoss(
            alpha=2.0, beta=50.0, base=0.5)
    if name == "circle":
        return keras_dml.CircleLoss(margin=0.4, gamma=80.0), losses.CircleLoss(m=0.4, gamma=80)
    if name == "supcon":
        return (keras_dml.SupConLoss(temperature=0.1, base_temperature=0.1),
                losses.SupConLoss(temperature=0.1))
    raise AssertionError(name)


@pytest.mark.parametrize(
    "name", ["contrastive", "triplet_all", "multi_similarity", "circle", "supcon"]
)
def test_matches_pml_cross_batch_memory_over_consecutive_batches(name):
    import tensorflow as tf
    import torch
    from pytorch_metric_learning import losses as pml_losses

    ours, theirs = pml_pair(name)
    pml_xbm = pml_losses.CrossBatchMemory(theirs, embedding_size=D, memory_size=M)
    memory = CrossBatchMemory(M, D)
    for step, (labels, emb) in enumerate(batches(n=5, seed=1)):
        x = tf.Variable(emb)
        with tf.GradientTape() as tape:
            refs = memory.enqueue(labels, x)
            value = ours.compute(tf.constant(labels, "int32"), x, references=refs)
        grad = tape.gradient(value, x).numpy()
        x_torch = torch.tensor(emb, requires_grad=True)
        expected = pml_xbm(x_torch, torch.tensor(labels))
        expected.backward()
        np.testing.assert_allclose(float(value), float(expected.detach()), rtol=1e-5,
                                   err_msg=f"step {step}")
        np.testing.assert_allclose(grad, x_torch.grad.numpy(), rtol=1e-4, atol=1e-6,
                                   err_msg=f"step {step}")
        np.testing.assert_allclose(memory.embeddings.numpy(), pml_xbm.embedding_memory.numpy())
        np.testing.assert_array_equal(memory.labels.numpy(), pml_xbm.label_memory.numpy())
        assert int(memory.pointer.numpy()) == pml_xbm.queue_idx


def test_model_compute_loss_is_the_pml_step():
    """`XBMModel.compute_loss` (what `fit` runs) takes the same steps as PML's wrapper."""
    import tensorflow as tf
    import torch
    from pytorch_metric_learning import losses as pml_losses

    ours, theirs = pml_pair("contrastive")
    pml_xbm = pml_losses.CrossBatchMemory(theirs, embedding_size=D, memory_size=M)
    model = XBMModel(keras.Sequential([keras.Input((3,)), keras.layers.Dense(D)]), memory_size=M)
    model.compile(optimizer="sgd", loss=ours)
    for labels, emb in batches(n=4, seed=2):
        x = tf.Variable(emb)
        with tf.GradientTape() as tape:
            value = model.compute_loss(y=labels, y_pred=x, training=True)
        grad = tape.gradient(value, x).numpy()
        x_torch = torch.tensor(emb, requires_grad=True)
        expected = pml_xbm(x_torch, torch.tensor(labels))
        expected.backward()
        np.testing.assert_allclose(float(value), float(expected.detach()), rtol=1e-5)
        np.testing.assert_allclose(grad, x_torch.grad.numpy(), rtol=1e-4, atol=1e-6)
    # Evaluation: the in-batch loss, memory untouched.
    before = model.memory.embeddings.numpy().copy()
    labels, emb = batches(n=1, seed=3)[0]
    value = model.compute_loss(y=labels, y_pred=emb, training=False)
    np.testing.assert_allclose(float(value), float(ours(labels, emb)), rtol=1e-6)
    np.testing.assert_array_equal(model.memory.embeddings.numpy(), before)


@pytest.mark.parametrize(
    "loss",
    [keras_dml.TripletSemiHardLoss(), keras_dml.TripletHardLoss(), keras_dml.NPairsLoss(),
     TripletLoss(negative_mining="hard", positive_mining="hard")],
    ids=lambda loss: loss.name,
)
def test_other_reference_losses_run_on_a_filling_memory(loss):
    """No PML counterpart with these semantics: finite values and gradients, empty slots unused."""
    import tensorflow as tf

    memory = CrossBatchMemory(M, D)
    for labels, emb in batches(n=3, seed=4):
        x = tf.Variable(emb)
        with tf.GradientTape() as tape:
            refs = memory.enqueue(labels, x)
            value = loss.compute(tf.constant(labels, "int32"), x, references=refs)
        grad = tape.gradient(value, x).numpy()
        assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
        # The same memory with its empty slots dropped gives the same value.
        size = int(memory.size.numpy())
        from keras_dml.losses.base import References

        trimmed = References(refs.labels[:size], refs.embeddings[:size],
                             query_offset=refs.query_offset)
        same = loss.compute(tf.constant(labels, "int32"), x, references=trimmed)
        np.testing.assert_allclose(float(value), float(same), rtol=1e-6)


# -- model: fit, warm-up, save/load, errors --------------------------------------------


def small_model(memory_size=32, **kwargs):
    keras.utils.set_random_seed(0)
    backbone = keras.Sequential([keras.Input((5,)), keras.layers.Dense(D)])
    return XBMModel(backbone, memory_size=memory_size, **kwargs)


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)).astype("float32"), (np.arange(n) % 4).astype("int64")


def test_fit_fills_the_memory_with_the_batches_in_order():
    model = small_model(memory_size=24)
    # Learning rate 0: the stored embeddings are the backbone's current ones.
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=TripletLoss())
    x, y = data(16)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    # 4 batches of 8 into 24 slots: 32 writes, pointer at 8, slots 0-7 hold the last batch.
    assert int(model.memory.size.numpy()) == 24
    assert int(model.memory.pointer.numpy()) == 8
    np.testing.assert_array_equal(model.memory.labels.numpy()[:8], y[8:])
    np.testing.assert_allclose(model.memory.embeddings.numpy()[:8], model.embed(x[8:]),
                               rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(model.memory.embeddings.numpy()))


def test_warm_up_uses_the_batch_loss_and_leaves_the_memory_empty():
    model = small_model(start_step=2, batch_loss_weight=1.0)
    model.compile(optimizer="sgd", loss=ContrastiveLoss())
    x, y = data(16)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)  # steps 0, 1
    assert int(model.memory.size.numpy()) == 0
    assert not np.any(model.memory.embeddings.numpy())
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)  # steps 2, 3
    assert int(model.memory.size.numpy()) == 16
    assert int(model.memory.writes.numpy()) == 2


def test_save_and_load_restore_the_memory(tmp_path):
    model = small_model(memory_size=40, start_step=1, batch_loss_weight=0.5)
    model.compile(optimizer="adam", loss=MultiSimilarityLoss())
    x, y = data(24)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    path = str(tmp_path / "xbm.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, XBMModel)
    assert (loaded.memory_size, loaded.start_step, loaded.batch_loss_weight) == (40, 1, 0.5)
    for name in ("embeddings", "labels", "pointer", "size", "writes", "steps"):
        np.testing.assert_array_equal(getattr(loaded.memory, name).numpy(),
                                      getattr(model.memory, name).numpy())
    np.testing.assert_allclose(loaded.embed(x), model.embed(x), rtol=1e-6)
    assert isinstance(loaded.loss, MultiSimilarityLoss)
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0)  # training continues on the memory
    assert int(loaded.memory.writes.numpy()) == int(model.memory.writes.numpy()) + 3


def test_layer_config_round_trip_and_argument_errors():
    memory = CrossBatchMemory(16, 4, name="m")
    clone = CrossBatchMemory.from_config(memory.get_config())
    assert (clone.memory_size, clone.embedding_dim) == (16, 4)
    for bad in (0, -3, 2.5, True, None):
        with pytest.raises(ValueError, match="memory_size"):
            CrossBatchMemory(bad, 4)
    with pytest.raises(ValueError, match="embedding_dim"):
        CrossBatchMemory(8, 0)
    with pytest.raises(ValueError, match="larger than the memory"):
        CrossBatchMemory(4, 2).enqueue(np.zeros(5, "int32"), np.zeros((5, 2), "float32"))
    with pytest.raises(ValueError, match="4-d embeddings"):
        memory.enqueue(np.zeros(2, "int32"), np.zeros((2, 3), "float32"))
    with pytest.raises(ValueError, match="start_step"):
        small_model(start_step=-1)
    with pytest.raises(ValueError, match="batch_loss_weight"):
        small_model(batch_loss_weight=-1.0)


@pytest.mark.parametrize("loss", [keras_dml.NTXentLoss(), keras_dml.LiftedStructLoss(), "mse"])
def test_losses_without_a_memory_form_are_refused(loss):
    model = small_model()
    model.compile(optimizer="sgd", loss=loss)
    x, y = data(8)
    with pytest.raises(Exception, match="memory|metric loss|per-row"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)


def test_reset_empties_the_memory():
    memory = CrossBatchMemory(8, 2)
    memory.enqueue(np.array([1, 2], "int32"), np.ones((2, 2), "float32"))
    memory.reset()
    assert int(memory.size.numpy()) == 0 and not np.any(memory.embeddings.numpy())


def test_mixed_precision_keeps_a_float32_memory():
    with mixed_precision("mixed_float16"):
        model = small_model()
        model.compile(optimizer="sgd", loss=ContrastiveLoss())
        x, y = data(16)
        history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        assert model.memory.embeddings.dtype == "float32"
        assert np.isfinite(history.history["loss"][-1])
        assert int(model.memory.size.numpy()) == 16


def test_docstring_examples_run():
    import doctest

    from keras_dml.layers import memory as memory_module
    from keras_dml.models import xbm as xbm_module

    for module in (memory_module, xbm_module):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0


def test_mirrored_strategy_writes_the_global_batch_and_equals_one_device():
    script = os.path.join(os.path.dirname(__file__), "xbm_replica_checks.py")
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env,
                            timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, result.stdout[-2000:] + result.stderr[-4000:]
    results = json.loads(lines[-1][len("RESULTS "):])
    assert results["memory_labels_equal"] and results["memory_pointer_equal"]
    assert results["memory_embeddings"] < 1e-5
    assert results["loss"] < 1e-5
    assert results["weights"] < 1e-4


def test_save_and_load_restore_a_multi_hot_memory_and_the_next_step(tmp_path):
    # Multi-hot (B, C) label sets in the memory, saved with the model: the loaded memory holds
    # the same embeddings, label sets, pointer and fill count, and the next step gives the
    # same loss on both models (same weights, optimizer state and references).
    keras.utils.set_random_seed(0)
    backbone = keras.Sequential([keras.Input((5,)), keras.layers.Dense(D)])
    model = XBMModel(backbone, memory_size=12, num_classes=4)
    model.compile(optimizer="adam", loss=ContrastiveLoss())
    rng = np.random.default_rng(3)
    x = rng.normal(size=(24, 5)).astype("float32")
    y = (rng.random((24, 4)) < 0.4).astype("int64")
    y[np.arange(24), np.arange(24) % 4] = 1  # every sample has a label
    model.fit(x[:16], y[:16], batch_size=8, epochs=1, shuffle=False, verbose=0)  # 2 steps
    assert int(model.memory.writes.numpy()) == 2
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, XBMModel) and loaded.memory.num_classes == 4
    assert tuple(loaded.memory.labels.shape) == (12, 4)
    for name in ("embeddings", "labels", "pointer", "size", "writes", "steps"):
        np.testing.assert_array_equal(getattr(loaded.memory, name).numpy(),
                                      getattr(model.memory, name).numpy(), err_msg=name)
    np.testing.assert_array_equal(model.memory.labels.numpy()[:4], y[12:16])  # wrapped around
    assert int(loaded.memory.pointer.numpy()) == 4 and int(loaded.memory.size.numpy()) == 12
    after = model.train_on_batch(x[16:], y[16:])
    loaded_after = loaded.train_on_batch(x[16:], y[16:])
    assert np.isfinite(after) and after > 0
    np.testing.assert_allclose(loaded_after, after, rtol=1e-6)
    for name in ("embeddings", "labels", "pointer", "size"):
        np.testing.assert_allclose(getattr(loaded.memory, name).numpy(),
                                   getattr(model.memory, name).numpy(), rtol=1e-6, err_msg=name)
