"""Why S2SD's distillation can stall a small backbone (issue 14): the terms and their gradients.

Trains MSD with S2SD's defaults (embedding_dim=128, target heads 512-2048,
T=1, γ=50, MultiSimilarityLoss, Adam 1e-3, batch 128) on the signal dataset
of `bench_s2sd.py` (500 samples per class: 2,500 train on classes 0-4,
2,500 test on 5-9) with the issue's Conv1D backbone (64-d φ), one seed, and
after epochs 0, 1, 3, 6, 10 and 15 prints, on one fixed training batch:
every loss term, the gradient norm into the backbone of ½·L(f), ½·mean
L(g_i) and γ·KL; and on the test classes: the mean cosine similarity of
same-class and different-class pairs of φ, f and the 2048-d target, and
MAP@R of f and of φ.

    python benchmarks/s2sd_mechanism.py --into-backbone    # the paper's routing
    python benchmarks/s2sd_mechanism.py                    # the default (f only)
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from bench_s2sd import build_backbone, make_signals  # noqa: E402

import keras_dml  # noqa: E402
from keras_dml.evaluation import retrieval_metrics  # noqa: E402
from keras_dml.models.s2sd import S2SD  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--into-backbone", action="store_true")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--gamma", type=float, default=50.0)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    args = parser.parse_args(argv)
    import tensorflow as tf  # gradient tapes: this script is TensorFlow-only

    x, y = make_signals(500)
    seen = y < 5
    x_train, y_train, x_test, y_test = x[seen], y[seen], x[~seen], y[~seen]
    keras.utils.set_random_seed(0)
    model = S2SD(build_backbone("conv1d"), embedding_dim=128, distillation_weight=args.gamma,
                 distillation_into_backbone=args.into_backbone)
    model.compile(optimizer=keras.optimizers.Adam(args.learning_rate),
                  loss=keras_dml.MultiSimilarityLoss())
    x_batch, y_batch = x_train[:128], y_train[:128]
    backbone_variables = model.backbone.trainable_variables

    def cosines(e):
        e = e[:1000] / np.linalg.norm(e[:1000], axis=1, keepdims=True)
        s = e @ e.T
        same = y_test[:1000, None] == y_test[None, :1000]
        off_diagonal = ~np.eye(len(e), dtype=bool)
        return round(float(s[same & off_diagonal].mean()), 3), round(float(s[~same].mean()), 3)

    def probe(epoch):
        with tf.GradientTape(persistent=True) as tape:
            terms = model.compute_loss_terms(x_batch, y_batch, training=True)
            targets = tf.reduce_mean(
                tf.stack([v for k, v in terms.items() if k.startswith("target_")])
            )
            parts = {"base/2": 0.5 * terms["base_loss"], "targets/2": 0.5 * targets,
                     "gamma*KL": model.distillation_weight * terms["distillation"]}
        grads = {}
        for name, value in parts.items():
            g = [t for t in tape.gradient(value, backbone_variables) if t is not None]
            grads[name] = round(float(tf.linalg.global_norm(g)), 4) if g else 0.0
        phi = model.backbone(x_test, training=False).numpy()
        f = model.embedding_model().predict(x_test, verbose=0)
        target = model.target_heads[-1](phi).numpy()
        print(json.dumps(dict(
            epoch=epoch, **{k: round(float(v), 4) for k, v in terms.items()},
            backbone_grad_norm=grads, cos_same_diff_phi=cosines(phi), cos_same_diff_f=cosines(f),
            cos_same_diff_g2048=cosines(target),
            map_at_r_f=round(retrieval_metrics(f, y_test, nmi=False)["map_at_r"], 3),
            map_at_r_phi=round(retrieval_metrics(phi, y_test, nmi=False)["map_at_r"], 3),
        )), flush=True)

    probe(0)
    for epoch in range(1, args.epochs + 1):
        model.fit(x_train, y_train, batch_size=128, epochs=1, verbose=0)
        if epoch in (1, 3, 6, 10, 15, 20, 30):
            probe(epoch)


if __name__ == "__main__":
    main()
