"""Learn digit features without labels, stage by stage with LoCo; compare with end-to-end SimCLR.

LoCo (Xiong, Ren & Urtasun, NeurIPS 2020) splits an encoder into stages and
trains each pair of consecutive stages with its own contrastive loss on two
augmented views; consecutive units overlap by one stage, so gradients still
"bridge" the stages while no gradient crosses a unit boundary. Greedy
InfoMax is the same without overlap; end-to-end SimCLR trains all stages
through one loss. All three train the same three-stage conv encoder on the
images of digits 0-4 without their labels, with the same augmentations
(`keras_dml.data.augment.SimCLRAugmentation`) and budget; the encoder's
pooled features are then scored for retrieval on held-out digits 0-4 and on
the unseen digits 5-9, next to raw pixels.

    python examples/loco_digits.py --epochs 30
"""

from __future__ import annotations

import argparse

import keras

from keras_dml.data.digits import load_digits_zero_shot
from keras_dml.evaluation import retrieval_metrics
from keras_dml.models.loco import LoCo

VARIANTS = {
    "loco": {"overlap": 1},  # units (0, 1), (1, 2): stage 1 is shared
    "greedy_infomax": {"overlap": 0},  # one unit per stage, no overlap
    "end_to_end": {"end_to_end": True},  # SimCLR: one loss after the last stage
}


def build_stages() -> list[keras.layers.Layer]:
    """Three stages of a small conv encoder for 8x8 images; the last one pools."""
    return [
        keras.Sequential([keras.layers.Conv2D(32, 3, padding="same", activation="relu")],
                         name="stage_0"),
        keras.Sequential([keras.layers.Conv2D(64, 3, strides=2, padding="same",
                                              activation="relu")], name="stage_1"),
        keras.Sequential([keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
                          keras.layers.GlobalAveragePooling2D()], name="stage_2"),
    ]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--max-images", type=int, default=None,
                        help="train on at most this many images (budget)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")

    data = load_digits_zero_shot(seed=args.seed)
    results = {
        "raw pixels": {
            "seen": retrieval_metrics(data.x_seen.reshape(len(data.x_seen), -1), data.y_seen),
            "unseen": retrieval_metrics(data.x_unseen.reshape(len(data.x_unseen), -1),
                                        data.y_unseen),
        }
    }
    for name in variants:
        print(f"\n== {name}")
        keras.utils.set_random_seed(args.seed)
        model = LoCo(build_stages(), projection_dim=32, **VARIANTS[name])
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        # No labels: each unit's loss is NT-Xent on two augmented views of the batch.
        model.fit(data.x_train[: args.max_images], batch_size=args.batch_size,
                  epochs=args.epochs, shuffle=True, verbose=2)
        encoder = model.encoder()
        results[name] = {
            "seen": retrieval_metrics(encoder.predict(data.x_seen, verbose=0), data.y_seen),
            "unseen": retrieval_metrics(encoder.predict(data.x_unseen, verbose=0),
                                        data.y_unseen),
        }
    print(f"\n{'':<16}{'seen P@1':>10}{'seen MAP@R':>12}{'unseen P@1':>12}{'unseen MAP@R':>14}")
    for name, r in results.items():
        print(f"{name:<16}{r['seen']['precision_at_1']:>10.3f}{r['seen']['map_at_r']:>12.3f}"
              f"{r['unseen']['precision_at_1']:>12.3f}{r['unseen']['map_at_r']:>14.3f}")
    return results


if __name__ == "__main__":
    main()
