"""Pairwise distances and similarities between two sets of embeddings.

Every function takes `x` of shape `(N, D)` and an optional `y` of shape
`(M, D)` and returns an `(N, M)` matrix; with `y=None` the pairs are taken
within `x` and the diagonal is exactly the self-distance (0, or 1 for cosine).
Nothing of shape `(N, M, D)` is ever built.

Losses pick a distance by name with `distance=`; `get()` resolves the names:

| name | aliases | kind |
| --- | --- | --- |
| `"cosine"` | `"cos"` | similarity, on L2-normalised inputs |
| `"dot"` | `"dot_product"`, `"inner_product"` | similarity |
| `"euclidean"` | `"l2"`, `"L2"` | distance, safe gradient at 0 |
| `"squared_euclidean"` | `"squared-L2"`, `"sqeuclidean"` | distance |
| `"angular"` | | distance, `max(1 - cos, 0)` (tensorflow-addons' name) |

Example:

>>> import numpy as np
>>> from keras_dml import distances
>>> x = np.array([[3.0, 4.0], [0.0, 0.0]], "float32")
>>> np.asarray(distances.euclidean_distance(x)).round(3).tolist()
[[0.0, 5.0], [5.0, 0.0]]
>>> distances.get("L2").name
'euclidean'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from keras import ops

from keras_dml._numpy_ops import (
    DISTANCE_ALIASES,
    DISTANCE_NAMES,
    NORM_EPSILON,
    canonical_distance_name,
)

# Below this a squared distance is treated as exactly zero: sqrt has an
# infinite derivative at 0, so those entries get a zero gradient instead.
_ZERO_DISTANCE_EPS = 1e-16


def _as_float(x):
    """Converts to a float tensor, computing half precision in float32."""
    x = ops.convert_to_tensor(x)
    if ops.dtype(x) in ("float16", "bfloat16") or "int" in ops.dtype(x):
        x = ops.cast(x, "float32")
    return x


def _pair(x, y):
    x = _as_float(x)
    y = x if y is None else ops.cast(_as_float(y), ops.dtype(x))
    return x, y


def _zero_diagonal(matrix):
    n = ops.shape(matrix)[0]
    return matrix * (1.0 - ops.eye(n, dtype=matrix.dtype))


def _power_of_two_scale(x, axis=None, keepdims=False):
    """A power of two near `max |x|` (a constant for autodiff), to keep squares in range.

    Dividing by it brings the largest entry into `[1, 2)`, so sums of squares
    of embeddings up to float32's maximum (~3e38) stay finite; a power of two
    divides exactly. Rows (or tensors) that are all zero get a small finite
    scale; a NaN or Inf entry makes the scale NaN or Inf, so it is not hidden.
    """
    largest = ops.max(ops.abs(x), axis=axis, keepdims=keepdims)
    largest = ops.maximum(largest, ops.cast(1e-30, x.dtype))
    return ops.stop_gradient(ops.exp2(ops.floor(ops.log2(largest))))


def l2_normalize(x, axis: int = -1, epsilon: float = NORM_EPSILON):
    """Scales rows to unit L2 norm; an all-zero row stays zero (no NaN).

    Rows whose largest entry is at least 1 are first divided by a power of
    two near it, so rows of norm up to float32's maximum normalise correctly
    (their squared norm would overflow); smaller rows are left as they are,
    and the `epsilon` floor applies to their squared norm (an all-zero row
    stays zero, with a gradient of at most `1 / sqrt(epsilon)`).
    """
    x = _as_float(x)
    # Only scale rows down: scaling a tiny row up would divide the gradient of the
    # `epsilon`-floored all-zero row by a tiny scale (1e36 instead of 1e6).
    x = x / ops.maximum(_power_of_two_scale(x, axis=axis, keepdims=True), 1.0)
    square_sum = ops.sum(ops.square(x), axis=axis, keepdims=True)
    return x * ops.rsqrt(ops.maximum(square_sum, epsilon))


def dot_product(x, y=None):
    """Inner products `x @ y.T`: a similarity, larger means closer."""
    x, y = _pair(x, y)
    return ops.matmul(x, ops.transpose(y))


def cosine_similarity(x, y=None):
    """Cosine similarity of the L2-normalised rows, in [-1, 1]."""
    x, y_ = _pair(x, y)
    x = l2_normalize(x)
    y_ = x if y is None else l2_normalize(y_)
    return ops.clip(ops.matmul(x, ops.transpose(y_)), -1.0, 1.0)


def angular_distance(x, y=None):
    """`max(1 - cos, 0)`, tensorflow-addons' `angular` distance."""
    distance = ops.maximum(1.0 - cosine_similarity(x, y), 0.0)
    return _zero_diagonal(distance) if y is None else distance


def _scaled_squared_euclidean(x, y=None):
    """`(squared distances of x / s and y / s, s)` with `s` a power of two near `max |x|, |y|`.

    `|x|^2 + |y|^2 - 2 x.y` overflows float32 for entries near 1e19 and gives
    `inf - inf = NaN`; on the rescaled inputs every term is small.
    """
    x, y_ = _pair(x, y)
    scale = _power_of_two_scale(x)
    if y is not None:
        scale = ops.maximum(scale, _power_of_two_scale(y_))
    x = x / scale
    y_ = x if y is None else y_ / scale
    x_sq = ops.sum(ops.square(x), axis=1, keepdims=True)
    y_sq = x_sq if y is None else ops.sum(ops.square(y_), axis=1, keepdims=True)
    distance = x_sq + ops.transpose(y_sq) - 2.0 * ops.matmul(x, ops.transpose(y_))
    distance = ops.maximum(distance, 0.0)
    return (_zero_diagonal(distance) if y is None else distance), scale


def squared_euclidean_distance(x, y=None):
    """Squared L2 distances `|x|^2 + |y|^2 - 2 x.y`, clipped at 0.

    Computed on inputs divided by a common power of two, then scaled back:
    NaN-free for any finite input (a squared distance beyond the dtype's
    range is Inf, not NaN).
    """
    distance, scale = _scaled_squared_euclidean(x, y)
    return distance * ops.square(scale)


def safe_sqrt(squared):
    """`sqrt(squared)` with a zero (not infinite) gradient where `squared` is ~0.

    Values at or below `1e-16` count as exactly 0.
    """
    is_zero = ops.cast(squared <= _ZERO_DISTANCE_EPS, squared.dtype)
    return ops.sqrt(squared + is_zero * _ZERO_DISTANCE_EPS) * (1.0 - is_zero)


def euclidean_distance(x, y=None):
    """L2 distances, with a zero (not NaN) gradient where the distance is 0.

    Finite for every finite input (the square root is taken before scaling
    back, so embeddings near float32's maximum give finite distances). A
    distance below `1e-8` times the inputs' scale counts as 0.
    """
    squared, scale = _scaled_squared_euclidean(x, y)
    return safe_sqrt(squared) * scale


def cosine_distance(x, y=None):
    """`1 - cos`, the distance form of `cosine_similarity` (in [0, 2])."""
    return 1.0 - cosine_similarity(x, y)


@dataclasses.dataclass(frozen=True)
class Distance:
    """A named pairwise measure.

    Attributes:
        name: canonical name, e.g. `"euclidean"`.
        fn: `fn(x, y=None) -> (N, M)` matrix.
        is_similarity: True when larger values mean closer (cosine, dot).
        distance_fn: the measure as a distance (smaller is closer) when that
            is not simply `-fn` (cosine: `1 - cos`); None for `-fn` (or `fn`
            for a distance).
        zero_self: the self-distance is exactly 0 (`fn(x)` zeroes the
            diagonal); pairs of a sample with itself are zeroed the same way
            when the references are another tensor holding the queries.
        unit_inputs: computed on L2-normalised rows (cosine, angular), so
            code that precomputes may normalise once.
    """

    name: str
    fn: Callable
    is_similarity: bool
    distance_fn: Callable | None = None
    zero_self: bool = False
    unit_inputs: bool = False

    def __call__(self, x, y=None):
        return self.fn(x, y)

    def distance(self, x, y=None):
        """The measure as a distance (smaller is closer): `1 - cos`, `-dot`."""
        if self.distance_fn is not None:
            return self.distance_fn(x, y)
        if self.is_similarity:
            return -self.fn(x, y)
        return self.fn(x, y)

    def similarity(self, x, y=None):
        """The measure as a similarity (larger is closer): `-d` for distances."""
        return self.fn(x, y) if self.is_similarity else -self.fn(x, y)


# The one registry of distance names: every module that takes `distance=` (losses,
# miners, evaluation, the index, verification, export, SiameseModel) resolves it here.
_DISTANCES = {
    "cosine": Distance(
        "cosine", cosine_similarity, True, distance_fn=cosine_distance, unit_inputs=True
    ),
    "dot": Distance("dot", dot_product, True),
    "euclidean": Distance("euclidean", euclidean_distance, False, zero_self=True),
    "squared_euclidean": Distance(
        "squared_euclidean", squared_euclidean_distance, False, zero_self=True
    ),
    "angular": Distance("angular", angular_distance, False, zero_self=True, unit_inputs=True),
}
# Canonical names of the built-in measures, in table order.
NAMES = DISTANCE_NAMES


def get(identifier: str | Distance) -> Distance:
    """Resolves a distance name (case-insensitive) or returns a `Distance` as is.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if isinstance(identifier, Distance):
        return identifier
    if not isinstance(identifier, str):
        raise ValueError(
            f"`distance` must be a name such as 'cosine' or 'euclidean', got {identifier!r}."
        )
    key = canonical_distance_name(identifier)
    if key is None:
        known = sorted(set(DISTANCE_NAMES) | set(DISTANCE_ALIASES))
        raise ValueError(f"Unknown `distance` {identifier!r}; expected one of {known}.")
    return _DISTANCES[key]


def is_builtin(measure: Distance) -> bool:
    """True when `measure` is the registry's own object (not a custom `Distance`)."""
    return _DISTANCES.get(measure.name) is measure


def builtin_name(identifier, allowed=NAMES) -> str | None:
    """The canonical name of a built-in measure among `allowed`, else None.

    `identifier` is a name or alias (any case) or a `Distance`; a custom
    `Distance` or a measure outside `allowed` gives None, so that the caller
    raises its own error.

    Raises:
        ValueError: for an unknown name (from `get`).
    """
    measure = get(identifier)
    return measure.name if is_builtin(measure) and measure.name in allowed else None


def pairwise(x, y=None, distance: str | Distance = "cosine"):
    """The `(N, M)` matrix of `distance` between rows of `x` and `y`."""
    return get(distance)(x, y)
