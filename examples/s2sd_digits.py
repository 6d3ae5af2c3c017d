"""Compare a plain metric-learning baseline with S2SD self-distillation on digits, same budget.

S2SD (Roth et al., ICML 2021) trains extra, wider embedding heads next to
the one used at test time and distils their batch similarity structure into
it; the extra heads are dropped afterwards, so inference costs nothing
more. Both runs below train the same backbone with the multi-similarity
loss on digits 0-4 (P x M batches), from the same seed for the same number
of steps: `S2SD(target_dims=())` is the plain baseline, `S2SD(target_dims=
(128, 256, 512), feature_distillation=True)` (MSDF) adds distillation from
the target heads and from the backbone features. As in the paper, every head
sits on the backbone's pooled features (here the conv layers' flattened
1024-d map), which are wider than any head. Retrieval is then scored on
held-out images of digits 0-4 and on the unseen digits 5-9. One seed on 1,797 tiny
images is noisy: read the numbers as a demonstration, not a benchmark.

    python examples/s2sd_digits.py --epochs 20
"""

from __future__ import annotations

import argparse

import keras
import numpy as np

import keras_dml
from keras_dml.data import m_per_class_dataset
from keras_dml.data.digits import load_digits_zero_shot
from keras_dml.evaluation import retrieval_metrics
from keras_dml.models.s2sd import S2SD


def build_features() -> keras.Model:
    """The backbone φ up to its flattened 1024-d conv features; S2SD adds the embedding heads."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
        ],
        name="features",
    )


def train(data, target_dims, epochs: int, seed: int, steps: int | None = None) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = S2SD(build_features(), embedding_dim=32, target_dims=target_dims,
                 feature_distillation=bool(target_dims), feature_distillation_delay=30)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras_dml.MultiSimilarityLoss())
    batches = m_per_class_dataset(data.x_train, data.y_train, classes_per_batch=5,
                                  samples_per_class=16, seed=seed)
    steps = steps or int(np.ceil(len(data.x_train) / 80))
    model.fit(batches, epochs=epochs, steps_per_epoch=steps, verbose=2, shuffle=False)
    return model.embedding_model()  # backbone + the 32-d head only


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per epoch (default: one pass over the training images)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data = load_digits_zero_shot(seed=args.seed)
    results = {}
    for name, dims in (("baseline", ()), ("MSDF", (128, 256, 512))):
        print(f"\n== {name}: target heads {dims or 'none'}")
        embed = train(data, dims, args.epochs, args.seed, args.steps)
        results[name] = {
            "seen": retrieval_metrics(embed.predict(data.x_seen, verbose=0), data.y_seen),
            "unseen": retrieval_metrics(embed.predict(data.x_unseen, verbose=0), data.y_unseen),
            "parameters at test time": embed.count_params(),
        }
    print(f"\n{'':<10}{'seen P@1':>10}{'seen MAP@R':>12}{'unseen P@1':>12}{'unseen MAP@R':>14}"
          f"{'params':>9}")
    for name, r in results.items():
        print(f"{name:<10}{r['seen']['precision_at_1']:>10.3f}{r['seen']['map_at_r']:>12.3f}"
              f"{r['unseen']['precision_at_1']:>12.3f}{r['unseen']['map_at_r']:>14.3f}"
              f"{r['parameters at test time']:>9}")
    return results


if __name__ == "__main__":
    main()
