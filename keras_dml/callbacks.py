"""Keras callbacks for metric learning: retrieval metrics in `logs`, Embedding Projector export.

`RetrievalMetricsCallback` embeds a validation set at the end of an epoch and
writes `val_precision_at_1`, `val_recall_at_K`, `val_r_precision`,
`val_map_at_r` and `val_nmi` into the epoch's `logs`, so that every Keras
callback placed after it in the `callbacks` list (`EarlyStopping`,
`ModelCheckpoint`, `ReduceLROnPlateau`, `TensorBoard`, `CSVLogger`) and the
`History` returned by `fit` see them like any validation metric.

`export_embedding_projector` (in `keras_dml.projector`, importable from here
as before) writes embeddings, their labels and optionally a sprite of
thumbnails in the format of TensorBoard's Embedding Projector.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np

from keras_dml.evaluation.retrieval import check_backend, retrieval_metrics
from keras_dml.projector import export_embedding_projector, to_uint8_images  # noqa: F401


def _split_validation_data(validation_data) -> tuple[Any, np.ndarray | None]:
    """Returns `(inputs, labels)`; labels are None when `validation_data` is a dataset."""
    if isinstance(validation_data, (tuple, list)):
        if len(validation_data) != 2:
            raise ValueError(
                "`validation_data` must be `(x, y)` or a dataset of `(x, y)` batches, got a "
                f"sequence of length {len(validation_data)}."
            )
        x, y = validation_data
        labels = np.asarray(keras.ops.convert_to_numpy(y)).reshape(-1)
        return x, labels
    if hasattr(validation_data, "__iter__") or isinstance(validation_data, keras.utils.PyDataset):
        return validation_data, None
    raise ValueError(
        "`validation_data` must be `(x, y)` arrays or an iterable of `(x, y)` batches "
        f"(tf.data.Dataset, PyDataset), got {type(validation_data).__name__}."
    )


class RetrievalMetricsCallback(keras.callbacks.Callback):
    """Puts retrieval metrics of a validation set into `logs` so other callbacks can monitor them.

    At the end of every `every_n_epochs`-th epoch (and only then) the
    callback embeds the validation inputs, scores them with
    `keras_dml.evaluation.retrieval_metrics` (leave-one-out: every embedding
    is a query searched among all the others; or, with `reference_data`,
    among the references) and adds the results to the
    epoch's `logs` under `prefix`: `val_precision_at_1`, `val_recall_at_1`,
    `val_recall_at_2`, ..., `val_r_precision`, `val_map_at_r` and, with
    `nmi=True`, `val_nmi`.

    Keras passes one `logs` dict to the callbacks in list order, so put this
    callback *before* the callbacks that read its metrics. On epochs where it
    does not run, its keys are absent, as Keras's own `validation_freq` leaves
    `val_loss` out; `EarlyStopping` and `ModelCheckpoint` then skip that epoch
    (with a warning).

    Use the validation set for model selection honestly: held-out images of
    the training classes, or a separate validation split of classes, not the
    test classes you report.

    Args:
        validation_data: `(x, y)` with `y` the integer class labels, or a
            `tf.data.Dataset` / `keras.utils.PyDataset` / iterable yielding
            `(x, y)` batches.
        k: the K of Recall@K, an int or a sequence of them.
        every_n_epochs: compute the metrics every this many epochs (the
            last epoch of a period, e.g. epochs 2, 4, ... for 2).
        prefix: prepended to each metric name in `logs`.
        distance: the distance the metrics rank with (`"cosine"` by default;
            see `keras_dml.distances`).
        nmi: also compute NMI (k-means; the slow part on large sets); `"exact"`
            for the full k-means (see `retrieval_metrics`).
        reference_data: optional `(x, y)` (or a dataset of `(x, y)` batches)
            of references, e.g. a gallery: each validation input is then a
            query searched among these references only, instead of
            leave-one-out among the validation inputs. Do not include the
            queries themselves.
        embedding_model: model (or callable returning NumPy/tensor
            embeddings) that embeds `x`; `None` uses the model being trained,
            which must then return embeddings from `predict` (true for
            embedding models, `MarginModel` and `S2SD`).
        batch_size: batch size of `predict` for array inputs.
        verbose: 1 prints one line with the metrics when they are computed.
        backend: passed to `retrieval_metrics`: `"numpy"` (default) or
            `"faiss"` (faiss's brute-force search and, for NMI, faiss's
            k-means; needs `faiss-cpu`). Checked here, with the same message.

    Example:

    ```python
    callbacks = [
        keras_dml.callbacks.RetrievalMetricsCallback((x_val, y_val), k=(1, 4)),
        keras.callbacks.EarlyStopping(monitor="val_map_at_r", mode="max", patience=5),
        keras.callbacks.ModelCheckpoint(
            "best.keras", monitor="val_map_at_r", mode="max", save_best_only=True
        ),
    ]
    model.fit(x_train, y_train, epochs=50, callbacks=callbacks)
    ```
    """

    def __init__(
        self,
        validation_data,
        k: int | Sequence[int] = (1, 2, 4, 8),
        every_n_epochs: int = 1,
        prefix: str = "val_",
        distance="cosine",
        nmi: bool | str = True,
        reference_data=None,
        embedding_model: keras.Model | Callable | None = None,
        batch_size: int = 256,
        verbose: int = 0,
        backend: str = "numpy",
    ):
        super().__init__()
        check_backend(backend)
        if (isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int)
                or every_n_epochs < 1):
            raise ValueError(
                f"`every_n_epochs` must be a positive integer, got {every_n_epochs!r}."
            )
        if not isinstance(prefix, str):
            raise ValueError(f"`prefix` must be a string, got {prefix!r}.")
        self.validation_data = validation_data
        self.reference_data = reference_data
        self.x, self.y = _split_validation_data(validation_data)
        self.reference = (
            None if reference_data is None else _split_validation_data(reference_data)
        )
        self.k = k
        self.every_n_epochs = every_n_epochs
        self.prefix = prefix
        self.distance = distance
        self.nmi = nmi if isinstance(nmi, str) and nmi == "exact" else bool(nmi)
        self.embedding_model = embedding_model
        self.batch_size = batch_size
        self.verbose = verbose
        self.backend = backend
        # epoch -> metrics, for every epoch the metrics were computed.
        self.history: dict[int, dict[str, float]] = {}

    def _embed(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        embed = self.embedding_model if self.embedding_model is not None else self.model
        if y is not None:
            if isinstance(embed, keras.Model):
                embeddings = embed.predict(x, batch_size=self.batch_size, verbose=0)
            else:
                embeddings = embed(x)
            return np.asarray(keras.ops.convert_to_numpy(embeddings)), y
        # A dataset of (x, y) batches: embed batch by batch, keeping the labels aligned.
        chunks, labels = [], []
        for batch in x:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError("`validation_data` as a dataset must yield `(x, y)` batches.")
            x, y = batch[0], batch[1]
            if isinstance(embed, keras.Model):
                out = embed(x, training=False)
            else:
                out = embed(x)
            chunks.append(np.asarray(keras.ops.convert_to_numpy(out)))
            labels.append(np.asarray(keras.ops.convert_to_numpy(y)).reshape(-1))
        if not chunks:
            raise ValueError("`validation_data` yielded no batches.")
        return np.concatenate(chunks), np.concatenate(labels)

    def compute_metrics(self) -> dict[str, float]:
        """Embeds the validation set now and returns its metrics, keys prefixed."""
        embeddings, labels = self._embed(self.x, self.y)
        references = (None, None) if self.reference is None else self._embed(*self.reference)
        metrics = retrieval_metrics(
            embeddings, labels, *references, k=self.k, distance=self.distance, nmi=self.nmi,
            backend=self.backend,
        )
        return {f"{self.prefix}{name}": float(value) for name, value in metrics.items()}

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, data and `embedding_model` as given (objects, not JSON)."""
        return {
            "validation_data": self.validation_data,
            "k": self.k,
            "every_n_epochs": self.every_n_epochs,
            "prefix": self.prefix,
            "distance": self.distance,
            "nmi": self.nmi,
            "reference_data": self.reference_data,
            "embedding_model": self.embedding_model,
            "batch_size": self.batch_size,
            "verbose": self.verbose,
            "backend": self.backend,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RetrievalMetricsCallback:
        return cls(**config)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs:
            return
        metrics = self.compute_metrics()
        self.history[epoch] = metrics
        if logs is not None:
            logs.update(metrics)
        if self.verbose:
            shown = " - ".join(f"{name}: {value:.4f}" for name, value in metrics.items())
            print(f"Epoch {epoch + 1}: {shown}")
