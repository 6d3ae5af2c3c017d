"""Pieces shared by the pair losses ported from pytorch-metric-learning (PML).

PML computes each loss on the matrix its distance object returns: a distance
(smaller is closer) or a similarity (larger is closer, "inverted"), and writes
margins as `distance.margin(x, y)`: `x - y` for a distance, `y - x` for a
similarity. Its reducers average all terms (`MeanReducer`, the default of
most losses) or only the strictly positive ones (`AvgNonZeroReducer`).
"""

from __future__ import annotations

from keras import ops

from keras_dml import distances
from keras_dml import ops as dml_ops
from keras_dml.losses.base import References


def oriented_matrix(references: References, embeddings, distance):
    """`(matrix, sign)`: the `(B, R)` pair matrix in the measure's own direction and its sign.

    `matrix` is a similarity for a similarity measure (`"cosine"`, `"dot"`)
    and a distance otherwise; `sign` is `-1.0` or `+1.0`, so that
    `sign * (x - y)` is PML's `distance.margin(x, y)`.
    """
    measure = distances.get(distance)
    kind = "similarity" if measure.is_similarity else "distance"
    return references.pairwise(embeddings, measure, kind=kind), (-1.0 if measure.is_similarity
                                                                 else 1.0)


def mean_of_positive_terms(references: References, terms, mask, reducer=None, labels=None):
    """Mean of the `terms` under `mask` that are `> 0`; 0 when there is none.

    PML's default `AvgNonZeroReducer`. Across replicas the sum and the count
    are summed over the replicas first (`References.mean`). A
    `keras_dml.reducers.Reducer` given as `reducer` replaces it (`labels`:
    the anchors' labels, for `ClassWeightedReducer`).
    """
    if reducer is not None:
        return references.mean(*reducer.reduce(terms, ops.cast(mask, "bool"), labels))
    kept = ops.logical_and(ops.cast(mask, "bool"), terms > 0)
    return references.mean(dml_ops.masked_sum(terms, kept), dml_ops.masked_count(kept))


def mean_over(references: References, terms, mask, reducer=None, labels=None):
    """Mean of `terms` under `mask`, zeros included; 0 when the mask is empty.

    PML's `MeanReducer`, the default of most of its losses. Across replicas
    the sum and the count are summed over the replicas first. A
    `keras_dml.reducers.Reducer` given as `reducer` replaces it.
    """
    mask = ops.cast(mask, "bool")
    if reducer is not None:
        return references.mean(*reducer.reduce(terms, mask, labels))
    return references.mean(dml_ops.masked_sum(terms, mask), dml_ops.masked_count(mask))


def logsumexp_or_zero(values, mask, axis=-1, keepdims=False):
    """`log(sum_{mask} exp(values))` per row, 0 for an empty row (PML's `lmu.logsumexp`)."""
    result = dml_ops.masked_logsumexp(values, mask, axis=axis, keepdims=keepdims)
    empty = ops.logical_not(ops.any(ops.cast(mask, "bool"), axis=axis, keepdims=keepdims))
    return ops.where(empty, ops.zeros_like(result), result)
