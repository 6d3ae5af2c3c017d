"""Pair verification ("is this the same person?"): ROC AUC, EER, TAR@FAR and calibrated thresholds.

A verification system compares two inputs and answers "same" when their
embeddings are close enough. Each pair `i` of `(embeddings_a[i],
embeddings_b[i])` gets one score in the units of `distance`:

| `distance` | score | decides "same" when |
| --- | --- | --- |
| `"cosine"` | cosine similarity in [-1, 1] | `score >= threshold` |
| `"dot"` | inner product | `score >= threshold` |
| `"euclidean"` | L2 distance | `score <= threshold` |
| `"squared_euclidean"` | squared L2 distance | `score <= threshold` |
| `"angular"` | `max(1 - cos, 0)` | `score <= threshold` |

Vocabulary of face verification: a false accept is a different-identity
("negative") pair answered "same"; FAR (false accept rate) is the fraction
of negative pairs accepted, the false positive rate of a ROC curve; TAR (true
accept rate) is the fraction of same-identity ("positive") pairs accepted,
its true positive rate. EER (equal error rate) is the rate where FAR equals
the false reject rate 1 - TAR.

A FAR can only be measured in steps of `1 / num_negative`: with fewer than
`1 / far` negative pairs, not a single false accept is allowed, so TAR@FAR
is not measurable. Such entries are NaN, with a warning, and
`calibrate_threshold` refuses them. Even with `1 / far` negative pairs the
estimate rests on a handful of false accepts: aim for `10 / far` or more.

Example:

>>> import numpy as np
>>> from keras_dml.evaluation.verification import verification_metrics
>>> rng = np.random.default_rng(0)
>>> a = rng.normal(size=(2000, 8)).astype("float32")
>>> same = np.arange(2000) % 2 == 0
>>> b = np.where(same[:, None], a + 0.5 * rng.normal(size=a.shape), rng.normal(size=a.shape))
>>> metrics = verification_metrics(a, b, same, far=(1e-2, 1e-3))
>>> metrics["roc_auc"] > 0.99, metrics["num_negative"]
(True, 1000.0)
>>> sorted(metrics)[:4]
['best_accuracy', 'best_threshold', 'eer', 'eer_threshold']
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import numpy as np
from keras import ops

from keras_dml import distances as distances_lib
from keras_dml._numpy_ops import l2_normalize_rows

DEFAULT_FARS = (1e-2, 1e-3, 1e-4)
# Measures a verification score can be expressed in (see the module table).
PAIR_DISTANCES = distances_lib.NAMES


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, (np.ndarray, list, tuple, int, float, np.generic)):
        return np.asarray(x)
    return np.asarray(ops.convert_to_numpy(x))


def _pair_distance_name(distance) -> str:
    name = distances_lib.builtin_name(distance, PAIR_DISTANCES)
    if name is None:
        raise ValueError(
            f"`distance` must be one of {PAIR_DISTANCES} (or an alias), got {distance!r}."
        )
    return name


def higher_is_same(distance) -> bool:
    """Returns whether larger scores of `distance` mean "more alike" (cosine, dot)."""
    return distances_lib.get(_pair_distance_name(distance)).is_similarity


def _as_pair_embeddings(x, arg: str) -> np.ndarray:
    x = _to_numpy(x)
    if x.ndim != 2:
        raise ValueError(f"`{arg}` must be embeddings of shape (pairs, dim), got shape {x.shape}.")
    if x.dtype.kind not in "fiuV":
        raise ValueError(f"`{arg}` must hold real numbers, got dtype {x.dtype}.")
    x = x.astype("float32", copy=False)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"`{arg}` contains NaN or Inf.")
    return x


def pair_scores(embeddings_a, embeddings_b, distance: str = "cosine") -> np.ndarray:
    """Scores each pair `(embeddings_a[i], embeddings_b[i])` in the units of `distance`.

    Only the `P` pairs are scored, never the `P x P` matrix. The formulas are
    those of `keras_dml.distances` (cosine on L2-normalised rows, clipped to
    [-1, 1]) and of the exported verification model, in float32.

    Args:
        embeddings_a: `(P, D)` embeddings of the first member of each pair.
        embeddings_b: `(P, D)` embeddings of the second member.
        distance: one of `"cosine"`, `"dot"`, `"euclidean"`,
            `"squared_euclidean"`, `"angular"` (or an alias such as `"L2"`).

    Returns:
        `(P,)` float32 scores: similarities for cosine and dot, distances
        otherwise.

    Raises:
        ValueError: for mismatched shapes, NaN/Inf or an unknown distance.

    Example:

    >>> import numpy as np
    >>> a = np.array([[3.0, 4.0], [1.0, 0.0]], "float32")
    >>> b = np.array([[0.0, 0.0], [0.0, 2.0]], "float32")
    >>> pair_scores(a, b, "euclidean").tolist()
    [5.0, 2.2360680103302]
    """
    name = _pair_distance_name(distance)
    a = _as_pair_embeddings(embeddings_a, "embeddings_a")
    b = _as_pair_embeddings(embeddings_b, "embeddings_b")
    if a.shape != b.shape:
        raise ValueError(
            f"`embeddings_a` {a.shape} and `embeddings_b` {b.shape} must have the same shape: "
            "row i of each is pair i."
        )
    if name in ("euclidean", "squared_euclidean"):
        # The difference, not |a|^2 + |b|^2 - 2ab: no cancellation for close pairs.
        squared = np.einsum("ij,ij->i", a - b, a - b)
        return (squared if name == "squared_euclidean" else np.sqrt(squared)).astype("float32")
    if name == "dot":
        return np.einsum("ij,ij->i", a, b).astype("float32")
    a, b = l2_normalize_rows(a), l2_normalize_rows(b)
    cosine = np.clip(np.einsum("ij,ij->i", a, b), -1.0, 1.0)
    return (cosine if name == "cosine" else np.maximum(1.0 - cosine, 0.0)).astype("float32")


def _as_same(same, n: int) -> np.ndarray:
    same = _to_numpy(same)
    if same.ndim == 2 and same.shape[1] == 1:
        same = same.reshape(-1)
    if same.ndim != 1 or same.shape[0] != n:
        raise ValueError(f"`same` must have shape ({n},), one flag per pair, got {same.shape}.")
    if same.dtype != bool:
        if same.dtype.kind not in "iuf" or not np.all(np.isin(same, (0, 1))):
            raise ValueError("`same` must hold booleans or 0/1 values.")
        same = same.astype(bool)
    return same


def _as_fars(far) -> tuple[float, ...]:
    fars = (far,) if isinstance(far, (int, float, np.floating)) else tuple(far)
    if not fars or any(isinstance(v, bool) or not 0.0 < float(v) < 1.0 for v in fars):
        raise ValueError(f"`far` values must lie in (0, 1), got {far!r}.")
    return tuple(float(v) for v in fars)


def _scores_and_labels(embeddings_a, embeddings_b, same, scores, distance):
    """Validates either form of input; returns `(scores, same, higher_is_same)`."""
    name = _pair_distance_name(distance)
    if scores is not None:
        if embeddings_a is not None or embeddings_b is not None:
            raise ValueError("Pass either `scores` or `embeddings_a`/`embeddings_b`, not both.")
        scores = _to_numpy(scores)
        if scores.ndim == 2 and scores.shape[1] == 1:
            scores = scores.reshape(-1)
        if scores.ndim != 1 or scores.dtype.kind not in "fiu":
            raise ValueError(
                f"`scores` must be real numbers of shape (pairs,), got shape {scores.shape}."
            )
        scores = scores.astype("float64")
        if not np.all(np.isfinite(scores)):
            raise ValueError("`scores` contains NaN or Inf.")
    else:
        if embeddings_a is None or embeddings_b is None:
            raise ValueError("Pass `embeddings_a` and `embeddings_b` (or `scores=`).")
        scores = pair_scores(embeddings_a, embeddings_b, name).astype("float64")
    if same is None:
        raise ValueError("`same` (one boolean per pair) is required.")
    same = _as_same(same, len(scores))
    if len(scores) == 0:
        raise ValueError("No pairs given.")
    return scores, same, distances_lib.get(name).is_similarity


def _roc(similarities: np.ndarray, same: np.ndarray):
    """ROC points over every distinct similarity, highest threshold first.

    The first point is `(0, 0)` at threshold +inf (nothing accepted), as in
    scikit-learn's `roc_curve(..., drop_intermediate=False)`; accepting means
    `similarity >= threshold`, so tied scores enter together.

    Returns:
        `(false_accepts, true_accepts, thresholds)`: counts and thresholds,
        each of length (distinct scores + 1).
    """
    order = np.argsort(-similarities, kind="stable")
    sorted_scores = similarities[order]
    sorted_same = same[order]
    # The last index of each run of equal scores is an operating point.
    last_of_run = np.flatnonzero(np.r_[np.diff(sorted_scores) != 0, True])
    true_accepts = np.cumsum(sorted_same)[last_of_run]
    false_accepts = (last_of_run + 1) - true_accepts
    thresholds = np.r_[np.inf, sorted_scores[last_of_run]]
    return np.r_[0, false_accepts], np.r_[0, true_accepts], thresholds


def _auc(similarities: np.ndarray, same: np.ndarray) -> float:
    """Probability that a positive pair outscores a negative one, ties counting half.

    This Mann-Whitney form equals the trapezoidal area under the ROC curve
    that scikit-learn's `roc_auc_score` computes.
    """
    n_pos = int(same.sum())
    n_neg = len(same) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Average ranks of tied scores (1-based), the textbook tie correction.
    order = np.argsort(similarities, kind="stable")
    sorted_scores = similarities[order]
    starts = np.flatnonzero(np.r_[True, np.diff(sorted_scores) != 0])
    ends = np.r_[starts[1:], len(sorted_scores)]
    run_ranks = (starts + ends + 1) / 2.0
    ranks = np.empty(len(similarities))
    ranks[order] = np.repeat(run_ranks, ends - starts)
    return float((ranks[same].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _far_key(far: float) -> str:
    return f"{far:g}"


def verification_roc(
    embeddings_a=None,
    embeddings_b=None,
    same=None,
    distance: str = "cosine",
    *,
    scores=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns the ROC curve `(far, tar, thresholds)` of a set of verification pairs.

    One point per distinct score plus the starting point `(0, 0)` where
    nothing is accepted (threshold `+inf` for similarities, `-inf` for
    distances). For similarities this is scikit-learn's
    `roc_curve(same, scores, drop_intermediate=False)`; for distances the
    thresholds are in distance units.

    Args:
        embeddings_a: `(P, D)` first members of the pairs.
        embeddings_b: `(P, D)` second members.
        same: `(P,)` booleans (or 0/1), True for same-identity pairs.
        distance: the measure of the module table; with `scores`, the units
            the scores are in.
        scores: `(P,)` precomputed scores, instead of embeddings.

    Returns:
        `(far, tar, thresholds)`, float64 arrays of equal length, FAR
        ascending. `tar` is NaN without positive pairs, `far` without
        negative pairs.

    Example:

    >>> far, tar, thresholds = verification_roc(scores=[0.9, 0.8, 0.3], same=[1, 0, 0])
    >>> far.tolist(), tar.tolist(), thresholds.tolist()
    ([0.0, 0.0, 0.5, 1.0], [0.0, 1.0, 1.0, 1.0], [inf, 0.9, 0.8, 0.3])
    """
    scores, same, similar = _scores_and_labels(embeddings_a, embeddings_b, same, scores, distance)
    false_accepts, true_accepts, thresholds = _roc(scores if similar else -scores, same)
    n_pos = int(same.sum())
    n_neg = len(same) - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        far = false_accepts / n_neg if n_neg else np.full(len(thresholds), np.nan)
        tar = true_accepts / n_pos if n_pos else np.full(len(thresholds), np.nan)
    return far, tar, thresholds if similar else -thresholds


def _equal_error_rate(far: np.ndarray, frr: np.ndarray) -> tuple[float, int]:
    """EER where the piecewise-linear FAR and FRR curves cross; and the nearest point.

    Along the ROC curve `far - frr` never decreases, from -1 to 1; the EER is
    read off the segment where it changes sign, by linear interpolation (the
    same point as the usual `brentq(lambda x: 1 - x - interp(x, fpr, tpr))`).
    """
    gap = far - frr
    i = int(np.argmax(gap >= 0))
    if gap[i] == 0 or i == 0:
        return float(far[i]), i
    w = -gap[i - 1] / (gap[i] - gap[i - 1])
    eer = float(far[i - 1] + w * (far[i] - far[i - 1]))
    # Report the threshold of the closer operating point; the +inf one never.
    nearest = i - 1 if (i - 1 > 0 and abs(gap[i - 1]) < abs(gap[i])) else i
    return eer, nearest


def verification_metrics(
    embeddings_a=None,
    embeddings_b=None,
    same=None,
    distance: str = "cosine",
    *,
    scores=None,
    far: float | Sequence[float] = DEFAULT_FARS,
) -> dict[str, float]:
    """Scores a verifier on labelled pairs: ROC AUC, EER, TAR@FAR and the best accuracy.

    Pair `i` is `(embeddings_a[i], embeddings_b[i])` with `same[i]` telling
    whether both show the same identity. Every distinct score is tried as a
    threshold (see the module table for which side is "same").

    - `roc_auc`: area under the ROC curve, equal to scikit-learn's
      `roc_auc_score(same, similarity)` (ties count half).
    - `eer`: where FAR = FRR on the piecewise-linear ROC curve;
      `eer_threshold` is the threshold of the operating point nearest it.
    - `tar_at_far_{far}` (e.g. `tar_at_far_0.001`): the largest TAR of an
      operating point whose measured FAR is at most `far`, and
      `threshold_at_far_{far}` its threshold. NaN, with a warning, when there
      are fewer than `1 / far` negative pairs (the FAR cannot be measured).
    - `best_accuracy`: the largest fraction of pairs answered right, and
      `best_threshold` its threshold (the strictest one, if several tie).
    - `num_positive`, `num_negative`: the pair counts, as floats.

    Args:
        embeddings_a: `(P, D)` first members of the pairs (NumPy or tensor).
        embeddings_b: `(P, D)` second members.
        same: `(P,)` booleans or 0/1 flags, True for same-identity pairs.
        distance: `"cosine"` (default), `"dot"`, `"euclidean"`,
            `"squared_euclidean"` or `"angular"`; with `scores`, the units of
            the scores (pass `"dot"` for any score where larger means alike).
        scores: `(P,)` precomputed pair scores, instead of embeddings.
        far: the false accept rates of the TAR@FAR entries.

    Returns:
        A dict of Python floats. Thresholds are in the units of `distance`.
        Without positive or without negative pairs, every entry that needs
        them is NaN.

    Raises:
        ValueError: for mismatched shapes, NaN/Inf, flags other than 0/1, an
            unknown distance or a `far` outside (0, 1).

    Example:

    ```python
    embed = siamese.embedding_model()
    metrics = verification_metrics(embed.predict(x_a), embed.predict(x_b), same)
    print(f"AUC {metrics['roc_auc']:.4f}  EER {metrics['eer']:.4f}  "
          f"TAR@FAR=1e-3 {metrics['tar_at_far_0.001']:.4f}")
    ```

    Reference:
        Huang et al., "Labeled Faces in the Wild", 2007 (pair protocol);
        Grother et al., NIST FRVT reports (TAR at fixed FAR).
    """
    fars = _as_fars(far)
    scores, same, similar = _scores_and_labels(embeddings_a, embeddings_b, same, scores, distance)
    sign = 1.0 if similar else -1.0
    false_accepts, true_accepts, thresholds = _roc(sign * scores, same)
    n_pos = int(same.sum())
    n_neg = len(same) - n_pos
    nan = float("nan")
    metrics = {"roc_auc": _auc(sign * scores, same)}

    if n_pos and n_neg:
        far_curve = false_accepts / n_neg
        tar_curve = true_accepts / n_pos
        eer, nearest = _equal_error_rate(far_curve, 1.0 - tar_curve)
        metrics["eer"] = eer
        metrics["eer_threshold"] = float(sign * thresholds[nearest])
    else:
        far_curve = tar_curve = None
        metrics["eer"] = metrics["eer_threshold"] = nan

    unresolved = []
    for value in fars:
        key = _far_key(value)
        if far_curve is None or n_neg * value < 1.0:
            if far_curve is not None:
                unresolved.append(value)
            metrics[f"tar_at_far_{key}"] = metrics[f"threshold_at_far_{key}"] = nan
            continue
        # FAR grows along the curve: the last point within `value` has the best TAR.
        i = int(np.searchsorted(far_curve, value * (1.0 + 1e-12), side="right")) - 1
        metrics[f"tar_at_far_{key}"] = float(tar_curve[i])
        metrics[f"threshold_at_far_{key}"] = float(sign * thresholds[i])
    if unresolved:
        needed = ", ".join(f"FAR={v:g} needs {math.ceil(1.0 / v - 1e-9):,}" for v in unresolved)
        warnings.warn(
            f"Too few negative pairs ({n_neg:,}) to measure TAR at every FAR: {needed} negative "
            "pairs; those entries are NaN.",
            stacklevel=2,
        )

    # Accuracy at each operating point: accepted positives + rejected negatives.
    correct = true_accepts + (n_neg - false_accepts)
    best = int(np.argmax(correct))
    metrics["best_accuracy"] = float(correct[best] / len(same))
    metrics["best_threshold"] = float(sign * thresholds[best])
    metrics["num_positive"] = float(n_pos)
    metrics["num_negative"] = float(n_neg)
    return metrics


@dataclasses.dataclass(frozen=True)
class ThresholdCalibration:
    """A decision threshold calibrated for a target false accept rate on validation pairs.

    Pass it to `keras_dml.export.export_verification_model(model, path,
    calibration)` to serve "same / not same" answers at this threshold.

    Attributes:
        threshold: the threshold in the units of `distance`.
        far: the target false accept rate.
        distance: the measure the threshold is in.
        higher_is_same: True for similarities (accept `score >= threshold`),
            False for distances (accept `score <= threshold`).
        measured_far: the false accept rate on the validation pairs.
        tar: the true accept rate on the validation pairs (NaN without
            positive pairs).
        num_positive: validation positive pairs.
        num_negative: validation negative pairs.
    """

    threshold: float
    far: float
    distance: str
    higher_is_same: bool
    measured_far: float
    tar: float
    num_positive: int
    num_negative: int

    def is_same(self, scores) -> np.ndarray:
        """Applies the threshold: True where a pair's score means "same"."""
        scores = np.asarray(scores)
        return scores >= self.threshold if self.higher_is_same else scores <= self.threshold

    def to_dict(self) -> dict:
        """The fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


def calibrate_threshold(
    embeddings_a=None,
    embeddings_b=None,
    same=None,
    distance: str = "cosine",
    *,
    scores=None,
    far: float = 1e-3,
) -> ThresholdCalibration:
    """Picks the threshold that accepts the most same pairs while keeping FAR at most `far`.

    Among all thresholds at distinct validation scores, it returns the one
    whose measured FAR is at most `far` with the largest TAR (the most
    permissive such threshold). Only negative pairs decide the threshold;
    positive pairs, when present, give the expected TAR. Calibrate on pairs
    that the model was not trained on, as many negative pairs as you can:
    the FAR is measured in steps of `1 / num_negative`.

    Args:
        embeddings_a: `(P, D)` first members of the validation pairs.
        embeddings_b: `(P, D)` second members.
        same: `(P,)` booleans or 0/1 flags, True for same-identity pairs.
        distance: the measure of the module table (`"cosine"` by default);
            with `scores`, the units of the scores.
        scores: `(P,)` precomputed pair scores, instead of embeddings.
        far: the target false accept rate, in (0, 1).

    Returns:
        A `ThresholdCalibration`.

    Raises:
        ValueError: for bad inputs, no negative pair, fewer than `1 / far`
            negative pairs (the FAR cannot be measured), or when the highest
            scoring negative pairs tie so that no finite threshold keeps the
            FAR within `far`.

    Example:

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> negatives, positives = rng.normal(0.0, 0.1, 5000), rng.normal(0.7, 0.1, 500)
    >>> calibration = calibrate_threshold(
    ...     scores=np.r_[negatives, positives], same=np.r_[np.zeros(5000), np.ones(500)],
    ...     far=1e-3)
    >>> calibration.measured_far <= 1e-3, round(calibration.threshold, 2)
    (True, 0.29)

    Reference:
        ISO/IEC 19795-1, biometric performance testing (FAR/FRR operating points).
    """
    (value,) = _as_fars(far)
    scores, same, similar = _scores_and_labels(embeddings_a, embeddings_b, same, scores, distance)
    n_pos = int(same.sum())
    n_neg = len(same) - n_pos
    if n_neg == 0:
        raise ValueError("Calibrating a false accept rate needs negative (different) pairs.")
    if n_neg * value < 1.0:
        raise ValueError(
            f"FAR={value:g} cannot be measured on {n_neg:,} negative pairs: at least "
            f"{math.ceil(1.0 / value - 1e-9):,} are needed (10x that for a stable estimate)."
        )
    sign = 1.0 if similar else -1.0
    false_accepts, true_accepts, thresholds = _roc(sign * scores, same)
    far_curve = false_accepts / n_neg
    i = int(np.searchsorted(far_curve, value * (1.0 + 1e-12), side="right")) - 1
    if i == 0:
        raise ValueError(
            f"The {int(false_accepts[1])} highest-scoring negative pairs tie, so no finite "
            f"threshold keeps the FAR within {value:g}."
        )
    name = _pair_distance_name(distance)
    return ThresholdCalibration(
        threshold=float(sign * thresholds[i]),
        far=value,
        distance=name,
        higher_is_same=similar,
        measured_far=float(far_curve[i]),
        tar=float(true_accepts[i] / n_pos) if n_pos else float("nan"),
        num_positive=n_pos,
        num_negative=n_neg,
    )
