"""Tests for keras_dml.evaluation.verification: scikit-learn's ROC and naive loops as references."""

from __future__ import annotations

import doctest
import math
import warnings

import numpy as np
import pytest
from keras import ops
from scipy.optimize import brentq
from sklearn.metrics import roc_auc_score, roc_curve

from keras_dml.evaluation.verification import (
    ThresholdCalibration,
    calibrate_threshold,
    pair_scores,
    verification_metrics,
    verification_roc,
)

# ------------------------------------------------------------ naive references


def naive_operating_points(similarities, same):
    """(threshold, FAR, TAR, accuracy) for every candidate threshold, counted afresh for each."""
    points = [(math.inf, 0.0, 0.0, float(np.mean(~same)))]
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    for t in sorted(set(similarities.tolist()), reverse=True):
        accepted = similarities >= t
        false_accepts = int(np.sum(accepted & ~same))
        true_accepts = int(np.sum(accepted & same))
        correct = int(np.sum(accepted == same))
        points.append((t, false_accepts / n_neg, true_accepts / n_pos, correct / len(same)))
    return points


def naive_tar_at_far(points, far):
    return max(tar for _, f, tar, _ in points if f <= far + 1e-15)


def naive_eer(points):
    """FAR = FRR crossing on the straight segments between consecutive operating points."""
    for (_, f0, t0, _), (_, f1, t1, _) in zip(points, points[1:], strict=False):
        g0, g1 = f0 - (1 - t0), f1 - (1 - t1)
        if g0 < 0 <= g1:
            return f0 + (-g0 / (g1 - g0)) * (f1 - f0)
    raise AssertionError("no crossing")


def sklearn_eer(same, similarities):
    fpr, tpr, _ = roc_curve(same, similarities, drop_intermediate=False)
    return brentq(lambda x: 1.0 - x - np.interp(x, fpr, tpr), 0.0, 1.0, xtol=1e-12)


@pytest.fixture
def pairs(rng):
    """2,600 pairs: 600 same (similarity ~0.6) and 2,000 different (~0.1)."""
    same = np.r_[np.ones(600, bool), np.zeros(2000, bool)]
    scores = np.where(same, rng.normal(0.6, 0.2, len(same)), rng.normal(0.1, 0.2, len(same)))
    order = rng.permutation(len(same))
    return scores[order], same[order]


# -------------------------------------------------------- agreement with sklearn


@pytest.mark.parametrize("decimals", [None, 1])
def test_roc_auc_matches_sklearn(pairs, decimals):
    scores, same = pairs
    if decimals is not None:
        scores = np.round(scores, decimals)  # many ties
    metrics = verification_metrics(scores=scores, same=same, far=1e-2)
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(same, scores), abs=1e-12)
    # As distances (smaller = same) the AUC is the same number.
    metrics = verification_metrics(scores=-scores, same=same, distance="euclidean", far=1e-2)
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(same, scores), abs=1e-12)


@pytest.mark.parametrize("decimals", [None, 1])
def test_roc_curve_matches_sklearn(pairs, decimals):
    scores, same = pairs
    if decimals is not None:
        scores = np.round(scores, decimals)
    expected_far, expected_tar, expected_thresholds = roc_curve(
        same, scores, drop_intermediate=False
    )
    far, tar, thresholds = verification_roc(scores=scores, same=same)
    np.testing.assert_allclose(far, expected_far, atol=1e-12)
    np.testing.assert_allclose(tar, expected_tar, atol=1e-12)
    np.testing.assert_allclose(thresholds, expected_thresholds)
    # Distances: the same curve, thresholds in distance units.
    far, tar, thresholds = verification_roc(scores=1.0 - scores, same=same, distance="angular")
    np.testing.assert_allclose(far, expected_far, atol=1e-12)
    np.testing.assert_allclose(tar, expected_tar, atol=1e-12)
    np.testing.assert_allclose(thresholds[1:], 1.0 - expected_thresholds[1:], atol=1e-12)
    assert thresholds[0] == -np.inf


def test_eer_matches_sklearn_and_naive_loop(pairs):
    scores, same = pairs
    metrics = verification_metrics(scores=scores, same=same, far=1e-2)
    assert metrics["eer"] == pytest.approx(sklearn_eer(same, scores), abs=1e-9)
    points = naive_operating_points(scores, same)
    assert metrics["eer"] == pytest.approx(naive_eer(points), abs=1e-12)
    # The reported threshold is an operating point next to the crossing.
    at = [p for p in points if p[0] == metrics["eer_threshold"]][0]
    assert abs(at[1] - metrics["eer"]) <= 2 / (~same).sum() + 2 / same.sum()


def test_tar_at_far_and_best_accuracy_match_naive_loop(pairs):
    scores, same = pairs
    with pytest.warns(UserWarning, match="FAR=0.0001 needs 10,000"):
        metrics = verification_metrics(scores=scores, same=same)
    points = naive_operating_points(scores, same)
    for far in (1e-2, 1e-3):
        key = f"{far:g}"
        assert metrics[f"tar_at_far_{key}"] == pytest.approx(naive_tar_at_far(points, far))
        threshold = metrics[f"threshold_at_far_{key}"]
        chosen = [p for p in points if p[0] == threshold][0]
        assert chosen[1] <= far and chosen[2] == metrics[f"tar_at_far_{key}"]
    # 2,000 negatives cannot measure a FAR of 1e-4: NaN, not a misleading number.
    assert math.isnan(metrics["tar_at_far_0.0001"])
    assert math.isnan(metrics["threshold_at_far_0.0001"])
    best = max(points, key=lambda p: (p[3], p[0]))
    assert metrics["best_accuracy"] == pytest.approx(best[3])
    assert metrics["best_threshold"] == best[0]
    assert metrics["num_positive"] == 600 and metrics["num_negative"] == 2000


def test_distance_units_give_the_same_operating_points(pairs):
    scores, same = pairs
    as_similarity = verification_metrics(scores=scores, same=same, far=(1e-2, 1e-3))
    as_distance = verification_metrics(
        scores=2.0 - scores, same=same, distance="euclidean", far=(1e-2, 1e-3)
    )
    for key, value in as_similarity.items():
        if "threshold" in key:
            assert as_distance[key] == pytest.approx(2.0 - value)
        else:
            assert as_distance[key] == pytest.approx(value)


# ------------------------------------------------------------ embeddings in


@pytest.mark.parametrize(
    "distance", ["cosine", "dot", "euclidean", "squared_euclidean", "angular"]
)
def test_pair_scores_match_naive_loop(rng, distance):
    a = rng.normal(size=(50, 6)).astype("float32")
    b = rng.normal(size=(50, 6)).astype("float32")
    b[0] = a[0]

    def naive(x, y):
        cos = x @ y / (np.linalg.norm(x) * np.linalg.norm(y))
        return {
            "cosine": cos,
            "dot": x @ y,
            "euclidean": np.linalg.norm(x - y),
            "squared_euclidean": np.sum((x - y) ** 2),
            "angular": max(1 - cos, 0.0),
        }[distance]

    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    expected = [naive(x, y) for x, y in zip(a64, b64, strict=True)]
    np.testing.assert_allclose(pair_scores(a, b, distance), expected, rtol=1e-5, atol=1e-5)


def test_embeddings_and_scores_give_the_same_metrics(rng):
    a = rng.normal(size=(400, 8)).astype("float32")
    same = rng.random(400) < 0.5
    b = np.where(same[:, None], a + 0.8 * rng.normal(size=a.shape), rng.normal(size=a.shape))
    for distance in ("cosine", "L2"):
        from_embeddings = verification_metrics(
            ops.convert_to_tensor(a), ops.convert_to_tensor(b), ops.convert_to_tensor(same),
            distance=distance, far=1e-2,
        )
        from_scores = verification_metrics(
            scores=pair_scores(a, b, distance), same=same.astype(int), distance=distance, far=1e-2
        )
        assert from_embeddings == from_scores
        assert from_embeddings["roc_auc"] > 0.9


def test_degenerate_labels_give_nan_not_errors(pairs):
    scores, _ = pairs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = verification_metrics(scores=scores, same=np.ones(len(scores), bool))
    for key in ("roc_auc", "eer", "tar_at_far_0.01"):
        assert math.isnan(metrics[key])
    assert metrics["best_accuracy"] == 1.0
    metrics = verification_metrics(scores=scores, same=np.zeros(len(scores)), far=1e-2)
    assert math.isnan(metrics["roc_auc"]) and math.isnan(metrics["tar_at_far_0.01"])


def test_input_errors(pairs):
    scores, same = pairs
    with pytest.raises(ValueError, match="0/1"):
        verification_metrics(scores=scores, same=np.full(len(scores), 2))
    with pytest.raises(ValueError, match="one flag per pair"):
        verification_metrics(scores=scores, same=same[:-1])
    with pytest.raises(ValueError, match="either"):
        verification_metrics(np.zeros((3, 2)), np.zeros((3, 2)), [0, 1, 0], scores=[0, 1, 2])
    with pytest.raises(ValueError, match="same shape"):
        pair_scores(np.zeros((3, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="`far`"):
        verification_metrics(scores=scores, same=same, far=0.0)
    with pytest.raises(ValueError, match="NaN"):
        verification_metrics(scores=np.r_[np.nan, scores[1:]], same=same)


# -------------------------------------------------------------- calibration


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_calibrated_threshold_is_the_most_permissive_within_far(pairs, distance):
    scores, same = pairs
    if distance == "euclidean":
        scores = 2.0 - scores  # distances: smaller means same
    calibration = calibrate_threshold(scores=scores, same=same, far=1e-2, distance=distance)
    assert isinstance(calibration, ThresholdCalibration)
    accepted = calibration.is_same(scores)
    n_neg = (~same).sum()
    assert np.mean(accepted[~same]) == calibration.measured_far <= 1e-2
    assert np.mean(accepted[same]) == pytest.approx(calibration.tar)
    # The next threshold in the permissive direction breaks the FAR target.
    looser = np.sort(scores)
    if distance == "cosine":
        next_threshold = looser[looser < calibration.threshold].max()
        false_accepts = np.sum(scores[~same] >= next_threshold)
    else:
        next_threshold = looser[looser > calibration.threshold].min()
        false_accepts = np.sum(scores[~same] <= next_threshold)
    assert false_accepts / n_neg > 1e-2
    key = "tar_at_far_0.01"
    assert calibration.tar == verification_metrics(
        scores=scores, same=same, distance=distance, far=1e-2
    )[key]
    assert calibration.higher_is_same == (distance == "cosine")
    assert calibration.to_dict()["num_negative"] == 2000


def test_calibration_refuses_unmeasurable_far(pairs):
    scores, same = pairs
    with pytest.raises(ValueError, match="at least 10,000"):
        calibrate_threshold(scores=scores, same=same, far=1e-4)
    with pytest.raises(ValueError, match="negative"):
        calibrate_threshold(scores=scores[same], same=same[same], far=1e-2)
    # 300 negatives tied at the top score: no finite threshold accepts < 1% of them.
    tied = np.r_[np.ones(300), np.zeros(700)]
    with pytest.raises(ValueError, match="tie"):
        calibrate_threshold(scores=tied, same=np.zeros(1000, bool), far=1e-2)


def test_docstring_examples_run():
    from keras_dml.evaluation import verification

    assert doctest.testmod(verification).failed == 0
