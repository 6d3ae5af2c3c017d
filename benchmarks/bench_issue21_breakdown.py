"""Where the time of two steps slower than wanted goes (issue 21), on TensorFlow.

1. `TripletSemiHardLoss` vs `TripletHardLoss` at B=1024, D=128, 64 classes × 16:
   the whole forward+backward steps, and the pieces of the bucketed semi-hard
   path (`mining._semi_hard_terms_bucketed`) timed alone on a fixed distance
   matrix: `top_k` of the positives, the batched `tf.searchsorted` of every
   entry into them, the segment minimum + suffix minimum over the buckets.
2. `SubCenterArcFace` (K=3) at B=4096, C=256: the head as shipped (since the
   issue-21 follow-up it clips after the max) against variants of the centre
   reduction, patched into the class for the measurement only: clip every
   centre's cosine first, then the max (`CosineHead`'s reduction, the head
   before the follow-up), take the max by `argmax` + gather (gradient to one
   centre, as torch's `max` does), with the clip before or after; and
   `ArcFace` with C and 3·C classes.

Each row is a compiled step (`tf.function`), median of `--repeats` calls after
two warm-ups; rounds alternate the rows. Prints a markdown table.

    python benchmarks/bench_issue21_breakdown.py --rounds 2 --repeats 11
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import losses, ops  # noqa: E402

import keras_dml  # noqa: E402
from keras_dml import mining  # noqa: E402
from keras_dml.distances import l2_normalize  # noqa: E402
from keras_dml.heads import ArcFace, SubCenterArcFace, base  # noqa: E402


def median_ms(fn, repeats):
    fn(), fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for value in tf.nest.flatten(fn()):
            tf.convert_to_tensor(value).numpy()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def embeddings(batch, classes, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(batch) % classes).astype("int32")
    x = rng.normal(size=(batch, 128)).astype("float32")
    return tf.constant(labels), tf.Variable(x / np.linalg.norm(x, axis=1, keepdims=True))


def gradient_step(objective, variables):
    @tf.function
    def step():
        with tf.GradientTape() as tape:
            value = objective()
        return value, tape.gradient(value, variables)

    return step


def semi_hard_rows():
    batch, k = 1024, mining.SEMI_HARD_MAX_QUERIES
    labels, x = embeddings(batch, 64)
    semi, hard = keras_dml.TripletSemiHardLoss(), keras_dml.TripletHardLoss()
    d = tf.sqrt(tf.maximum(2.0 - 2.0 * tf.matmul(x, x, transpose_b=True), 0.0))
    same = tf.equal(labels[:, None], labels[None, :])
    positives, negatives = same & ~tf.eye(batch, dtype=tf.bool), ~same
    filler = tf.reduce_max(d) + 1.0
    top_k = tf.function(lambda: tf.math.top_k(tf.where(positives, -d, -filler), k))
    query_sorted = -top_k()[0]
    search = tf.function(lambda: tf.searchsorted(query_sorted, d, out_type=tf.int32))
    count = tf.where(negatives, search(), 0)
    segment = tf.reshape(tf.range(batch)[:, None] * (k + 1) + count, [-1])
    minima = tf.function(
        lambda: mining._tf_bucket_minima(d, negatives, segment, batch * (k + 1), k, k)
    )
    return [
        ("B=1024 TripletSemiHardLoss fwd+bwd", gradient_step(lambda: semi(labels, x), [x])),
        ("B=1024 TripletHardLoss fwd+bwd", gradient_step(lambda: hard(labels, x), [x])),
        ("B=1024 piece: top_k of the positives (k=64)", top_k),
        ("B=1024 piece: tf.searchsorted of B² entries", search),
        ("B=1024 piece: bucket segment min + suffix min", minima),
    ]


def _unclipped_cosine(self, x):
    centers = l2_normalize(ops.convert_to_tensor(self.kernel), axis=0)
    x = l2_normalize(x)
    return ops.matmul(x, ops.cast(centers, x.dtype))


def _gather_max(self, cosine):
    per_center = ops.reshape(cosine, (-1, self.num_classes, self.centers_per_class))
    index = ops.stop_gradient(ops.expand_dims(ops.argmax(per_center, axis=-1), -1))
    return ops.take_along_axis(per_center, ops.cast(index, "int32"), axis=-1)[..., 0]


def _gather_then_clip(self, cosine):
    return ops.clip(_gather_max(self, cosine), -1.0, 1.0)


def head_rows():
    batch = 4096
    classes = batch // 16
    labels, x = embeddings(batch, classes)
    crossentropy = losses.SparseCategoricalCrossentropy(from_logits=True)
    shipped = (SubCenterArcFace.center_cosine, SubCenterArcFace.class_similarity)
    clip_first = (base.CosineHead.center_cosine, base.CosineHead.class_similarity)

    def step(head, patch=None):
        head.build((None, 128))
        run = gradient_step(
            lambda: crossentropy(labels, head(x, labels, training=True)), [x, head.kernel.value]
        )
        if patch:
            SubCenterArcFace.center_cosine, SubCenterArcFace.class_similarity = patch
        run()  # traced with the patch in place
        SubCenterArcFace.center_cosine, SubCenterArcFace.class_similarity = shipped
        return run

    return [
        ("B=4096 SubCenterArcFace (as shipped: clip after max)", step(SubCenterArcFace(classes))),
        (
            "B=4096 SubCenterArcFace, clip every centre, then max",
            step(SubCenterArcFace(classes), clip_first),
        ),
        (
            "B=4096 SubCenterArcFace, clip every centre, argmax + gather",
            step(SubCenterArcFace(classes), (clip_first[0], _gather_max)),
        ),
        (
            "B=4096 SubCenterArcFace, argmax + gather, clip after",
            step(SubCenterArcFace(classes), (_unclipped_cosine, _gather_then_clip)),
        ),
        ("B=4096 ArcFace, C classes", step(ArcFace(classes))),
        ("B=4096 ArcFace, 3·C classes", step(ArcFace(3 * classes))),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    rows = semi_hard_rows() + head_rows()
    results = {name: [] for name, _ in rows}
    for _ in range(args.rounds):
        for name, fn in rows:
            results[name].append(median_ms(fn, args.repeats))
    print(f"# load average {os.getloadavg()[0]:.2f} at the end")
    print("| step | " + " | ".join(f"round {r + 1} ms" for r in range(args.rounds)) + " |")
    print("| --- |" + " --- |" * args.rounds)
    for name, times in results.items():
        print(f"| {name} | " + " | ".join(f"{t:.1f}" for t in times) + " |")


if __name__ == "__main__":
    main()
