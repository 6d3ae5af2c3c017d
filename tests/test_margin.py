"""MarginLoss and MarginBeta against a NumPy loop reference and pytorch-metric-learning 2.9."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from pml_parity import (
    BATCH_IDS,
    BATCHES,
    assert_same,
    keras_value_and_grads,
    other_references,
    pair_value,
    pairs,
    pml_loss_fn,
    pml_value_and_grads,
)

from keras_dml.losses.margin import MarginBeta, MarginLoss, margin_loss


def ref_margin(labels, x, margin=0.2, beta=1.2, distance="euclidean", ref_labels=None,
               ref_x=None, betas=None, nu=0.0):
    """Every triplet (a, p, n): both hinge terms; sum / number of non-zero terms."""
    refs = x if ref_x is None else ref_x
    positives, negatives = pairs(labels, ref_labels)
    sign = -1.0 if distance in ("cosine", "dot") else 1.0
    total, count, reg = 0.0, 0, 0.0
    for a in range(len(labels)):
        b = beta if betas is None else betas[labels[a]]
        for p in positives[a]:
            for n in negatives[a]:
                pos = max(sign * (pair_value(x[a], refs[p], distance) - b) + margin, 0.0)
                neg = max(sign * (b - pair_value(x[a], refs[n], distance)) + margin, 0.0)
                total += pos + neg
                count += (pos > 0) + (neg > 0)
                reg += nu * b
    loss = total / count if count else 0.0
    if betas is not None and count:
        loss += reg / count
    return loss


@pytest.mark.parametrize("case", BATCHES, ids=BATCH_IDS)
@pytest.mark.parametrize("distance", ["euclidean", "cosine", "squared_euclidean"])
def test_matches_numpy_reference(case, distance):
    _, labels, x = case
    loss = MarginLoss(margin=0.1, beta=0.8, distance=distance, dtype="float64")
    assert_same(float(loss(labels, x)), ref_margin(labels, x, 0.1, 0.8, distance))


@pytest.mark.parametrize("case", BATCHES, ids=BATCH_IDS)
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_matches_pml_value_and_gradient(case, distance):
    from pytorch_metric_learning import distances as pml_distances
    from pytorch_metric_learning import losses as pml_losses

    _, labels, x = case
    # PML's LpDistance normalises by default; keras-dml's "euclidean" does not (documented).
    pml_distance = (pml_distances.CosineSimilarity() if distance == "cosine"
                    else pml_distances.LpDistance(normalize_embeddings=False))
    want, (want_grad,) = pml_value_and_grads(
        pml_loss_fn(pml_losses.MarginLoss(distance=pml_distance), labels), x
    )
    loss = MarginLoss(distance=distance, dtype="float64")
    got, (grad,) = keras_value_and_grads(lambda v: loss(labels, v), x)
    assert_same(got, want)
    assert_same(grad, want_grad)


def test_pml_default_distance_is_euclidean_on_unit_inputs():
    from pytorch_metric_learning import losses as pml_losses

    _, labels, x = BATCHES[0]
    want, (want_grad,) = pml_value_and_grads(
        pml_loss_fn(pml_losses.MarginLoss(), labels, normalize=True), x
    )
    loss = MarginLoss(dtype="float64")
    got, (grad,) = keras_value_and_grads(lambda v: loss(labels, keras.ops.normalize(v, axis=1)), x)
    assert_same(got, want)
    assert_same(grad, want_grad)


def test_references_match_reference_and_pml():
    from pytorch_metric_learning import distances as pml_distances
    from pytorch_metric_learning import losses as pml_losses

    _, labels, x = BATCHES[0]
    ref_labels, ref_x, references = other_references(np.random.default_rng(1))
    labels = labels.astype("int32")
    got, (grad,) = keras_value_and_grads(
        lambda v: margin_loss(labels, v, references=references), x
    )
    assert_same(got, ref_margin(labels, x, ref_labels=ref_labels, ref_x=ref_x))
    pml = pml_losses.MarginLoss(distance=pml_distances.LpDistance(normalize_embeddings=False))
    want, (want_grad,) = pml_value_and_grads(pml_loss_fn(pml, labels, ref_labels, ref_x), x)
    assert_same(got, want)
    assert_same(grad, want_grad)


def test_per_class_learned_beta_matches_pml():
    from pytorch_metric_learning import distances as pml_distances
    from pytorch_metric_learning import losses as pml_losses

    torch = pytest.importorskip("torch")
    _, labels, x = BATCHES[0]
    betas = np.array([0.9, 1.1, 1.3, 1.5])
    pml = pml_losses.MarginLoss(learn_beta=True, num_classes=4, nu=0.1,
                                distance=pml_distances.LpDistance(normalize_embeddings=False))
    with torch.no_grad():
        pml.beta.copy_(torch.tensor(betas))
    want, (want_grad,) = pml_value_and_grads(pml_loss_fn(pml, labels), x)
    loss = MarginLoss(learn_beta=True, num_classes=4, nu=0.1, dtype="float64")
    outputs = np.concatenate([x, np.tile(betas, (len(x), 1))], axis=1)
    got, (grad,) = keras_value_and_grads(lambda v: loss(labels, v), outputs)
    assert_same(got, want)
    assert_same(got, ref_margin(labels, x, betas=betas, nu=0.1))
    assert_same(grad[:, :6], want_grad)
    # PML's gradient w.r.t. β (from the backward pass above) is the β columns' summed gradient.
    assert_same(grad[:, 6:].sum(axis=0), pml.beta.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_no_positive_pair_gives_zero():
    x = np.random.default_rng(3).normal(size=(5, 4)).astype("float32")
    assert float(MarginLoss()(np.arange(5), x)) == 0.0


def test_learned_beta_trains_with_fit_and_saves(tmp_path):
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(4), 8).astype("int32")
    x = (np.eye(8)[labels] + 0.5 * rng.normal(size=(32, 8))).astype("float32")
    embed = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4),
                              keras.layers.UnitNormalization()])
    model = keras.Sequential([embed, MarginBeta(num_classes=4, beta=1.2)])
    model.compile(optimizer=keras.optimizers.SGD(0.5),
                  loss=MarginLoss(learn_beta=True, num_classes=4))
    before = keras.ops.convert_to_numpy(model.layers[-1].beta).copy()
    history = model.fit(x, labels, batch_size=16, epochs=2, verbose=0)
    after = keras.ops.convert_to_numpy(model.layers[-1].beta)
    assert np.all(np.isfinite(history.history["loss"]))
    assert not np.allclose(before, after)  # β is a model weight and is trained
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(restored.layers[-1].beta), after)
    assert restored.loss.get_config() == model.loss.get_config()


def test_bad_options_and_outputs():
    with pytest.raises(ValueError, match="nu"):
        MarginLoss(nu=0.1)
    with pytest.raises(ValueError, match="num_classes"):
        MarginLoss(num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        MarginLoss(learn_beta=True, num_classes=0)
    with pytest.raises(ValueError, match="margin"):
        MarginLoss(margin=-0.1)
    with pytest.raises(ValueError, match="MarginBeta"):
        MarginLoss(learn_beta=True, num_classes=4)(np.arange(4), np.ones((4, 3), "float32"))
