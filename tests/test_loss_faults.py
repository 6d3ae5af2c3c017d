"""Bad inputs inside `model.fit`: the eager checks of every loss hold in graphs and under `jit`.

Eagerly a loss raises `ValueError` naming the argument. Inside `fit` the same
message comes back as the backend reports it: TensorFlow graphs raise
`tf.errors.InvalidArgumentError` (assertion ops), JAX's `jit` a
`JaxRuntimeError` holding the `ValueError` (`jax.debug.callback`), torch runs
eagerly and raises the `ValueError` itself. A static empty batch raises the
`ValueError` while the step is traced.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tests.test_losses_common import ALL_LOSSES, IDS

BACKEND = keras.backend.backend()


def _error_types():
    types = [ValueError]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        types.append(tf.errors.InvalidArgumentError)
    if BACKEND == "jax":
        import jax

        types.append(jax.errors.JaxRuntimeError)
    return tuple(types)


def _model(loss):
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    model.compile(optimizer="sgd", loss=loss)
    return model


def _data(n=16):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = np.repeat(np.arange(n // 2), 2).astype("int32")
    return x, y


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=IDS)
def test_fit_refuses_fractional_labels_and_nan_inputs(loss):
    x, y = _data()
    # A fresh model per case: after an error inside `fit`, Keras's JAX trainer
    # leaves the model's variables unusable.
    with pytest.raises(_error_types(), match="`y_true` must hold integer class labels"):
        _model(loss).fit(x, 0.3 * y.astype("float32"), batch_size=16, epochs=1, verbose=0)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(_error_types(), match="`y_pred` contains NaN or Inf"):
        _model(loss).fit(bad, y, batch_size=16, epochs=1, verbose=0)
    # Whole-valued float labels (what Keras passes after its cast) still train.
    history = _model(loss).fit(x, y.astype("float32"), batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])


def test_nan_weights_are_not_logged_as_a_finite_loss():
    """MultiSimilarityLoss used to log 0.0 with NaN weights (a masked NaN)."""
    import keras_dml

    x, y = _data()
    model = _model(keras_dml.MultiSimilarityLoss())
    kernel = model.layers[0].kernel
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    # Eagerly (torch) or in a graph, the NaN embeddings raise; the direct
    # loss of NaN embeddings, where no check can raise (XLA), is NaN.
    with pytest.raises(_error_types(), match="`y_pred` contains NaN or Inf"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    from keras_dml.losses.base import propagate_non_finite

    value = propagate_non_finite(keras.ops.convert_to_tensor(0.0), np.full((2, 2), np.nan))
    assert np.isnan(keras.ops.convert_to_numpy(value))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.data batches of varying size")
@pytest.mark.parametrize("loss", ALL_LOSSES, ids=IDS)
def test_fit_refuses_an_empty_tf_data_batch(loss):
    import tensorflow as tf

    x, y = _data()
    full = tf.data.Dataset.from_tensors((x, y))
    empty = tf.data.Dataset.from_tensors((x[:0], y[:0]))
    model = _model(loss)
    with pytest.raises(_error_types(), match="`y_pred` is an empty batch"):
        model.fit(full.concatenate(empty), epochs=1, verbose=0, shuffle=False)


def test_fit_refuses_a_static_empty_batch():
    import keras_dml

    model = _model(keras_dml.TripletLoss())
    x, y = _data()
    with pytest.raises(ValueError, match="`y_pred` is an empty batch"):
        model.train_on_batch(x[:0], y[:0])


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=IDS)
def test_large_embeddings_give_no_nan(loss):
    """Unnormalised embeddings near 1e20: distances stay finite (a value beyond float32 is Inf)."""
    name = type(loss).__name__
    if name == "NPairsLoss":
        pytest.skip("dot products of such vectors (~1e40) are beyond float32: NaN out, not hidden")
    x, y = _data(8)
    value = float(keras.ops.convert_to_numpy(loss(y, x * 1e20)))
    assert not np.isnan(value)
    if name not in ("LiftedStructLoss", "VICRegLoss"):
        # Lifted structure's squared hinge and VICReg's squared differences and covariances
        # (~1e40) exceed float32: Inf, never NaN.
        assert np.isfinite(value)
