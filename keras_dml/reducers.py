"""Reducers: how a loss's per-element terms (per pair, triplet or anchor) become one number.

A loss that forms per-element losses (`TripletLoss`, `ContrastiveLoss`,
`MultiSimilarityLoss`, `CircleLoss`, `LiftedStructLoss`,
`GeneralizedLiftedStructureLoss`, `TupletMarginLoss`, `IntraPairVarianceLoss`,
`SignalToNoiseRatioContrastiveLoss`, `AngularLoss`, `MarginLoss`) takes
`reducer=`; left None, each keeps its documented reduction. A reducer is
called on a tensor of losses whose first axis is the anchor (`(B,)` per
anchor, `(B, R)` per pair, `(B, R, R)` per triplet), a boolean mask of the
same shape saying which entries exist, and the anchors' labels. `reduce`
returns `(total, count)`, so that a loss can sum both over `tf.distribute`
replicas before dividing (`References.mean`); calling a reducer returns
`total / max(count, 1)`, and 0 when nothing is selected.

As in pytorch-metric-learning, a loss with several parts (contrastive:
positive and negative pairs) reduces each part with the reducer and adds
them.

Example:

>>> import numpy as np
>>> from keras_dml.reducers import AvgNonZeroReducer, MeanReducer
>>> losses = np.array([0.0, 1.0, 3.0], "float32")
>>> mask = np.array([True, True, True])
>>> float(MeanReducer()(losses, mask)), float(AvgNonZeroReducer()(losses, mask))
(1.3333333730697632, 2.0)
"""

from __future__ import annotations

import keras
from keras import ops

from keras_dml import ops as dml_ops
from keras_dml._checks import is_number
from keras_dml._registry import ConfigObject, deserialize_as


class Reducer(ConfigObject):
    """Base class: turns masked per-element losses into `(total, count)`.

    Subclasses implement `reduce(losses, mask, labels)` and `get_config`.
    """

    def reduce(self, losses, mask, labels=None):
        """`(total, count)` of the selected entries; `count` carries no gradient."""
        raise NotImplementedError

    def __call__(self, losses, mask=None, labels=None):
        """The reduced loss: `total / max(count, 1)`.

        Args:
            losses: per-element losses, first axis the anchor.
            mask: bool of the same shape; all True when None.
            labels: `(B,)` int labels of the anchors (for `ClassWeightedReducer`).
        """
        losses = ops.convert_to_tensor(losses)
        mask = ops.ones(ops.shape(losses), "bool") if mask is None else ops.cast(mask, "bool")
        total, count = self.reduce(losses, mask, labels)
        return total / ops.maximum(ops.cast(count, total.dtype), 1.0)


@keras.saving.register_keras_serializable(package="keras_dml")
class MeanReducer(Reducer):
    """The mean over every selected element (zeros included).

    Example:

    >>> import numpy as np
    >>> from keras_dml.reducers import MeanReducer
    >>> float(MeanReducer()(np.array([0.0, 2.0], "float32")))
    1.0
    """

    def reduce(self, losses, mask, labels=None):
        return dml_ops.masked_sum(losses, mask), dml_ops.masked_count(mask, dtype=losses.dtype)


@keras.saving.register_keras_serializable(package="keras_dml")
class ThresholdReducer(Reducer):
    """The mean over the selected elements with `low < loss < high`.

    Args:
        low: elements at or below it are left out (None: no lower bound).
        high: elements at or above it are left out (None: no upper bound).
            At least one of the two must be given.

    Example:

    >>> import numpy as np
    >>> from keras_dml.reducers import ThresholdReducer
    >>> float(ThresholdReducer(low=0.5, high=3.0)(np.array([0.2, 1.0, 2.0, 5.0], "float32")))
    1.5
    """

    def __init__(self, low: float | None = None, high: float | None = None):
        if low is None and high is None:
            raise ValueError("ThresholdReducer needs `low`, `high` or both.")
        for arg, value in (("low", low), ("high", high)):
            if value is not None and not is_number(value):
                raise ValueError(f"`{arg}` must be a number or None, got {value!r}.")
        self.low = None if low is None else float(low)
        self.high = None if high is None else float(high)

    def reduce(self, losses, mask, labels=None):
        keep = ops.cast(mask, "bool")
        if self.low is not None:
            keep = ops.logical_and(keep, losses > self.low)
        if self.high is not None:
            keep = ops.logical_and(keep, losses < self.high)
        keep = ops.stop_gradient(keep)
        return dml_ops.masked_sum(losses, keep), dml_ops.masked_count(keep, dtype=losses.dtype)

    def get_config(self):
        return {"low": self.low, "high": self.high}


@keras.saving.register_keras_serializable(package="keras_dml")
class AvgNonZeroReducer(ThresholdReducer):
    """The mean over the selected elements with a positive loss (0 when there is none).

    The batch-all triplet convention: triplets already satisfied (loss 0)
    do not dilute the mean.

    Example:

    >>> import numpy as np
    >>> from keras_dml.reducers import AvgNonZeroReducer
    >>> float(AvgNonZeroReducer()(np.array([0.0, 0.0, 3.0], "float32")))
    3.0
    """

    def __init__(self):
        super().__init__(low=0.0)

    def get_config(self):
        return {}


@keras.saving.register_keras_serializable(package="keras_dml")
class PerAnchorReducer(Reducer):
    """Averages each anchor's elements first, then reduces the per-anchor values with `reducer`.

    An anchor without any selected element counts as 0 (PML's default
    aggregation), and `reducer` (default `MeanReducer()`) sees every anchor.
    PML supports pairs only; triplet losses are averaged over each anchor's
    (positive, negative) entries here as well. Per-anchor losses `(B,)` go
    to `reducer` as they are (with their mask).

    Args:
        reducer: the reducer applied to the `(B,)` per-anchor means.

    Example:

    >>> import numpy as np
    >>> from keras_dml.reducers import PerAnchorReducer
    >>> losses = np.array([[1.0, 3.0], [4.0, 0.0]], "float32")
    >>> mask = np.array([[True, True], [True, False]])
    >>> float(PerAnchorReducer()(losses, mask))
    3.0
    """

    def __init__(self, reducer: Reducer | dict | None = None):
        self.reducer = MeanReducer() if reducer is None else get(reducer)

    def reduce(self, losses, mask, labels=None):
        mask = ops.cast(mask, "bool")
        axes = tuple(range(1, len(losses.shape)))
        if not axes:
            return self.reducer.reduce(losses, mask, labels)
        total = dml_ops.masked_sum(losses, mask, axis=axes)
        count = dml_ops.masked_count(mask, axis=axes, dtype=losses.dtype)
        per_anchor = total / ops.maximum(count, 1.0)
        return self.reducer.reduce(per_anchor, ops.ones(ops.shape(per_anchor), "bool"), labels)

    def get_config(self):
        return {"reducer": keras.saving.serialize_keras_object(self.reducer)}


@keras.saving.register_keras_serializable(package="keras_dml")
class ClassWeightedReducer(Reducer):
    """The mean of the selected elements, each multiplied by the weight of its anchor's class.

    Args:
        weights: one non-negative weight per class id (`weights[c]` for
            label `c`); labels must lie in `[0, len(weights))`.

    Example:

    >>> import numpy as np
    >>> from keras_dml.reducers import ClassWeightedReducer
    >>> reducer = ClassWeightedReducer([1.0, 3.0])
    >>> float(reducer(np.array([1.0, 1.0], "float32"), labels=np.array([0, 1])))
    2.0
    """

    def __init__(self, weights):
        try:
            weights = [float(w) for w in weights]
        except (TypeError, ValueError):
            raise ValueError(f"`weights` must be a sequence of numbers, got {weights!r}.") from None
        if not weights or any(not w >= 0 for w in weights):
            raise ValueError(f"`weights` must be non-empty and non-negative, got {weights!r}.")
        self.weights = weights

    def reduce(self, losses, mask, labels=None):
        if labels is None:
            raise ValueError("ClassWeightedReducer needs the anchors' `labels`.")
        weights = ops.convert_to_tensor(self.weights, losses.dtype)
        weights = ops.take(weights, ops.cast(labels, "int32"))
        weights = ops.reshape(weights, (-1,) + (1,) * (len(losses.shape) - 1))
        return (
            dml_ops.masked_sum(losses * weights, mask),
            dml_ops.masked_count(mask, dtype=losses.dtype),
        )

    def get_config(self):
        return {"weights": list(self.weights)}


def get(identifier) -> Reducer | None:
    """A `Reducer` from a reducer, its serialized config or None.

    Raises:
        ValueError: for anything else.
    """
    return deserialize_as(
        identifier, Reducer, "reducer", "keras_dml.reducers.Reducer", "AvgNonZeroReducer()"
    )


__all__ = [
    "AvgNonZeroReducer",
    "ClassWeightedReducer",
    "MeanReducer",
    "PerAnchorReducer",
    "Reducer",
    "ThresholdReducer",
    "get",
]
