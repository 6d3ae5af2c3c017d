"""Cross-replica references: masks at an offset, the `References` path, tf.distribute equality.

The first tests are backend-agnostic: the reference path (queries as a slice of
the references) must give the same value and gradient as the default
within-batch path, and `cross_replica` must be a no-op outside
`tf.distribute`. The last test runs `tests/multi_replica_checks.py` with 2
and 4 logical CPU devices (TensorFlow only): loss values and gradients, a
short `fit`, the replica-count scaling and the margin heads under
`MirroredStrategy`, against one device on the concatenated batch.
"""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import loss_gradient
from keras import ops

import keras_dml
from keras_dml import distributed, losses
from keras_dml.losses.base import References, label_masks, self_pair_mask
from keras_dml.losses.ntxent import _nt_xent_from_stacked_views


def np_(x):
    return np.asarray(ops.convert_to_numpy(x))


def test_label_masks_exclude_self_pairs_at_the_query_offset():
    refs = np.array([0, 1, 1, 0, 1], "int32")
    queries = refs[2:4]  # queries are references 2 and 3
    positive, negative = label_masks(queries, refs, query_offset=2)
    assert np_(positive).tolist() == [
        [False, True, False, False, True],
        [True, False, False, False, False],
    ]
    assert np_(negative).tolist() == [
        [True, False, False, True, False],
        [False, True, True, False, True],
    ]
    # Without an offset, queries are other samples: same labels are all positives.
    positive, _ = label_masks(queries, refs)
    assert np_(positive).sum() == 5
    assert np_(self_pair_mask(2, 5, 3)).tolist() == [
        [False, False, False, True, False],
        [False, False, False, False, True],
    ]


def test_default_label_masks_are_unchanged():
    labels = np.array([0, 0, 1], "int32")
    positive, negative = label_masks(labels)
    assert np_(positive).tolist() == [[False, True, False], [True, False, False],
                                      [False, False, False]]
    assert np_(negative).tolist() == [[False, False, True], [False, False, True],
                                      [True, True, False]]


# Every loss function with a `references=` argument, with options that reach each path.
REFERENCE_LOSSES = {
    "triplet_semi_hard": lambda y, x, **kw: losses.triplet_loss(y, x, **kw),
    "triplet_hard_cosine": lambda y, x, **kw: losses.triplet_loss(
        y, x, negative_mining="hard", distance="cosine", **kw
    ),
    "triplet_all": lambda y, x, **kw: losses.triplet_loss(
        y, x, negative_mining="all", distance="squared_euclidean", **kw
    ),
    "triplet_all_soft": lambda y, x, **kw: losses.triplet_loss(
        y, x, negative_mining="all", soft_margin=True, **kw
    ),
    "tfa_semi_hard": lambda y, x, **kw: losses.triplet_semihard_loss(y, x, **kw),
    "tfa_hard": lambda y, x, **kw: losses.triplet_hard_loss(y, x, distance_metric="angular",
                                                           **kw),
    "contrastive": lambda y, x, **kw: losses.contrastive_loss(y, x, neg_margin=2.0, **kw),
    "multi_similarity": lambda y, x, **kw: losses.multi_similarity_loss(y, x, **kw),
    "circle": lambda y, x, **kw: losses.circle_loss(y, x, gamma=32.0, **kw),
    "npairs": lambda y, x, **kw: losses.npairs_loss(y, x, **kw),
    "supcon": lambda y, x, **kw: losses.supcon_loss(y, x, temperature=0.5, **kw),
    "quadruplet": lambda y, x, **kw: losses.quadruplet_loss(y, x, negative_mining="hard", **kw),
    "lifted_struct": lambda y, x, **kw: losses.lifted_struct_loss(y, x, **kw),
    "margin": lambda y, x, **kw: losses.margin_loss(y, x, **kw),
    "nca": lambda y, x, **kw: losses.nca_loss(y, x, **kw),
    "tuplet_margin": lambda y, x, **kw: losses.tuplet_margin_loss(y, x, scale=16.0, **kw),
    "angular": lambda y, x, **kw: losses.angular_loss(y, x, **kw),
    "generalized_lifted_structure": lambda y, x, **kw: (
        losses.generalized_lifted_structure_loss(y, x, **kw)),
    "intra_pair_variance": lambda y, x, **kw: losses.intra_pair_variance_loss(y, x, **kw),
    "snr_contrastive": lambda y, x, **kw: losses.snr_contrastive_loss(y, x, **kw),
    "ranked_list": lambda y, x, **kw: losses.ranked_list_loss(y, x, **kw),
    "threshold_consistent_margin": lambda y, x, **kw: (
        losses.threshold_consistent_margin_loss(y, x, **kw)),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_LOSSES))
def test_the_batch_as_explicit_references_gives_the_same_value_and_gradient(name):
    # The cross-replica code path with one replica: queries are a slice (here all)
    # of separately given references, self-pairs found through `query_offset`;
    # outside tf.distribute the collectives are identities.
    fn = REFERENCE_LOSSES[name]
    rng = np.random.default_rng(1)
    labels = (np.arange(12) % 4).astype("int32")
    x = rng.normal(size=(12, 5)).astype("float32")

    def with_references(v):
        references = References(ops.convert_to_tensor(labels), v, query_offset=0,
                                across_replicas=True)
        return fn(labels, v, references=references)

    value, grad = loss_gradient(lambda v: fn(labels, v), x)
    ref_value, ref_grad = loss_gradient(with_references, x)
    np.testing.assert_allclose(ref_value, value, rtol=1e-5)
    np.testing.assert_allclose(ref_grad, grad, rtol=1e-4, atol=1e-6)
    assert np.abs(grad).max() > 0


def test_references_hold_other_samples_without_an_offset():
    # Two queries against three references that are other samples (a memory):
    # contrastive mean over positive pairs + mean over negative pairs.
    labels = np.array([0, 1], "int32")
    x = np.array([[0.0, 0.0], [0.0, 1.0]], "float32")
    refs = References(np.array([0, 1, 1], "int32"),
                      np.array([[0.0, 0.5], [0.0, 3.0], [0.0, 0.8]], "float32"))
    # positives: (0, r0) d=0.5, (1, r1) d=2, (1, r2) d=0.2 -> mean 0.9;
    # negatives: (0, r1) d=3 -> 0, (0, r2) d=0.8 -> 0.2, (1, r0) d=0.5 -> 0.5 -> mean 0.7/3.
    value = losses.contrastive_loss(labels, x, references=refs)
    np.testing.assert_allclose(float(value), 0.9 + 0.7 / 3, rtol=1e-6)


def test_lifted_struct_needs_rows_of_its_references():
    labels = np.array([0, 0], "int32")
    x = np.array([[0.0, 0.0], [0.0, 1.0]], "float32")
    refs = References(labels, x, query_offset=0)
    with pytest.raises(ValueError, match="per-row values"):
        losses.lifted_struct_loss(labels, x, references=refs)


def test_nt_xent_through_references_equals_nt_xent():
    rng = np.random.default_rng(2)
    views = rng.normal(size=(8, 4)).astype("float32")
    ids = np.tile(np.arange(4, dtype="int32"), 2)
    references = References(ids, views, query_offset=0)
    value = _nt_xent_from_stacked_views(ids, views, temperature=0.5, references=references)
    expected = losses.nt_xent_loss(views[:4], views[4:], temperature=0.5)
    np.testing.assert_allclose(float(value), float(expected), rtol=1e-5)


ALL_LOSSES = [
    keras_dml.TripletLoss(), keras_dml.TripletSemiHardLoss(), keras_dml.TripletHardLoss(),
    keras_dml.ContrastiveLoss(), keras_dml.NPairsLoss(), keras_dml.MultiSimilarityLoss(),
    keras_dml.CircleLoss(), keras_dml.LiftedStructLoss(), keras_dml.NTXentLoss(),
    keras_dml.SupConLoss(), keras_dml.QuadrupletLoss(),
]


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=[type(x).__name__ for x in ALL_LOSSES])
def test_cross_replica_is_on_by_default_and_a_no_op_outside_tf_distribute(loss):
    assert loss.cross_replica is True
    assert loss.get_config()["cross_replica"] is True
    config = dict(loss.get_config(), cross_replica=False)
    local = type(loss).from_config(config)
    assert local.get_config()["cross_replica"] is False
    labels = np.repeat(np.arange(4), 2).astype("int32")
    x = np.random.default_rng(3).normal(size=(8, 4)).astype("float32")
    assert float(loss(labels, x)) == float(local(labels, x))


def test_docstring_examples_run():
    for module in (distributed, losses.base):
        assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0, module


def test_collectives_are_identities_outside_a_multi_replica_context():
    x = np.arange(6, dtype="float32").reshape(3, 2)
    assert distributed.replica_context() is None
    assert distributed.num_replicas_in_sync() == 1
    np.testing.assert_array_equal(np_(distributed.gather(x)), x)
    np.testing.assert_array_equal(np_(distributed.sum_over_replicas(x)), x)
    np.testing.assert_array_equal(np_(distributed.scale_for_replicas(ops.ones(()))), 1.0)
    assert distributed.local_row_offset(3) == 0
    assert losses.base.gather_references(np.zeros(3, "int32"), x) is None


# -- tf.distribute: 2 and 4 logical CPU devices, in a fresh interpreter each ---------

# Every gradient-step head must match one device exactly; AdaCos (scale from the
# batch's median angle), CurricularFace (moving average of the batch's target
# cosine) and CenterLoss (centres moved towards the batch's means) update their
# state from per-replica batch statistics, averaged over the replicas by their
# variables' `aggregation="mean"`: they stay in sync but are not the global update.
EXACT_HEADS = ("CosineHead", "ArcFace", "SubCenterArcFace", "CosFace", "SoftTriple",
               "SphereFace", "ProxyNCA", "ProxyAnchor")


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="tf.distribute is TensorFlow's"
)
@pytest.mark.parametrize("num_replicas", [2, 4])
def test_mirrored_strategy_equals_one_device_on_the_global_batch(num_replicas):
    # Logical devices must be configured before TensorFlow initialises them,
    # which this process has already done: run in a fresh interpreter.
    script = os.path.join(os.path.dirname(__file__), "multi_replica_checks.py")
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, script, str(num_replicas)], capture_output=True, text=True, env=env,
        timeout=500,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULTS "))
    results = json.loads(line[len("RESULTS "):])

    # The loss checks run on 4 (unequal) replicas; the 2-replica run checks the scaling
    # of plain Keras losses and the heads (multi_replica_checks.py).
    expected_losses = set() if num_replicas == 2 else {
        "triplet_semi_hard", "triplet_hard_cosine", "triplet_all_soft",
        "triplet_all_hard_positive", "tfa_semi_hard", "tfa_hard_angular", "contrastive",
        "multi_similarity", "circle", "lifted_struct", "npairs", "supcon", "nt_xent",
        "quadruplet",
    }
    assert set(results.get("losses", {})) == expected_losses
    for name, r in results.get("losses", {}).items():
        # Each replica returns the global loss / N; the summed gradients are the
        # single-device gradient on the concatenated batch.
        assert r["value"] > 0 and r["grad_norm"] > 0, (name, r)
        assert r["value_error"] < 1e-5, (name, r)
        assert r["grad_error"] < 1e-5, (name, r)

    for name, r in results["fit"].items():
        assert r["moved"] > 1e-3, (name, r)  # training did change the weights
        assert r["weight_error"] < 1e-5, (name, r)
        np.testing.assert_allclose(r["loss"], r["reference_loss"], rtol=1e-5)

    if num_replicas == 2:
        # Keras leaves a scalar loss undivided (twice the step on 2 replicas);
        # keras-dml's MetricLoss divides it, like Keras's own mean losses.
        plain = results["scaling"]["plain_keras_scalar_loss"]
        np.testing.assert_allclose(plain["step_ratio"], 2.0, rtol=1e-5)
        np.testing.assert_allclose(plain["logged_loss_ratio"], 2.0, rtol=1e-5)
        ours = results["scaling"]["metric_loss"]
        np.testing.assert_allclose(ours["step_ratio"], 1.0, rtol=1e-5)
        np.testing.assert_allclose(ours["logged_loss_ratio"], 1.0, rtol=1e-5)

        assert len(results["heads"]) == 11
        for name, r in results["heads"].items():
            assert r["finite"], (name, r)
            assert r["replica_spread"] == 0.0, (name, r)  # centres in sync
            if name in EXACT_HEADS:
                assert r["weight_error"] < 1e-4, (name, r)
