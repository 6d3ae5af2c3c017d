"""Losses with `miner=`: same value and gradient as pytorch-metric-learning 2.9's loss + miner.

Each case runs PML's miner and loss (torch, float64, autograd) and ours
(TensorFlow, float64, GradientTape) on the same embeddings and labels.
Also: the losses' config round-trip with a miner, reducer and regularizer,
`fit`/save/load, and the errors for combinations that make no sense.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_dml import losses, miners, reducers, regularizers

torch = pytest.importorskip("torch")
pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="PML parity runs under the TF backend"
)


def batch(seed=0, n=12, dim=5, classes=3, scale=1.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n).astype("int32")
    return labels, (scale * rng.normal(size=(n, dim))).astype("float64")


def ours(loss, labels, x):
    loss = type(loss).from_config({**loss.get_config(), "dtype": "float64"})
    var = tf.Variable(x)
    with tf.GradientTape() as tape:
        value = loss(labels, var)
    grad = tape.gradient(value, var)
    return float(value), np.zeros_like(x) if grad is None else grad.numpy()


def pml(loss, miner, labels, x):
    emb = torch.tensor(x, requires_grad=True)
    lab = torch.tensor(labels.astype("int64"))
    indices = None if miner is None else miner(emb, lab)
    value = loss(emb, lab, indices)
    if value.requires_grad:
        value.backward()
        grad = emb.grad.numpy()
    else:
        grad = np.zeros_like(x)
    return float(value.detach()), grad


def euclid():
    return pml_distances.LpDistance(normalize_embeddings=False)


def check(our_loss, pml_loss, pml_miner, seeds=(0, 1, 2), scale=1.0, rtol=1e-5, nonzero_cases=2):
    nonzero = 0
    for seed in seeds:
        labels, x = batch(seed, scale=scale)
        value, grad = ours(our_loss, labels, x)
        want_value, want_grad = pml(pml_loss, pml_miner, labels, x)
        np.testing.assert_allclose(value, want_value, rtol=rtol, atol=1e-9)
        np.testing.assert_allclose(grad, want_grad, rtol=rtol, atol=1e-9)
        nonzero += value != 0
    assert nonzero >= nonzero_cases  # the cases test something


@pytest.mark.parametrize("kind", ["all", "hard", "semihard", "easy"])
@pytest.mark.parametrize("soft", [False, True])
def test_triplet_loss_with_triplet_margin_miner(kind, soft):
    margin = 0.5
    our_loss = losses.TripletLoss(
        margin=margin, soft_margin=soft, miner=miners.TripletMarginMiner(margin, kind)
    )
    if soft:
        # PML's smooth loss is softplus(d_ap - d_an + margin); ours is Hermans' softplus(d_ap -
        # d_an) (margin unused): compare ours with PML at margin 0 for the loss.
        pml_loss = pml_losses.TripletMarginLoss(margin=0.0, smooth_loss=True, distance=euclid())
    else:
        pml_loss = pml_losses.TripletMarginLoss(margin=margin, distance=euclid())
    # Easy triplets satisfy the margin: their hinge is 0 (the softplus is not).
    check(
        our_loss,
        pml_loss,
        pml_miners.TripletMarginMiner(margin, kind, distance=euclid()),
        nonzero_cases=0 if kind == "easy" and not soft else 2,
    )


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_triplet_loss_with_batch_hard_miner(distance):
    pml_distance = euclid() if distance == "euclidean" else pml_distances.CosineSimilarity()
    our_loss = losses.TripletLoss(
        margin=0.3, distance=distance, miner=miners.BatchHardMiner(distance=distance)
    )
    pml_loss = pml_losses.TripletMarginLoss(margin=0.3, distance=pml_distance)
    if distance == "cosine":
        # PML's triplet margin on a similarity is s_an - s_ap; ours uses the distance
        # 1 - cos, whose differences are the same: same loss.
        pass
    check(our_loss, pml_loss, pml_miners.BatchHardMiner(distance=pml_distance))


def test_soft_margin_triplet_loss_with_a_pair_miner():
    # The pair-miner path (batch-all on the mined masks) with the softplus term.
    our_loss = losses.TripletLoss(soft_margin=True, miner=miners.PairMarginMiner(1.0, 2.5))
    pml_loss = pml_losses.TripletMarginLoss(margin=0.0, smooth_loss=True, distance=euclid())
    check(our_loss, pml_loss, pml_miners.PairMarginMiner(1.0, 2.5, distance=euclid()))


def test_triplet_loss_with_a_pair_miner_forms_every_anchor_triplet():
    # A pair miner's positives and negatives of an anchor are combined, as PML's
    # convert_to_triplets does for a 4-tuple.
    our_loss = losses.TripletLoss(margin=0.2, miner=miners.PairMarginMiner(1.0, 2.5))
    pml_loss = pml_losses.TripletMarginLoss(margin=0.2, distance=euclid())
    check(our_loss, pml_loss, pml_miners.PairMarginMiner(1.0, 2.5, distance=euclid()))


@pytest.mark.parametrize(
    "miner_pair",
    [
        (miners.PairMarginMiner(1.0, 2.5),
         lambda: pml_miners.PairMarginMiner(1.0, 2.5, distance=euclid())),
        (miners.MultiSimilarityMiner(0.5, distance="euclidean"),
         lambda: pml_miners.MultiSimilarityMiner(0.5, distance=euclid())),
        (miners.BatchEasyHardMiner("hard", "all"),
         lambda: pml_miners.BatchEasyHardMiner("hard", "all", distance=euclid())),
    ],
    ids=["pair-margin", "multi-similarity", "batch-easy-hard"],
)
def test_contrastive_loss_with_pair_miners(miner_pair):
    our_miner, pml_miner = miner_pair
    our_loss = losses.ContrastiveLoss(
        pos_margin=0.3, neg_margin=2.0, miner=our_miner, reducer=reducers.AvgNonZeroReducer()
    )
    pml_loss = pml_losses.ContrastiveLoss(pos_margin=0.3, neg_margin=2.0, distance=euclid())
    check(our_loss, pml_loss, pml_miner())


def test_contrastive_loss_with_a_triplet_miner_counts_each_pair_once():
    # PML repeats an (a, p) pair once per mined triplet; a mask holds it once. With
    # MeanReducer the two differ; with BatchHardMiner (one triplet per anchor) they agree.
    our_loss = losses.ContrastiveLoss(
        neg_margin=2.0, miner=miners.BatchHardMiner(), reducer=reducers.MeanReducer()
    )
    pml_loss = pml_losses.ContrastiveLoss(
        neg_margin=2.0, distance=euclid(), reducer=pml_reducers.MeanReducer()
    )
    check(our_loss, pml_loss, pml_miners.BatchHardMiner(distance=euclid()))
    labels, x = batch(3)
    many = losses.ContrastiveLoss(
        neg_margin=2.0, miner=miners.TripletMarginMiner(1.0), reducer=reducers.MeanReducer()
    )
    theirs = pml(pml_loss, pml_miners.TripletMarginMiner(1.0, distance=euclid()), labels, x)[0]
    assert not np.isclose(ours(many, labels, x)[0], theirs)


@pytest.mark.parametrize("epsilon", [0.1, 0.5])
def test_multi_similarity_loss_with_multi_similarity_miner(epsilon):
    our_loss = losses.MultiSimilarityLoss(
        alpha=2.0, beta=10.0, base=0.5, miner=miners.MultiSimilarityMiner(epsilon)
    )
    pml_loss = pml_losses.MultiSimilarityLoss(alpha=2.0, beta=10.0, base=0.5)
    check(our_loss, pml_loss, pml_miners.MultiSimilarityMiner(epsilon))


def test_multi_similarity_miner_object_differs_from_built_in_mining_only_at_one_sided_anchors():
    # Built-in mining (the authors' code) drops an anchor whose mined positives or
    # negatives are empty; with a miner, as in PML, each term counts on its own.
    labels, x = batch(4, classes=2)
    built_in = losses.MultiSimilarityLoss(beta=10.0, epsilon=0.1)
    with_miner = losses.MultiSimilarityLoss(beta=10.0, miner=miners.MultiSimilarityMiner(0.1))
    positive, negative = miners.MultiSimilarityMiner(0.1)(labels, x).pairs()
    one_sided = np.asarray(positive).any(1) != np.asarray(negative).any(1)
    if one_sided.any():
        assert float(with_miner(labels, x)) > float(built_in(labels, x))
    else:
        np.testing.assert_allclose(float(with_miner(labels, x)), float(built_in(labels, x)))


def test_circle_loss_with_pair_margin_miner():
    our_loss = losses.CircleLoss(
        margin=0.4, gamma=80.0, miner=miners.PairMarginMiner(0.6, 0.0, distance="cosine")
    )
    pml_loss = pml_losses.CircleLoss(m=0.4, gamma=80)
    pml_miner = pml_miners.PairMarginMiner(0.6, 0.0, distance=pml_distances.CosineSimilarity())
    check(our_loss, pml_loss, pml_miner)


def test_no_miner_and_the_default_reducer_keep_the_values():
    labels, x = batch(5)
    for loss, same in [
        (losses.TripletLoss(), losses.TripletLoss(reducer=reducers.MeanReducer())),
        (losses.TripletLoss(negative_mining="hard"),
         losses.TripletLoss(negative_mining="hard", reducer=reducers.MeanReducer())),
        (losses.TripletLoss(negative_mining="all"),
         losses.TripletLoss(negative_mining="all", reducer=reducers.AvgNonZeroReducer())),
        (losses.ContrastiveLoss(), losses.ContrastiveLoss(reducer=reducers.MeanReducer())),
        (losses.MultiSimilarityLoss(), losses.MultiSimilarityLoss(reducer=reducers.MeanReducer())),
        (losses.CircleLoss(), losses.CircleLoss(reducer=reducers.MeanReducer())),
    ]:
        (value, grad), (same_value, same_grad) = ours(loss, labels, x), ours(same, labels, x)
        np.testing.assert_allclose(value, same_value, rtol=1e-12)
        np.testing.assert_allclose(grad, same_grad, rtol=1e-12, atol=1e-15)


def test_miner_with_string_modes_raises():
    with pytest.raises(ValueError, match="negative_mining"):
        losses.TripletLoss(negative_mining="hard", miner=miners.BatchHardMiner())
    with pytest.raises(ValueError, match="miner"):
        losses.ContrastiveLoss(miner="batch-hard")
    with pytest.raises(ValueError, match="reducer"):
        losses.ContrastiveLoss(reducer="mean")


LOSSES_WITH_OBJECTS = [
    losses.TripletLoss(
        miner=miners.TripletMarginMiner(0.2, "semihard"),
        reducer=reducers.ThresholdReducer(low=0.0, high=5.0),
        embedding_regularizer=regularizers.LpRegularizer(weight=0.01),
    ),
    losses.ContrastiveLoss(
        miner=miners.BatchHardMiner(),
        reducer=reducers.PerAnchorReducer(reducers.AvgNonZeroReducer()),
    ),
    losses.MultiSimilarityLoss(
        miner=miners.MultiSimilarityMiner(0.2), reducer=reducers.ClassWeightedReducer([1.0] * 16)
    ),
    losses.CircleLoss(
        miner=miners.HDCMiner(0.5, distance="cosine"),
        embedding_regularizer=regularizers.SphericalEmbeddingRegularizer(weight=0.1),
    ),
    losses.TripletLoss(miner=miners.DistanceWeightedMiner(seed=0)),
]
IDS = ["triplet", "contrastive", "multi-similarity", "circle", "triplet-distance-weighted"]


@pytest.mark.parametrize("loss", LOSSES_WITH_OBJECTS, ids=IDS)
def test_config_round_trip_with_miner_reducer_regularizer(loss):
    config = loss.get_config()
    clone = type(loss).from_config(config)
    assert clone.get_config() == config
    assert type(clone.miner) is type(loss.miner)
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert restored.get_config() == config
    labels, x = batch(6, classes=4)
    if not isinstance(loss.miner, miners.DistanceWeightedMiner):  # random draws
        np.testing.assert_allclose(float(clone(labels, x)), float(loss(labels, x)), rtol=1e-6)


@pytest.mark.parametrize("loss", LOSSES_WITH_OBJECTS, ids=IDS)
def test_fit_save_load_with_miner(loss, tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(8), 4).astype("int32")
    x = rng.normal(size=(32, 6)).astype("float32")
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(4), keras.layers.UnitNormalization()]
    )
    model.compile(optimizer="adam", loss=loss)
    history = model.fit(x, labels, batch_size=16, epochs=1, verbose=0, shuffle=False)
    assert np.all(np.isfinite(history.history["loss"]))
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert restored.loss.get_config() == loss.get_config()
