"""TensorBoard Embedding Projector files, and images as uint8 for display.

`export_embedding_projector` writes embeddings, their labels and optionally
a sprite of thumbnails in the format of TensorBoard's Embedding Projector;
`to_uint8_images` is shared with `keras_dml.plots`. Both are also importable
from `keras_dml.callbacks`, where they were before.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np


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
