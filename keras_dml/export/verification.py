"""A SavedModel that answers "same / not same" for two raw inputs at a calibrated threshold.

`export_verification_model` writes one SavedModel, stock TensorFlow ops only
(TensorFlow Serving, `tf.saved_model.load`, `saved_model_cli` all load it):

| signature | inputs | outputs |
| --- | --- | --- |
| `serving_default`, `verify` | `inputs_a`, `inputs_b` | `score`, `same`, `threshold`, `far` |
| `embed` | `inputs` | `embeddings` (L2-normalised for cosine, angular) |
| `calibration` | none | `threshold`, `far`, `distance`, `higher_is_same` |

`inputs_a`, `inputs_b` and `inputs` are raw, batched model inputs; the
`verify` outputs are `(batch,)` each. `calibration` returns scalars: float32
`threshold` and `far`, the string `distance` and the boolean
`higher_is_same`.

`score` is in the units of the distance (module table of
`keras_dml.evaluation.verification`): a similarity for cosine and dot
(`same = score >= threshold`), a distance otherwise (`same = score <=
threshold`). `threshold` and `far` repeat the stored constants on every row,
so that each served answer states the false accept rate it was made at (NaN
when unknown).

The calibration is also written, for people and tools, to
`<path>/assets.extra/verification.json` (TensorFlow Serving's folder for
files the graph does not read), with the validation counts when a
`ThresholdCalibration` was given; the loaded object exposes it as the
variables `threshold` and `far`.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import tensorflow as tf

from keras_dml import distances as distances_lib
from keras_dml._checks import is_number
from keras_dml.evaluation.verification import (
    ThresholdCalibration,
    _pair_distance_name,
    higher_is_same,
)
from keras_dml.export.saved_model import (
    EMBED_SIGNATURE,
    SERVING_SIGNATURE,
    _embedding_fn,
    _input_spec,
    _normalized,
    _save,
)
from keras_dml.version import __version__

VERIFY_SIGNATURE = "verify"
CALIBRATION_SIGNATURE = "calibration"
CALIBRATION_FILE = os.path.join("assets.extra", "verification.json")


def _pair_score(embeddings_a, embeddings_b, distance: str):
    """`(batch,)` scores with the formulas of `verification.pair_scores`, in TensorFlow.

    TensorFlow, not `keras.ops`: this runs inside the exported SavedModel.
    `distance` is resolved by `keras_dml.distances` (names and aliases).
    """
    measure = distances_lib.get(distance)
    if measure.unit_inputs:
        cosine = tf.reduce_sum(_normalized(embeddings_a) * _normalized(embeddings_b), axis=1)
        cosine = tf.clip_by_value(cosine, -1.0, 1.0)
        return cosine if measure.is_similarity else tf.maximum(1.0 - cosine, 0.0)
    if measure.is_similarity:
        return tf.reduce_sum(embeddings_a * embeddings_b, axis=1)
    squared = tf.reduce_sum(tf.square(embeddings_a - embeddings_b), axis=1)
    return squared if measure.name == "squared_euclidean" else tf.sqrt(squared)


def _resolve(model, threshold, far, distance):
    """Unpacks a `ThresholdCalibration` and a `SiameseModel`; checks the values."""
    from keras_dml.models.siamese import SiameseModel

    details = {}
    if isinstance(threshold, ThresholdCalibration):
        calibration = threshold
        if far is not None and not math.isclose(far, calibration.far):
            raise ValueError(
                f"`far`={far} contradicts the calibration's far={calibration.far}; omit `far`."
            )
        if distance is not None and _pair_distance_name(distance) != calibration.distance:
            raise ValueError(
                f"`distance`={distance!r} contradicts the calibration's distance "
                f"{calibration.distance!r}; omit `distance`."
            )
        threshold, far, distance = calibration.threshold, calibration.far, calibration.distance
        details = calibration.to_dict()
    if isinstance(model, SiameseModel):
        if distance is not None and _pair_distance_name(distance) != model.distance:
            raise ValueError(
                f"`distance`={distance!r} differs from the SiameseModel's {model.distance!r}, "
                "the distance its threshold was trained against."
            )
        distance = model.distance
        model = model.embedding_model()
    distance = _pair_distance_name("cosine" if distance is None else distance)
    if not is_number(threshold):
        raise ValueError(
            f"`threshold` must be a number or a ThresholdCalibration, got {type(threshold)}."
        )
    if not math.isfinite(threshold):
        raise ValueError(f"`threshold` must be finite, got {threshold}.")
    if far is not None and not 0.0 < far < 1.0:
        raise ValueError(f"`far` must lie in (0, 1) or be None, got {far}.")
    return model, float(threshold), (float("nan") if far is None else float(far)), distance, details


def export_verification_model(
    model,
    path: str,
    threshold: float | ThresholdCalibration,
    far: float | None = None,
    distance: str | None = None,
    input_signature: tf.TensorSpec | None = None,
) -> None:
    """Writes a SavedModel that takes two raw inputs and answers whether they are the same identity.

    The threshold (usually from `keras_dml.evaluation.calibrate_threshold` on
    validation pairs) and its false accept rate are stored in the model: the
    `verify` signature returns each pair's score, the "same" decision and the
    threshold and FAR it used; the `calibration` signature returns them alone
    (see the module docstring for every signature). Stock TensorFlow ops
    only, dynamic batch size.

    Args:
        model: a built one-input Keras embedding model (TensorFlow backend), or
            a `keras_dml.models.SiameseModel`, whose backbone and distance are
            then used.
        path: directory to write; existing SavedModel files are overwritten.
        threshold: the decision threshold in the units of `distance`, or a
            `ThresholdCalibration` (which then also gives `far` and
            `distance`).
        far: the false accept rate the threshold was calibrated for; `None`
            (stored as NaN) when unknown.
        distance: `"cosine"` (default), `"dot"`, `"euclidean"`,
            `"squared_euclidean"` or `"angular"`: the measure the threshold is
            in.
        input_signature: the input `tf.TensorSpec` of one member of a pair
            (`None` for the batch dimension) when `model` has no `inputs`.

    Raises:
        ValueError: for an unknown distance, a non-finite threshold, a `far`
            outside (0, 1), arguments that contradict the calibration or the
            Siamese model, or an unsupported model input or output.

    Example:

    ```python
    calibration = keras_dml.evaluation.calibrate_threshold(
        embed.predict(val_a), embed.predict(val_b), val_same, far=1e-3)
    export_verification_model(embed, "/tmp/verifier/1", calibration)
    verify = tf.saved_model.load("/tmp/verifier/1").signatures["serving_default"]
    answer = verify(inputs_a=images_a, inputs_b=images_b)
    answer["same"], answer["score"], answer["far"]  # (batch,) each
    ```
    """
    model, threshold, far, distance, details = _resolve(model, threshold, far, distance)
    # Served scores are float32 and so is the stored threshold; the record
    # beside the model holds the same float32 value.
    threshold = float(np.float32(threshold))
    spec = _input_spec(model, input_signature)
    spec_a = tf.TensorSpec(spec.shape, spec.dtype, name="inputs_a")
    spec_b = tf.TensorSpec(spec.shape, spec.dtype, name="inputs_b")
    embed = _embedding_fn(model)
    similar = higher_is_same(distance)

    module = tf.Module()
    # Variables, not constants: the loaded object exposes them by name
    # (`loaded.threshold`) and they show in `saved_model_cli show --all`.
    module.threshold = tf.Variable(threshold, dtype=tf.float32, trainable=False)
    module.far = tf.Variable(far, dtype=tf.float32, trainable=False)
    distance_name = tf.constant(distance)

    @tf.function(input_signature=[spec_a, spec_b], autograph=False)
    def verify(inputs_a, inputs_b):
        score = _pair_score(embed(inputs_a), embed(inputs_b), distance)
        threshold_value = module.threshold.read_value()
        same = score >= threshold_value if similar else score <= threshold_value
        ones = tf.ones_like(score)
        return {
            "score": score,
            "same": same,
            "threshold": ones * threshold_value,
            "far": ones * module.far.read_value(),
        }

    @tf.function(input_signature=[spec], autograph=False)
    def embed_signature(inputs):
        embeddings = embed(inputs)
        if distances_lib.get(distance).unit_inputs:
            embeddings = _normalized(embeddings)
        return {"embeddings": embeddings}

    @tf.function(input_signature=[], autograph=False)
    def calibration():
        return {
            "threshold": module.threshold.read_value(),
            "far": module.far.read_value(),
            "distance": distance_name,
            "higher_is_same": tf.constant(similar),
        }

    module.verify = verify
    module.embed = embed_signature
    module.calibration = calibration
    _save(
        module,
        path,
        {
            SERVING_SIGNATURE: verify,
            VERIFY_SIGNATURE: verify,
            EMBED_SIGNATURE: embed_signature,
            CALIBRATION_SIGNATURE: calibration,
        },
    )
    record = {
        "format": "keras-dml-verification",
        "keras_dml_version": __version__,
        "threshold": threshold,
        "far": None if math.isnan(far) else far,
        "distance": distance,
        "higher_is_same": similar,
        "decision": "score >= threshold" if similar else "score <= threshold",
        "calibration": {key: _finite_or_none(value) for key, value in details.items()} or None,
    }
    os.makedirs(os.path.join(path, "assets.extra"), exist_ok=True)
    with open(os.path.join(path, CALIBRATION_FILE), "w") as f:
        json.dump(record, f, indent=2, allow_nan=False)


def _finite_or_none(value):
    """JSON has no NaN: an unknown number (e.g. TAR without positive pairs) becomes null."""
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def load_calibration(path: str) -> dict:
    """Reads the calibration record that `export_verification_model` wrote beside a SavedModel.

    Args:
        path: the SavedModel directory.

    Returns:
        The record: `threshold`, `far` (None when unknown), `distance`,
        `higher_is_same`, `decision`, and `calibration` (the
        `ThresholdCalibration` fields, or None).

    Example:

    ```python
    record = load_calibration("/tmp/verifier/1")
    print(record["threshold"], record["far"], record["decision"])
    ```
    """
    with open(os.path.join(path, CALIBRATION_FILE)) as f:
        return json.load(f)
