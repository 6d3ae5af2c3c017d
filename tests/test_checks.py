"""`keras_dml._checks`: the eager value checks (`all_finite`, float labels) and `deserialize_as`.

Runs on every backend (listed in backend_agnostic.txt): the eager checks read
one scalar from the backend's tensors, and say "unknown" inside a compiled
graph.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

from keras_dml import _checks, losses, miners, reducers, regularizers


@pytest.mark.parametrize(
    "values, want",
    [
        (np.ones((4, 3)), True),
        (np.zeros((0, 3)), True),
        (np.full((4, 3), 3e38), True),  # the sum overflows; every value is finite
        (np.array([[1.0, np.nan], [0.0, 0.0]]), False),
        (np.array([[np.inf, 1.0]]), False),
        (np.array([[np.inf, -np.inf]]), False),  # the sum is NaN
        (np.array([[-np.inf, 0.0]]), False),
    ],
)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_all_finite_is_numpys_answer(values, want, as_tensor):
    x = values.astype("float32")
    if as_tensor:
        x = ops.convert_to_tensor(x)
    assert _checks.all_finite(x) is want
    assert want == bool(np.all(np.isfinite(values.astype("float32"))))


def test_all_finite_is_unknown_inside_a_compiled_graph():
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        compile_fn = tf.function
    elif backend == "jax":
        import jax

        compile_fn = jax.jit
    else:
        pytest.skip(f"{backend} runs eagerly: values are always known")
    seen = []

    def step(v):
        seen.append(_checks.all_finite(v))
        return v

    compile_fn(step)(np.ones((3, 2), "float32"))
    assert seen == [None]


def test_nan_embeddings_raise_the_same_message_eagerly():
    x = np.ones((4, 3), "float32")
    x[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"^`y_pred` contains NaN or Inf\.$"):
        losses.ContrastiveLoss()(np.array([0, 0, 1, 1]), ops.convert_to_tensor(x))


def test_float_labels_check_names_a_fractional_value():
    _checks.check_labels_dtype(ops.convert_to_tensor(np.array([0.0, 2.0, 1.0], "float32")))
    with pytest.raises(ValueError, match=r"non-integer values such as \[2\.5\]"):
        _checks.check_labels_dtype(ops.convert_to_tensor(np.array([1.0, 2.5], "float32")))


@pytest.mark.parametrize(
    "get, arg, example",
    [
        (miners.get, "miner", "a keras_dml.miners.Miner (e.g. TripletMarginMiner())"),
        (reducers.get, "reducer", "a keras_dml.reducers.Reducer (e.g. AvgNonZeroReducer())"),
        (
            regularizers.get,
            "embedding_regularizer",
            "a keras.regularizers.Regularizer (e.g. keras_dml.regularizers.LpRegularizer())",
        ),
    ],
)
def test_the_three_gets_share_one_rule_and_message(get, arg, example):
    assert get(None) is None
    want = f"`{arg}` must be {example}, its serialized config or None, got 'mean'."
    with pytest.raises(ValueError) as error:
        get("mean")
    assert str(error.value) == want
    # A config of some other kind of object is refused too.
    other = keras.saving.serialize_keras_object(keras.layers.Dense(2))
    with pytest.raises(ValueError, match=f"`{arg}` must be"):
        get(other)


def test_gets_round_trip_their_objects():
    objects = [
        (miners.get, miners.TripletMarginMiner(margin=0.3)),
        (reducers.get, reducers.ThresholdReducer(low=0.1)),
        (regularizers.get, regularizers.LpRegularizer(power=2)),
    ]
    for get, obj in objects:
        assert get(obj) is obj
        again = get(keras.saving.serialize_keras_object(obj))
        assert type(again) is type(obj) and again.get_config() == obj.get_config()
