"""keras-dml (TensorFlow, optionally JAX) against pytorch-metric-learning (torch CPU), same run.

Forward+backward time, median of `--repeats` after one warm-up call, of each
loss (and margin head) in `REGISTRY` on a fixed `(B, 128)` L2-normalised batch
of `B // 16` classes with 16 samples each (an M-per-class batch, shuffled).
keras-dml runs as a compiled step (`tf.function`, `jax.jit`) returning the
gradient w.r.t. the embeddings (and a head's class weights); PML runs eagerly
with `.backward()`, as it is used. Each framework runs in its own subprocess,
one after the other, so that TensorFlow's, JAX's and torch's thread pools do
not compete; the rounds are repeated `--rounds` times and every round is
printed, with the ratios keras-dml / PML (below 1: keras-dml is faster).

    python benchmarks/bench_vs_pml.py                      # B = 256, 1024; TF and PML
    python benchmarks/bench_vs_pml.py --jax --rounds 2 --batch-sizes 256 1024 4096
    python benchmarks/bench_vs_pml.py --jax --losses NPairsLoss "NPairsLoss[one_per_class]"
    python benchmarks/bench_vs_pml.py --list
    python benchmarks/bench_vs_pml.py --jax --peak-memory --losses DynamicSoftMarginLoss

Adding a row: append an `Entry` to `REGISTRY` with a keras-dml constructor and
the PML constructor of the same loss (same hyperparameters; the parity tests
in tests/ say which settings make them equal). A loss entry's `keras` returns
a callable `(labels, embeddings) -> scalar`, its `pml` a callable
`(embeddings, labels) -> scalar`; a head entry's `keras` returns
`(head, keras loss or None)` and its `pml` takes `(num_classes, dim)` and
returns a PML loss module that owns its class weights.

Where the two are not the same loss, the entry's `note` says so (printed
under the table): the semi-hard PML column is `TripletMarginMiner("semihard")`
+ `TripletMarginLoss` (every semi-hard triplet, not one negative per positive
as tensorflow-addons and keras-dml), and PML's `NPairsLoss()` uses one
(anchor, positive) pair per class (`C x C`), where keras-dml's default
`NPairsLoss` uses every sample as anchor and candidate (`B x B`).
`NPairsLoss[one_per_class]` is keras-dml's `NPairsLoss(pairs="one_per_class",
l2_reg=0, distance="cosine")`, the same loss as PML's default.

PML runs with `torch.set_num_threads(1)` by default: on the 2-core benchmark
machine with other processes running, torch's two OpenMP threads made PML's
NPairsLoss at B=1024 take 184-192 ms instead of 6 ms with one thread
(2026-12-01, load average ~5). `--torch-threads 2` times it with two.
TensorFlow and JAX use their default thread pools. A PML row is left out
(`—`) above its entry's `pml_max_batch`, where PML would need more memory
than this machine has (the note gives the size).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable

PER_CLASS = 16
DIM = 128


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row: a keras-dml loss or head and its PML counterpart.

    Attributes:
        keras: builds the keras-dml callable (see the module docstring).
        pml: builds the PML callable or module; None: no PML column.
        head: a margin head (class weights are trained too).
        views: two-view self-supervised loss: PML gets instance ids as labels.
        pml_max_batch: largest B at which PML is run (memory).
        max_batch: largest B at which keras-dml is run (memory).
        semi_hard_sort: force keras-dml's sorting semi-hard path (before issue 21).
        semi_hard_bucketed: force the bucketed path (issue 21's second pass), not
            the compiled masked minimum (third pass) that few positives now take.
        note: printed under the table.
    """

    keras: Callable
    pml: Callable | None = None
    head: bool = False
    views: bool = False
    pml_max_batch: int | None = None
    max_batch: int | None = None
    semi_hard_sort: bool = False
    semi_hard_bucketed: bool = False
    note: str = ""


def _k():
    import keras_dml

    return keras_dml


def _pml():
    from pytorch_metric_learning import distances, losses, miners, reducers

    return distances, losses, miners, reducers


def _pml_l2():
    return _pml()[0].LpDistance(normalize_embeddings=False)


def _pml_semi_hard():
    _, losses, miners, _ = _pml()
    miner = miners.TripletMarginMiner(margin=1.0, type_of_triplets="semihard", distance=_pml_l2())
    loss = losses.TripletMarginLoss(margin=1.0, distance=_pml_l2())
    return lambda x, y: loss(x, y, miner(x, y))


def _pml_batch_hard():
    _, losses, miners, reducers = _pml()
    miner = miners.BatchHardMiner(distance=_pml_l2())
    loss = losses.TripletMarginLoss(margin=1.0, distance=_pml_l2(), reducer=reducers.MeanReducer())
    return lambda x, y: loss(x, y, miner(x, y))


def _pml_multi_similarity():
    _, losses, miners, _ = _pml()
    miner, loss = miners.MultiSimilarityMiner(epsilon=0.1), losses.MultiSimilarityLoss()
    return lambda x, y: loss(x, y, miner(x, y))


def _pml_dynamic_soft_margin():
    loss = _pml()[1].DynamicSoftMarginLoss()

    def step(x, y):
        value = loss(x, y)
        loss.hist_ = loss.hist_.detach()
        return value

    return step


def _dynamic_soft_margin(method: str = "sorted"):
    """keras-dml's loss; `method="dense"` is its `(B, B, B)` form (the one before issue 19's fix).

    Under a compiled JAX step the running histogram cannot be kept: momentum 1.0 there
    (the same work: one histogram update per step).
    """
    import functools

    import keras

    loss = _k().DynamicSoftMarginLoss(momentum=1.0 if keras.backend.backend() == "jax" else 0.01)
    if method != "sorted":
        loss.fn = functools.partial(loss.fn, method=method)
    return loss


def _pair_margin_miner():
    return _k().miners.PairMarginMiner(1.40, 1.42)


def _pml_pair_margin_miner():
    return _pml()[2].PairMarginMiner(1.40, 1.42, distance=_pml_l2())


def _pml_mined(loss, miner):
    return lambda x, y: loss(x, y, miner(x, y))


def _pml_npairs():
    return _pml()[1].NPairsLoss()


REGISTRY: dict[str, Entry] = {
    "TripletSemiHardLoss": Entry(
        lambda: _k().TripletSemiHardLoss(), _pml_semi_hard, pml_max_batch=1024,
        note="PML: TripletMarginMiner('semihard') + TripletMarginLoss(margin=1): every "
             "semi-hard triplet, not one negative per positive (not the same loss)."),
    "TripletSemiHardLoss[sort]": Entry(
        lambda: _k().TripletSemiHardLoss(), semi_hard_sort=True,
        note="keras-dml's sorting semi-hard path (every batch before issue 21)."),
    "TripletSemiHardLoss[bucketed]": Entry(
        lambda: _k().TripletSemiHardLoss(), semi_hard_bucketed=True,
        note="keras-dml's bucketed semi-hard path (issue 21's second pass; now above 16 "
             "positives per anchor)."),
    "TripletHardLoss": Entry(
        lambda: _k().TripletHardLoss(), _pml_batch_hard,
        note="PML: BatchHardMiner + TripletMarginLoss(margin=1, MeanReducer): same loss."),
    "TripletLoss[all]": Entry(
        lambda: _k().TripletLoss(margin=0.2, negative_mining="all"),
        lambda: _pml()[1].TripletMarginLoss(margin=0.2, distance=_pml_l2()), pml_max_batch=1024,
        note="batch-all; PML TripletMarginLoss(margin=0.2) without a miner: same loss. PML "
             "indexes every triplet (B x 15 x (B - 16): 251 M at B=4096), so it runs to B=1024."),
    "ContrastiveLoss": Entry(
        lambda: _k().ContrastiveLoss(),
        lambda: _pml()[1].ContrastiveLoss(distance=_pml_l2(), reducer=_pml()[3].MeanReducer()),
        note="PML ContrastiveLoss with MeanReducer: same loss."),
    "MultiSimilarityLoss": Entry(
        lambda: _k().MultiSimilarityLoss(), _pml_multi_similarity,
        note="PML MultiSimilarityMiner(0.1) + MultiSimilarityLoss: same loss."),
    "CircleLoss": Entry(
        lambda: _k().CircleLoss(margin=0.4, gamma=80.0), lambda: _pml()[1].CircleLoss(),
        note="m=0.4, gamma=80 (PML's defaults): same loss."),
    "LiftedStructLoss": Entry(
        lambda: _k().LiftedStructLoss(),
        lambda: _pml()[1].LiftedStructureLoss(distance=_pml_l2()), pml_max_batch=128,
        note="PML LiftedStructureLoss: same loss; PML builds a (positive pairs x negative "
             "pairs) matrix: 3,840 x 61,440 at B=256 (~35-45 s per step extrapolated), 15,360 x "
             "1,032,192 at B=1024 (> 60 GB as float32), so PML runs at B <= 128 only."),
    "NTXentLoss": Entry(
        lambda: _k().NTXentLoss(temperature=0.1),
        lambda: _pml()[1].NTXentLoss(temperature=0.1), views=True, pml_max_batch=256,
        note="two views of B/2 instances; same loss. PML's (positive pairs x negative pairs) "
             "mask is 1,024 x 1,046,528 at B=1024 (4.3 GB as float32, several copies), so PML "
             "runs at B=256 only."),
    "SupConLoss": Entry(
        lambda: _k().SupConLoss(temperature=0.1, base_temperature=0.1),
        lambda: _pml()[1].SupConLoss(temperature=0.1), note="same loss."),
    "NPairsLoss": Entry(
        lambda: _k().NPairsLoss(), _pml_npairs,
        note="keras-dml default: every sample anchor and candidate (B x B); PML NPairsLoss(): "
             "one pair per class (C x C): not the same loss."),
    "NPairsLoss[one_per_class]": Entry(
        lambda: _k().NPairsLoss(l2_reg=0.0, distance="cosine", pairs="one_per_class"),
        _pml_npairs, note="PML's form: same loss as PML NPairsLoss()."),
    "ArcFace": Entry(
        lambda: (_k().heads.ArcFace, {"margin": 0.5}, None),
        lambda c, d: _pml()[1].ArcFaceLoss(c, d, margin=28.6479), head=True,
        note="(all heads) C = B / 16 classes; gradients w.r.t. embeddings and class weights."),
    "CosFace": Entry(lambda: (_k().heads.CosFace, {}, None),
                     lambda c, d: _pml()[1].CosFaceLoss(c, d), head=True),
    "SubCenterArcFace": Entry(
        lambda: (_k().heads.SubCenterArcFace, {"margin": 0.5}, None),
        lambda c, d: _pml()[1].SubCenterArcFaceLoss(num_classes=c, embedding_size=d,
                                                    margin=28.6479), head=True),
    "SphereFace": Entry(
        lambda: (_k().heads.SphereFace, {"lambda_base": 0.0, "lambda_min": 0.0}, None),
        lambda c, d: _pml()[1].SphereFaceLoss(c, d), head=True),
    "SoftTriple": Entry(
        lambda: (_k().heads.SoftTriple, {"tau": 0.0}, None),
        lambda c, d: _pml()[1].SoftTripleLoss(c, d), head=True,
        note="10 centres per class, keras-dml tau=0 (PML has no centre regulariser)."),
    "ProxyAnchor": Entry(
        lambda: (_k().heads.ProxyAnchor, {}, "default"),
        lambda c, d: _pml()[1].ProxyAnchorLoss(c, d), head=True),
    "ProxyNCA": Entry(
        lambda: (_k().heads.ProxyNCA, {"temperature": 1.0}, None),
        lambda c, d: _pml()[1].ProxyNCALoss(c, d), head=True,
        note="temperature 1 (PML's softmax_scale=1)."),
    "DynamicSoftMarginLoss": Entry(
        _dynamic_soft_margin, _pml_dynamic_soft_margin, pml_max_batch=1024,
        note="same loss and running histogram (momentum 0.01; 1.0 under JAX's jit, which cannot "
             "carry it); PML's histogram is detached after each call (its own keeps the graph, "
             "and the second backward() fails). keras-dml sorts each anchor's negatives and "
             "binary-searches the bin edges (O(B^2 log B)); PML indexes all B * 15 * (B - 16) "
             "triplets (250 M at B=4096, ~6 GB of int64 indices: PML runs at B <= 1024)."),
    "DynamicSoftMarginLoss[dense]": Entry(
        lambda: _dynamic_soft_margin("dense"), max_batch=256,
        note="keras-dml's dense form, method='dense' (the only one before issue 19's fix): "
             "(B, B, B) tensors, 4 GB each at B=1024, so run at B=256 only."),
    # Issue 19: the catalogue's pair and triplet losses with miner objects (PML's
    # indices_tuple). PairMarginMiner(1.40, 1.42): on these random unit vectors (distances
    # near sqrt 2) it keeps about half of the positive and of the negative pairs.
    "GeneralizedLiftedStructureLoss+PairMarginMiner": Entry(
        lambda: _k().GeneralizedLiftedStructureLoss(miner=_pair_margin_miner()),
        lambda: _pml_mined(_pml()[1].GeneralizedLiftedStructureLoss(distance=_pml_l2()),
                           _pml_pair_margin_miner()),
        note="same loss and miner (tests/test_catalogue_loss_miners.py)."),
    "LiftedStructLoss+PairMarginMiner": Entry(
        lambda: _k().LiftedStructLoss(miner=_pair_margin_miner()),
        lambda: _pml_mined(_pml()[1].LiftedStructureLoss(distance=_pml_l2()),
                           _pml_pair_margin_miner()), pml_max_batch=256,
        note="same loss and miner; PML builds a (mined positive pairs x mined negative pairs) "
             "matrix, ~3.9 k x 2.6e5 at B=1024, so it runs at B=256 only."),
    "TupletMarginLoss+MultiSimilarityMiner": Entry(
        lambda: _k().TupletMarginLoss(miner=_k().miners.MultiSimilarityMiner(0.1)),
        lambda: _pml_mined(_pml()[1].TupletMarginLoss(), _pml()[2].MultiSimilarityMiner(0.1)),
        pml_max_batch=256,
        note="same loss and miner; PML repeats the negative pairs for every positive pair "
             "(a positive pairs x negative pairs matrix: 63 GB at B=1024), so it runs at "
             "B=256 only."),
    "IntraPairVarianceLoss+PairMarginMiner": Entry(
        lambda: _k().IntraPairVarianceLoss(miner=_pair_margin_miner()),
        lambda: _pml_mined(_pml()[1].IntraPairVarianceLoss(), _pml_pair_margin_miner()),
        note="same loss and miner."),
    "SignalToNoiseRatioContrastiveLoss+PairMarginMiner": Entry(
        lambda: _k().SignalToNoiseRatioContrastiveLoss(miner=_pair_margin_miner()),
        lambda: _pml_mined(_pml()[1].SignalToNoiseRatioContrastiveLoss(),
                           _pml_pair_margin_miner()),
        note="same loss and miner."),
    "AngularLoss+MultiSimilarityMiner": Entry(
        lambda: _k().AngularLoss(miner=_k().miners.MultiSimilarityMiner(0.1)),
        lambda: _pml_mined(_pml()[1].AngularLoss(), _pml()[2].MultiSimilarityMiner(0.1)),
        note="same loss and miner (unit-norm inputs)."),
    "MarginLoss+PairMarginMiner": Entry(
        lambda: _k().MarginLoss(miner=_pair_margin_miner()),
        lambda: _pml_mined(_pml()[1].MarginLoss(distance=_pml_l2()), _pml_pair_margin_miner()),
        pml_max_batch=256,
        note="same loss; the pair miner's positives x negatives per anchor are the triplets "
             "(PML's convert_to_triplets compares every mined positive pair with every mined "
             "negative pair: ~9 k x 5.6e5 at B=1024, so PML runs at B=256 only; keras-dml "
             "weighs the pair terms by their triplet counts, O(B^2))."),
}


def data(batch: int, dim: int = DIM):
    """Shuffled labels, `PER_CLASS` per class, and L2-normalised float32 embeddings."""
    import numpy as np

    rng = np.random.default_rng(0)
    classes = max(batch // PER_CLASS, 2)
    labels = rng.permutation(np.arange(batch) % classes).astype("int32")
    x = rng.normal(size=(batch, dim)).astype("float32")
    return labels, x / np.linalg.norm(x, axis=1, keepdims=True)


def pml_labels(entry: Entry, labels):
    import numpy as np

    if entry.views:  # rows i and i + B/2 are the two views of instance i
        return np.tile(np.arange(len(labels) // 2), 2).astype("int64")
    return labels.astype("int64")


def _median_ms(step, repeats: int) -> float:
    import numpy as np

    step()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def _max_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _row(framework: str, name: str, batch: int, timed, repeats: int, baseline: float) -> dict:
    """A timed row; `peak_mb`: growth of the process's peak resident memory since `baseline`
    (the row's own peak only when it is the process's one row: `--peak-memory`)."""
    ms = _median_ms(timed, repeats)
    return {"framework": framework, "loss": name, "batch": batch, "ms": ms,
            "peak_mb": _max_rss_mb() - baseline}


def keras_objective(entry: Entry, batch: int):
    """`(fn(labels, x) -> scalar, extra trainable variables)` for a keras-dml entry."""
    import keras

    from keras_dml import mining

    mining.SEMI_HARD_MAX_QUERIES = 0 if entry.semi_hard_sort else 64
    mining.SEMI_HARD_FUSED_QUERIES = 0 if entry.semi_hard_sort or entry.semi_hard_bucketed else 16
    if not entry.head:
        return entry.keras(), []
    cls, kwargs, loss = entry.keras()
    head = cls(max(batch // PER_CLASS, 2), **kwargs)
    head.build((None, DIM))
    loss = head.default_loss() if loss == "default" else None
    loss = loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return (lambda y, v: loss(y, head(v, y, training=True))), [head.kernel]


def run_tensorflow(names, batches, repeats):
    import tensorflow as tf

    rows = []
    for batch in batches:
        labels_np, x_np = data(batch)
        labels, x = tf.constant(labels_np), tf.Variable(x_np)
        for name in names:
            if (REGISTRY[name].max_batch or batch) < batch:
                continue
            baseline = _max_rss_mb()
            fn, weights = keras_objective(REGISTRY[name], batch)
            # A Keras variable's gradient is that of the backend variable it wraps.
            variables = [x, *[w.value for w in weights]]

            @tf.function
            def step(fn=fn, labels=labels, variables=variables):
                with tf.GradientTape() as tape:
                    value = fn(labels, variables[0])
                return value, tape.gradient(value, variables)

            def timed(step=step):
                _, grads = step()
                for grad in grads:
                    tf.convert_to_tensor(grad).numpy()  # gathers give IndexedSlices

            rows.append(_row("keras-dml TF", name, batch, timed, repeats, baseline))
    return rows


def run_jax(names, batches, repeats):
    import jax

    rows = []
    for batch in batches:
        labels, x = data(batch)
        for name in names:
            if (REGISTRY[name].max_batch or batch) < batch:
                continue
            baseline = _max_rss_mb()
            fn, weights = keras_objective(REGISTRY[name], batch)
            if weights:
                kernel = weights[0]

                def stateless(v, w, fn=fn, kernel=kernel, y=labels):
                    # The head reads its kernel variable; swap the traced value in.
                    from keras import StatelessScope

                    with StatelessScope(state_mapping=[(kernel, w)]):
                        return fn(y, v)

                step = jax.jit(jax.value_and_grad(stateless, argnums=(0, 1)))
                args = (x, kernel.value)
            else:
                step = jax.jit(jax.value_and_grad(lambda v, fn=fn, y=labels: fn(y, v)))
                args = (x,)

            def timed(step=step, args=args):
                jax.block_until_ready(step(*args))

            rows.append(_row("keras-dml JAX", name, batch, timed, repeats, baseline))
    return rows


def run_pml(names, batches, repeats):
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "1")))
    rows = []
    for batch in batches:
        labels_np, x_np = data(batch)
        for name in names:
            entry = REGISTRY[name]
            if entry.pml is None or (entry.pml_max_batch or batch) < batch:
                continue
            baseline = _max_rss_mb()
            labels = torch.tensor(pml_labels(entry, labels_np))
            x = torch.tensor(x_np, requires_grad=True)
            if entry.head:
                fn = entry.pml(max(batch // PER_CLASS, 2), DIM)
                params = list(fn.parameters())
            else:
                fn, params = entry.pml(), []

            def timed(fn=fn, x=x, labels=labels, params=params):
                for tensor in (x, *params):
                    tensor.grad = None
                fn(x, labels).backward()

            rows.append(_row("PML torch", name, batch, timed, repeats, baseline))
    return rows


RUNNERS = {"tensorflow": run_tensorflow, "jax": run_jax, "pml": run_pml}


def _runs(entry: Entry, batch: int, framework: str) -> bool:
    """Whether `framework` times `entry` at `batch` (the runners' own skips)."""
    if framework == "pml":
        return entry.pml is not None and (entry.pml_max_batch or batch) >= batch
    return (entry.max_batch or batch) >= batch


def _ratio(ours, theirs):
    return "—" if ours is None or theirs is None else f"{ours / theirs:.2f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--jax", action="store_true", help="also time keras-dml on JAX")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch.set_num_threads for PML (default 1: see the module doc)")
    parser.add_argument("--losses", nargs="+", choices=list(REGISTRY), default=list(REGISTRY),
                        help="time only these rows")
    parser.add_argument("--list", action="store_true", help="print the registry and exit")
    parser.add_argument("--peak-memory", action="store_true",
                        help="one process per (framework, loss, B), and a peak-memory column each")
    parser.add_argument("--worker", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.list:
        for name, entry in REGISTRY.items():
            print(f"{name}: {entry.note or ('head' if entry.head else 'loss')}")
        return
    if args.worker:
        print(json.dumps(RUNNERS[args.worker](args.losses, args.batch_sizes, args.repeats)))
        return
    frameworks = ["tensorflow"] + (["jax"] if args.jax else []) + ["pml"]
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} at start, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for round_ in range(args.rounds):
        table, peaks = {}, {}
        # With --peak-memory every (loss, B) runs in its own worker, so that its peak is its own.
        jobs = ([([loss], [batch]) for batch in args.batch_sizes for loss in args.losses]
                if args.peak_memory else [(args.losses, args.batch_sizes)])
        for framework in frameworks:
            env = dict(os.environ, KERAS_BACKEND="jax" if framework == "jax" else "tensorflow",
                       TF_CPP_MIN_LOG_LEVEL="3", BENCH_TORCH_THREADS=str(args.torch_threads))
            for losses, batches in jobs:
                if args.peak_memory and not _runs(REGISTRY[losses[0]], batches[0], framework):
                    continue
                command = [sys.executable, __file__, "--worker", framework, "--repeats",
                           str(args.repeats), "--batch-sizes", *map(str, batches),
                           "--losses", *losses]
                out = subprocess.run(command, env=env, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{framework} worker failed:\n{out.stderr[-3000:]}")
                for row in json.loads(out.stdout.strip().splitlines()[-1]):
                    table[(row["loss"], row["batch"], row["framework"])] = row["ms"]
                    peaks[(row["loss"], row["batch"], row["framework"])] = row["peak_mb"]
        columns = ["keras-dml TF"] + (["keras-dml JAX"] if args.jax else []) + ["PML torch"]
        ratios = ["TF / PML"] + (["JAX / PML"] if args.jax else [])
        print(f"\n## round {round_ + 1}, load average {os.getloadavg()[0]:.2f} at end\n")
        memory = [f"{c} peak MB" for c in columns] if args.peak_memory else []
        print("| loss | B | " + " | ".join(f"{c} ms" for c in columns) + " | "
              + " | ".join(ratios + memory) + " |")
        print("| --- | --- |" + " --- |" * (len(columns) + len(ratios) + len(memory)))
        for batch in args.batch_sizes:
            for loss in args.losses:
                cells = [table.get((loss, batch, c)) for c in columns]
                text = ["—" if v is None else f"{v:.1f}" for v in cells]
                text += [_ratio(v, cells[-1]) for v in cells[:-1]]
                if args.peak_memory:
                    text += [f"{peaks[key]:.0f}" if (key := (loss, batch, c)) in peaks else "—"
                             for c in columns]
                print(f"| {loss} | {batch} | " + " | ".join(text) + " |")
    print()
    for name in args.losses:
        if REGISTRY[name].note:
            print(f"- {name}: {REGISTRY[name].note}")


if __name__ == "__main__":
    main()
