"""A Beam ML `ModelHandler` that embeds NumPy inputs with a Keras model or a TF SavedModel.

Beam's own `TFModelHandlerNumpy` (`apache_beam.ml.inference.tensorflow_inference`)
imports `tensorflow_hub`; the version Beam 2.77 allows (< 0.16) imports
`tf.compat.v1.estimator`, which TensorFlow 2.16+ no longer has, so that module
cannot be imported beside TensorFlow 2.20. `KerasModelHandler` is the same
idea for Keras 3: `RunInference(KerasModelHandler(path))` loads the model once
per worker, batches the elements (Beam's `BatchElements`), fits each input to
the model's input shape and returns one `PredictionResult` per element whose
`inference` is its embedding.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

METRICS_NAMESPACE = "keras_dml_KerasModelHandler"


def fit_image(image: np.ndarray, input_shape: Sequence[int | None]) -> np.ndarray:
    """Fits a decoded image to a model's input shape: size, channels, float32.

    Args:
        image: `(height, width)` or `(height, width, channels)` array, or a
            flat array of exactly the input's size; uint8 values are scaled
            to [0, 1], float values are kept.
        input_shape: the model's input shape without the batch axis, e.g.
            `(8, 8, 1)`; None entries are left as they are.

    Returns:
        float32 array of `input_shape`.

    Raises:
        ValueError: if the image cannot be fitted (wrong rank, channels).
    """
    x = np.asarray(image)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    else:
        x = x.astype(np.float32)
    shape = tuple(input_shape)
    known = all(d is not None for d in shape)
    if x.ndim == 1 and known and x.size == int(np.prod(shape)):
        return x.reshape(shape)  # raw values, e.g. a TFRecord float list
    if len(shape) != 3:
        if x.shape == shape:
            return x
        raise ValueError(f"cannot fit an input of shape {x.shape} to the model's {shape}")
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3:
        raise ValueError(f"expected an image (height, width[, channels]), got shape {x.shape}")
    height, width, channels = shape
    if channels is not None and x.shape[-1] != channels:
        if x.shape[-1] == 4 and channels == 3:
            x = x[..., :3]
        elif x.shape[-1] in (3, 4) and channels == 1:
            x = x[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)[:, None]
        elif x.shape[-1] == 1 and channels == 3:
            x = np.repeat(x, 3, axis=-1)
        else:
            raise ValueError(f"cannot fit {x.shape[-1]} channels to the model's {channels}")
    size = (height or x.shape[0], width or x.shape[1])
    if x.shape[:2] != size:
        from PIL import Image

        planes = [
            np.asarray(
                Image.fromarray(x[..., c]).resize((size[1], size[0]), Image.Resampling.BILINEAR)
            )
            for c in range(x.shape[-1])
        ]
        x = np.stack(planes, axis=-1).astype(np.float32)
    return x


class _SavedModelEmbedder:
    """Calls a SavedModel's `serving_default` signature on a batch."""

    def __init__(self, path: str):
        import tensorflow as tf

        loaded = tf.saved_model.load(path)
        self._keep = loaded
        self._serve = loaded.signatures["serving_default"]
        (self._input_name, spec), = self._serve.structured_input_signature[1].items()
        self.input_shape = tuple(spec.shape[1:])
        self._dtype = spec.dtype
        outputs = sorted(self._serve.structured_outputs)
        self._output = "embeddings" if "embeddings" in outputs else outputs[0]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        result = self._serve(**{self._input_name: tf.constant(batch, self._dtype)})
        return result[self._output].numpy()


class _KerasEmbedder:
    """Calls a `.keras` model's `predict_on_batch`, one call at a time.

    Beam shares one loaded model between the threads of a worker
    (`direct_running_mode=multi_threading`, or a runner's SDK harness
    threads). Under JAX, Keras's compiled predict step donates the model's
    state buffers, so two threads predicting at once fail with "Buffer has
    been deleted or donated" (their batches then went to the dead letter);
    the lock serialises the calls on every backend.
    """

    def __init__(self, path: str):
        import keras

        import keras_dml

        keras_dml._load_all()  # registers the layers and losses a saved model names
        self._model = keras.saving.load_model(path, compile=False)
        self.input_shape = tuple(self._model.input_shape[1:])
        self._lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            return np.asarray(self._model.predict_on_batch(batch))


def load_embedder(path: str):
    """Loads a `.keras` model or a SavedModel directory as a batch -> embeddings callable.

    The callable has an `input_shape` attribute (without the batch axis).

    Raises:
        ValueError: if `path` is neither a `.keras` file nor a SavedModel.
    """
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "saved_model.pb")):
        return _SavedModelEmbedder(path)
    if os.path.isfile(path) and path.endswith(".keras"):
        return _KerasEmbedder(path)
    raise ValueError(
        f"{path!r} is not a .keras model file or a SavedModel directory (with saved_model.pb)"
    )


class EmbedFailure:
    """The `inference` of a `PredictionResult` whose item could not be embedded on its own.

    Attributes:
        error: `"ExceptionType: message"` of the exception the item raised.
    """

    def __init__(self, error: BaseException | str):
        if isinstance(error, BaseException):
            error = f"{type(error).__name__}: {error}"
        self.error = " ".join(str(error).split())

    def __repr__(self) -> str:
        return f"EmbedFailure({self.error!r})"


class KerasModelHandler(ModelHandler[np.ndarray, PredictionResult, Any]):
    """Embeds NumPy inputs with a `.keras` model or a SavedModel, in batches, for `RunInference`.

    Args:
        model_path: a `.keras` file (loaded with `keras.saving.load_model`,
            keras-dml's layers registered) or a SavedModel directory (its
            `serving_default` signature; the output named `embeddings` if
            there is one, as in keras-dml's embedding SavedModel, else the
            first by name).
        min_batch_size: smallest batch Beam forms (default 1).
        max_batch_size: largest batch Beam forms (default 256).

    Each element is fitted to the model's input shape (`fit_image`: uint8
    scaled to [0, 1], resized, channels converted) before the batch is
    stacked, so images of different sizes can share a batch. If a batch
    fails (an element cannot be fitted, the model raises), the batch is
    bisected and retried (`run_inference`): the elements that fail on their
    own come back with an `EmbedFailure` (the error) as their `inference`, the
    others with their embeddings. `build_index` sends the failures to its
    dead letter, one line per item.

    Example:

    >>> import os, tempfile
    >>> import apache_beam as beam
    >>> import keras
    >>> import numpy as np
    >>> from apache_beam.ml.inference.base import RunInference
    >>> from keras_dml.beam import KerasModelHandler
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> path = os.path.join(tempfile.mkdtemp(), "m.keras")
    >>> model.save(path)
    >>> from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    >>> from apache_beam.testing.util import assert_that, equal_to
    >>> with beam.Pipeline(runner=FnApiRunner()) as p:
    ...     shapes = (p | beam.Create([np.ones(4, "float32")])
    ...                 | RunInference(KerasModelHandler(path))
    ...                 | beam.Map(lambda result: result.inference.shape))
    ...     _ = assert_that(shapes, equal_to([(2,)]))
    """

    def __init__(self, model_path: str, *, min_batch_size: int = 1, max_batch_size: int = 256):
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size)
        self._model_path = model_path
        self._min_batch_size = min_batch_size
        self._max_batch_size = max_batch_size

    def load_model(self):
        return load_embedder(self._model_path)

    def update_model_path(self, model_path: str | None = None):
        self._model_path = model_path or self._model_path

    def run_inference(
        self,
        batch: Sequence[np.ndarray],
        model,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        """Embeds `batch`; items that fail alone get an `EmbedFailure` as their inference.

        The whole batch is tried first. If it raises, it is split in halves and
        each half is tried again (recursively), so one bad item among `n`
        costs about `2 * log2(n)` extra calls and only the items that fail on
        their own are marked failed; the others keep their embeddings. Each
        split is counted in the Beam counter `batches_split` of
        `get_metrics_namespace()`.
        """
        results: list[PredictionResult | None] = [None] * len(batch)
        self._embed_or_split(list(batch), list(range(len(batch))), model, results)
        return results

    def _embed_or_split(self, items: list, rows: list[int], model, results: list) -> None:
        try:
            embeddings = self.embed_batch(items, model)
            if len(embeddings) != len(items):
                raise ValueError(
                    f"the model returned {len(embeddings)} embeddings for {len(items)} inputs"
                )
        except Exception as error:  # noqa: BLE001 - isolate the items that fail
            if len(items) == 1:
                results[rows[0]] = PredictionResult(
                    items[0], EmbedFailure(error), self._model_path
                )
                return
            from apache_beam.metrics import Metrics

            Metrics.counter(self.get_metrics_namespace(), "batches_split").inc()
            half = len(items) // 2
            self._embed_or_split(items[:half], rows[:half], model, results)
            self._embed_or_split(items[half:], rows[half:], model, results)
            return
        for row, item, embedding in zip(rows, items, embeddings, strict=True):
            results[row] = PredictionResult(item, embedding, self._model_path)

    def embed_batch(self, batch: Sequence[np.ndarray], model) -> np.ndarray:
        """Fits each input to the model, stacks them and returns the float32 embeddings."""
        stacked = np.stack([fit_image(x, model.input_shape) for x in batch])
        return np.asarray(model(stacked), np.float32)

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(np.asarray(x).nbytes for x in batch)

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE
