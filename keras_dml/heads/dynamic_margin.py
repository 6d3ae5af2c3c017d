"""Per-class margins from class frequencies: rare classes get larger margins."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def dynamic_margins(
    class_counts: Sequence[int] | np.ndarray,
    margin_min: float = 0.05,
    margin_max: float = 0.5,
    power: float = 0.25,
) -> list[float]:
    """Computes one margin per class from its sample count; pass the result as `margin=`.

    `m_c = a * n_c^(-power) + b`, with `a` and `b` chosen so that the most
    frequent class gets `margin_min` and the rarest gets `margin_max`. When
    every class has the same count, every class gets `margin_max`.

    Args:
        class_counts: samples per class `n_c` (all >= 1), e.g.
            `np.bincount(train_labels)`.
        margin_min: margin of the most frequent class.
        margin_max: margin of the rarest class.
        power: the exponent λ (0.25 in the winning solution).

    Returns:
        A list of `len(class_counts)` floats, for `ArcFace(margin=...)` or
        `CosFace(margin=...)`.

    Example:

    >>> margins = dynamic_margins([1000, 100, 10], margin_min=0.1, margin_max=0.4)
    >>> [round(m, 3) for m in margins]
    [0.1, 0.208, 0.4]

    Reference: Ha et al., "Google Landmark Recognition 2020 Competition Third
    Place Solution" (arXiv:2010.05350): ArcFace with dynamic margins.
    """
    counts = np.asarray(class_counts, dtype="float64").reshape(-1)
    if counts.size < 2:
        raise ValueError(f"`class_counts` needs at least 2 classes, got {counts.size}.")
    if not np.all(np.isfinite(counts)) or np.any(counts < 1):
        raise ValueError("`class_counts` must all be >= 1 (a class without samples has no margin).")
    if not 0 <= margin_min <= margin_max:
        raise ValueError(
            f"Need 0 <= `margin_min` <= `margin_max`, got {margin_min} and {margin_max}."
        )
    if power <= 0:
        raise ValueError(f"`power` must be > 0, got {power}.")
    inverse = counts ** (-power)
    spread = inverse.max() - inverse.min()
    if spread == 0:
        return [float(margin_max)] * counts.size
    slope = (margin_max - margin_min) / spread
    offset = margin_max - slope * inverse.max()
    # Clip only removes round-off at the two ends.
    return np.clip(slope * inverse + offset, margin_min, margin_max).tolist()
