"""DynamicSoftMarginLoss against a NumPy loop reference and pytorch-metric-learning 2.9.

The running histogram is checked over several successive batches. Differences
from PML, each tested below: the histogram carries no gradient (PML
differentiates through it, and its second `backward()` with a kept histogram
fails), and mass outside the histogram's grid is dropped where PML raises.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from pml_parity import BATCH_IDS, BATCHES, assert_same, keras_value_and_grads, requires_pml

from keras_dml import miners
from keras_dml.losses.dynamic_soft_margin import DynamicSoftMarginLoss, dynamic_soft_margin_loss


def unit_rows(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ref_differences(labels, x):
    """Every triplet's d(a, p) - d(a, n) on unit vectors, by loops."""
    u = unit_rows(x)
    out = []
    for a in range(len(labels)):
        for p in range(len(labels)):
            if p == a or labels[p] != labels[a]:
                continue
            for n in range(len(labels)):
                if labels[n] != labels[a]:
                    out.append(math.dist(u[a], u[p]) - math.dist(u[a], u[n]))
    return out


def ref_step(histogram, diffs, min_val=-2.0, num_bins=10, momentum=0.01):
    """`(loss, histogram)` of one batch: PML's update, then the mean of CDF(x) * x."""
    if not diffs:
        return 0.0, histogram
    delta = 2 * abs(min_val) / num_bins
    counts = [0.0] * num_bins
    for x in diffs:
        k = math.floor((x - min_val) / delta)
        f = (x - min_val) / delta - k
        for b, w in ((k, 1 - f), (k + 1, f)):
            if 0 <= b < num_bins:
                counts[b] += w
    m = momentum if sum(histogram) != 0 else 1.0
    mixed = [(1 - m) * h + m * c for h, c in zip(histogram, counts, strict=True)]
    histogram = [v / sum(mixed) for v in mixed]
    cdf = [sum(histogram[: b + 1]) for b in range(num_bins)]
    terms = []
    for x in diffs:
        k = min(max(math.floor((x - min_val) / delta), 0), num_bins - 1)
        terms.append(cdf[k] * x)
    return sum(terms) / len(terms), histogram


def successive_batches(count=4, seed=3):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 3, size=10), rng.normal(size=(10, 5))) for _ in range(count)]


@pytest.mark.parametrize("case", BATCHES, ids=BATCH_IDS)
def test_one_batch_matches_numpy_reference(case):
    _, labels, x = case
    want, _ = ref_step([0.0] * 10, ref_differences(labels, x))
    assert_same(float(DynamicSoftMarginLoss(dtype="float64")(labels, x)), want)


@pytest.mark.parametrize("momentum,num_bins,min_val", [(0.01, 10, -2.0), (0.3, 7, -1.5)])
def test_running_histogram_matches_numpy_reference_over_batches(momentum, num_bins, min_val):
    loss = DynamicSoftMarginLoss(min_val, num_bins, momentum, dtype="float64")
    histogram = [0.0] * num_bins
    for labels, x in successive_batches():
        want, histogram = ref_step(histogram, ref_differences(labels, x), min_val, num_bins,
                                   momentum)
        assert_same(float(loss(labels, x)), want)
        assert_same(np.asarray(loss.histogram.value), histogram)


def test_momentum_one_keeps_no_state_and_reset_state_empties_the_histogram():
    batches = successive_batches()
    stateless = DynamicSoftMarginLoss(momentum=1.0)
    for labels, x in batches:
        assert_same(float(stateless(labels, x)), float(DynamicSoftMarginLoss()(labels, x)))
    running = DynamicSoftMarginLoss()
    for labels, x in batches:
        running(labels, x)
    assert float(np.sum(running.histogram.value)) == pytest.approx(1.0)
    running.reset_state()
    assert not np.any(np.asarray(running.histogram.value))
    labels, x = batches[0]
    assert_same(float(running(labels, x)), float(DynamicSoftMarginLoss()(labels, x)))


def test_gradient_is_the_cdf_weight_times_the_differences_gradient():
    _, labels, x = BATCHES[0]
    loss = DynamicSoftMarginLoss(dtype="float64")

    def numeric(v):
        return ref_step([0.0] * 10, ref_differences(labels, v))

    _, (grad,) = keras_value_and_grads(lambda v: loss(labels, v), x)
    # The histogram is fixed at this batch's: differentiate the weighted mean only.
    _, histogram = numeric(x)
    cdf = np.cumsum(histogram)

    def weighted(v):
        diffs = ref_differences(labels, v)
        ks = [min(max(math.floor((d + 2.0) / 0.4), 0), 9) for d in ref_differences(labels, x)]
        return sum(cdf[k] * d for k, d in zip(ks, diffs, strict=True)) / len(diffs)

    eps = 1e-6
    want = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += eps
        down[idx] -= eps
        want[idx] = (weighted(up) - weighted(down)) / (2 * eps)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-8)


def test_batch_without_triplets_gives_zero_and_keeps_the_histogram():
    loss = DynamicSoftMarginLoss()
    labels, x = successive_batches(1)[0]
    loss(labels, x)
    before = np.asarray(loss.histogram.value).copy()
    assert float(loss(np.arange(10), x)) == 0.0  # no positive pair
    np.testing.assert_array_equal(np.asarray(loss.histogram.value), before)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"min_val": 0.5}, "min_val"), ({"num_bins": 0}, "num_bins"), ({"momentum": 0.0}, "momentum"),
     ({"momentum": 1.5}, "momentum"), ({"miner": "hard"}, "miner")],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicSoftMarginLoss(**kwargs)


def test_config_round_trip_with_a_miner_leaves_the_state_out():
    loss = DynamicSoftMarginLoss(momentum=0.2, miner=miners.TripletMarginMiner(0.3, "hard"))
    labels, x = successive_batches(1)[0]
    loss(labels, x)
    clone = DynamicSoftMarginLoss.from_config(loss.get_config())
    assert clone.get_config() == loss.get_config()
    assert isinstance(clone.miner, miners.TripletMarginMiner)
    assert not np.any(np.asarray(clone.histogram.value))


# --- pytorch-metric-learning 2.9 ---------------------------------------------------------


def _pml_loss(detached: bool, **kwargs):
    """PML's loss; `detached=True` updates its histogram without gradient (keras-dml's way)."""
    from pytorch_metric_learning.losses import DynamicSoftMarginLoss as PMLLoss

    class Detached(PMLLoss):
        def update_histogram(self, data):
            super().update_histogram(data.detach())

    return (Detached if detached else PMLLoss)(**kwargs)


def _pml_step(pml_loss, labels, x, miner=None):
    import torch

    emb = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    lab = torch.tensor(np.asarray(labels, np.int64))
    indices = None if miner is None else miner(emb, lab)
    value = pml_loss(emb, lab, indices)
    value.backward()
    return value.item(), emb.grad.numpy()


@requires_pml
@pytest.mark.parametrize("momentum", [0.01, 0.5])
def test_matches_pml_value_and_gradient_over_successive_batches(momentum):
    ours = DynamicSoftMarginLoss(momentum=momentum, dtype="float64")
    theirs = _pml_loss(detached=True, momentum=momentum)
    for labels, x in successive_batches():
        got, (grad,) = keras_value_and_grads(lambda v, labels=labels: ours(labels, v), x)
        want, want_grad = _pml_step(theirs, labels, x)
        assert_same(got, want)
        assert_same(grad, want_grad)
        assert_same(np.asarray(ours.histogram.value), theirs.hist_.numpy())


@requires_pml
def test_pml_differentiates_through_its_histogram_and_fails_on_the_next_step():
    # Stated difference: PML 2.9's gradient also flows through the histogram it has just
    # updated (same value, other gradient); keeping that graph in `hist_`, its second
    # backward() fails. keras-dml's histogram is state, without gradient.
    theirs = _pml_loss(detached=False)
    (labels, x), (labels2, x2) = successive_batches(2)
    want, want_grad = _pml_step(theirs, labels, x)
    ours = DynamicSoftMarginLoss(dtype="float64")
    got, (grad,) = keras_value_and_grads(lambda v: ours(labels, v), x)
    assert_same(got, want)
    assert not np.allclose(grad, want_grad, rtol=1e-3)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        _pml_step(theirs, labels2, x2)


@requires_pml
def test_pml_raises_where_a_difference_lands_past_the_last_grid_point():
    # d(a, p) - d(a, n) close to 2: PML scatters into bin `num_bins` (out of range) and
    # raises; keras-dml drops that share of the mass and weighs the triplet with CDF = 1.
    labels = np.array([0, 0, 1])
    x = np.array([[1.0, 0.0], [-1.0, 0.01], [0.999, 0.02]])
    with pytest.raises(RuntimeError):
        _pml_step(_pml_loss(detached=True), labels, x)
    diffs = ref_differences(labels, x)
    assert max(diffs) > 1.6
    want, _ = ref_step([0.0] * 10, diffs)
    assert_same(float(DynamicSoftMarginLoss(dtype="float64")(labels, x)), want)


@requires_pml
@pytest.mark.parametrize("kind", ["pair", "triplet"])
def test_matches_pml_with_a_miner(kind):
    from pytorch_metric_learning import miners as pml_miners

    if kind == "pair":
        ours = DynamicSoftMarginLoss(miner=miners.PairMarginMiner(0.6, 0.9), dtype="float64")
        miner = pml_miners.PairMarginMiner(0.6, 0.9)
    else:
        ours = DynamicSoftMarginLoss(miner=miners.TripletMarginMiner(0.3, "semihard"),
                                     dtype="float64")
        miner = pml_miners.TripletMarginMiner(0.3, "semihard")
    theirs = _pml_loss(detached=True)
    nonzero = 0
    for labels, x in successive_batches():
        got, (grad,) = keras_value_and_grads(lambda v, labels=labels: ours(labels, v), x)
        want, want_grad = _pml_step(theirs, labels, x, miner)
        assert_same(got, want)
        assert_same(grad, want_grad)
        nonzero += got != 0
    assert nonzero >= 2


def test_function_takes_and_returns_the_histogram():
    labels, x = successive_batches(1)[0]
    value, histogram = dynamic_soft_margin_loss(labels.astype("int32"), x.astype("float32"),
                                                return_histogram=True)
    want, want_hist = ref_step([0.0] * 10, ref_differences(labels, x))
    assert_same(float(value), want, rtol=1e-5, atol=1e-6)
    assert_same(np.asarray(histogram), want_hist, rtol=1e-4, atol=1e-6)
