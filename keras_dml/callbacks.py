"""Keras callbacks for metric learning: retrieval metrics in `logs`, Embedding Projector export.

`RetrievalMetricsCallback` embeds a validation set at the end of an epoch and
writes `val_precision_at_1`, `val_recall_at_K`, `val_r_precision`,
`val_map_at_r` and `val_nmi` into the epoch's `logs`, so that every Keras
callback placed after it in the `callbacks` list (`EarlyStopping`,
`ModelCheckpoint`, `ReduceLROnPlateau`, `TensorBoard`, `CSVLogger`) and the
`History` returned by `fit` see them like any validation metric.

`export_embedding_projector` writes embeddings, their labels and optionally
a sprite of thumbnails in the format of TensorBoard's Embedding Projector.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np

from keras_dml.evaluation.retrieval import retrieval_metrics


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
    ):
        super().__init__()
        if (isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int)
                or every_n_epochs < 1):
            raise ValueError(
                f"`every_n_epochs` must be a positive integer, got {every_n_epochs!r}."
            )
        if not isinstance(prefix, str):
            raise ValueError(f"`prefix` must be a string, got {prefix!r}.")
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
            embeddings, labels, *references, k=self.k, distance=self.distance, nmi=self.nmi
        )
        return {f"{self.prefix}{name}": float(value) for name, value in metrics.items()}

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


def to_uint8_images(images) -> np.ndarray:
    """Maps images to uint8 for display: uint8 as is, [0, 1] floats x 255, others min-max."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    images = images.astype("float32")
    if images.size and images.min() >= 0.0 and images.max() <= 1.0:
        return np.round(images * 255.0).astype("uint8")
    # Preprocessed inputs (mean-subtracted, [-1, 1], ...): stretch each image.
    axes = tuple(range(1, images.ndim))
    low = images.min(axis=axes, keepdims=True)
    high = images.max(axis=axes, keepdims=True)
    return np.round(255.0 * (images - low) / np.maximum(high - low, 1e-12)).astype("uint8")


def _sprite(images: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Tiles images into one square uint8 sprite (row-major, as the projector reads it)."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(
            "`images` must have shape (n, height, width) or (n, height, width, 1|3|4), got "
            f"{images.shape}."
        )
    images = to_uint8_images(images)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    images = images[..., :3]
    n, height, width, _ = images.shape
    side = math.ceil(math.sqrt(n))
    # TensorBoard refuses sprites over 8192 x 8192 pixels.
    if side * max(height, width) > 8192:
        raise ValueError(
            f"{n} thumbnails of {height}x{width} make a sprite over 8192 px: pass smaller "
            "thumbnails or fewer points."
        )
    sheet = np.full((side * height, side * width, 3), 255, dtype="uint8")
    for i, image in enumerate(images):
        row, col = divmod(i, side)
        sheet[row * height : (row + 1) * height, col * width : (col + 1) * width] = image
    return sheet, (width, height)


def _tsv_cell(value) -> str:
    # Tabs and newlines would break the TSV the projector parses.
    return str(value).replace("\t", " ").replace("\n", " ")


def export_embedding_projector(
    log_dir: str,
    embeddings,
    labels=None,
    metadata: dict[str, Sequence[Any]] | None = None,
    images=None,
    tensor_name: str = "embeddings",
) -> dict[str, str]:
    """Writes embeddings, labels and thumbnails where TensorBoard's Embedding Projector finds them.

    Run `tensorboard --logdir LOG_DIR` and open the Projector tab to explore
    the embeddings with PCA, t-SNE or UMAP, coloured by label. Files written
    in `log_dir`: `<tensor_name>.tsv` (one embedding per row),
    `<tensor_name>_metadata.tsv` (a header row, then one row per embedding),
    `<tensor_name>_sprite.png` with `images`, and `projector_config.pbtxt`
    (replaced, so one call per directory).

    Args:
        log_dir: the TensorBoard log directory (created if missing).
        embeddings: `(n, dim)` array.
        labels: optional `(n,)` labels, the column `label`.
        metadata: optional further columns, `{name: n values}`.
        images: optional `(n, h, w)` or `(n, h, w, c)` thumbnails shown in
            place of points (at most 8192 x 8192 pixels once tiled).
        tensor_name: name shown in the projector, used for the file names.

    Returns:
        The paths written, by kind (`"tensors"`, `"metadata"`, `"sprite"`,
        `"config"`).

    Raises:
        ValueError: if shapes or lengths disagree.

    Example:

    ```python
    keras_dml.callbacks.export_embedding_projector(
        "logs/projector", embedder.predict(x_test), labels=y_test, images=x_test
    )
    # tensorboard --logdir logs/projector
    ```
    """
    embeddings = np.asarray(keras.ops.convert_to_numpy(embeddings), dtype="float32")
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(
            f"`embeddings` must have shape (n, dim) with n > 0, got {embeddings.shape}."
        )
    n = embeddings.shape[0]
    columns: dict[str, Sequence[Any]] = {}
    if labels is not None:
        columns["label"] = np.asarray(labels).reshape(-1).tolist()
    for name, values in (metadata or {}).items():
        columns[str(name)] = list(values)
    for name, values in columns.items():
        if len(values) != n:
            raise ValueError(
                f"Metadata column {name!r} has {len(values)} values for {n} embeddings."
            )
    if not tensor_name or any(c in tensor_name for c in "/\\\"\n"):
        raise ValueError(f"`tensor_name` must be a plain file name, got {tensor_name!r}.")
    os.makedirs(log_dir, exist_ok=True)
    paths = {"tensors": os.path.join(log_dir, f"{tensor_name}.tsv")}
    np.savetxt(paths["tensors"], embeddings, delimiter="\t", fmt="%.6g")
    config = [
        "embeddings {",
        f'  tensor_name: "{tensor_name}"',
        f'  tensor_path: "{tensor_name}.tsv"',
        f"  tensor_shape: {n}",
        f"  tensor_shape: {embeddings.shape[1]}",
    ]
    if columns:
        paths["metadata"] = os.path.join(log_dir, f"{tensor_name}_metadata.tsv")
        with open(paths["metadata"], "w", encoding="utf-8") as f:
            if len(columns) > 1:
                # The projector reads a header row only when there are several columns.
                f.write("\t".join(_tsv_cell(name) for name in columns) + "\n")
            for row in zip(*columns.values(), strict=True):
                f.write("\t".join(_tsv_cell(value) for value in row) + "\n")
        config.append(f'  metadata_path: "{tensor_name}_metadata.tsv"')
    if images is not None:
        images = np.asarray(images)
        if len(images) != n:
            raise ValueError(f"`images` has {len(images)} thumbnails for {n} embeddings.")
        from PIL import Image

        sheet, (width, height) = _sprite(images)
        paths["sprite"] = os.path.join(log_dir, f"{tensor_name}_sprite.png")
        Image.fromarray(sheet).save(paths["sprite"])
        config += [
            "  sprite {",
            f'    image_path: "{tensor_name}_sprite.png"',
            f"    single_image_dim: {width}",
            f"    single_image_dim: {height}",
            "  }",
        ]
    config.append("}")
    paths["config"] = os.path.join(log_dir, "projector_config.pbtxt")
    with open(paths["config"], "w", encoding="utf-8") as f:
        f.write("\n".join(config) + "\n")
    return paths
