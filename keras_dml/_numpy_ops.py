"""The Keras-free part of `keras_dml.distances`: the distance names and NumPy forms.

`keras_dml.distances` is the public face (it builds one `Distance` object
per name below and re-exports these). This module holds what host-side code
needs without importing Keras: the name table (the index resolves its
`distance=` here) and L2 normalisation of NumPy arrays, for the index,
retrieval metrics, re-ranking and pair verification, where a trip through a
backend tensor costs more than the arithmetic.
"""

from __future__ import annotations

import math

import numpy as np

# Canonical names of the built-in measures (see the table of `keras_dml.distances`).
DISTANCE_NAMES = ("cosine", "dot", "euclidean", "squared_euclidean", "angular")
# Lower-case aliases of the canonical names.
DISTANCE_ALIASES = {
    "cos": "cosine",
    "dot_product": "dot",
    "inner_product": "dot",
    "l2": "euclidean",
    "squared-l2": "squared_euclidean",
    "squared_l2": "squared_euclidean",
    "sqeuclidean": "squared_euclidean",
}


def canonical_distance_name(name) -> str | None:
    """The canonical name of a distance name or alias (any case); None if unknown."""
    if not isinstance(name, str):
        return None
    key = name.lower()
    key = DISTANCE_ALIASES.get(key, key)
    return key if key in DISTANCE_NAMES else None


# The floor of a squared L2 norm: an all-zero row stays zero instead of 0 / 0.
NORM_EPSILON = 1e-12


def l2_normalize_rows(x: np.ndarray, square_sums: np.ndarray | None = None) -> np.ndarray:
    """Scales each row of a float32 `(n, dim)` array to unit L2 norm; an all-zero row stays zero.

    Mirrors `keras_dml.distances.l2_normalize` (same epsilon). Rows whose
    squared norm overflows float32 (entries beyond ~1e19) are rescaled first.

    Args:
        x: float32 array of shape `(n, dim)`.
        square_sums: the rows' squared norms `(n,)` when the caller has them.

    Returns:
        A new float32 array of the same shape.
    """
    if square_sums is None:
        square_sums = np.einsum("ij,ij->i", x, x)
    if not np.isfinite(square_sums).all():
        x = x / np.maximum(np.abs(x).max(axis=1, keepdims=True), np.float32(1e-30))
        square_sums = np.einsum("ij,ij->i", x, x)
    return (x / np.sqrt(np.maximum(square_sums, NORM_EPSILON))[:, None]).astype(
        np.float32, copy=False
    )


def l2_normalize_vector(x: np.ndarray, square_sum: float) -> np.ndarray:
    """`l2_normalize_rows` for one `(dim,)` vector whose finite squared norm is known."""
    # A Python float scalar keeps the vector's float32 (NumPy 2 promotion).
    return x * (1.0 / math.sqrt(max(square_sum, NORM_EPSILON)))
