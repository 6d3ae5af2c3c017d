"""How large is the noise floor of an S2SD-vs-baseline comparison? Paired controls.

Every run of a seed starts from the same backbone and f weights and sees the
same batches (`bench_s2sd.py --paired`), so a per-seed difference comes from
the method. Variants:

- `baseline`: backbone + f with the metric loss alone;
- `baseline_half`: the same with the loss multiplied by 1/2. Mathematically
  the same optimum, and under Adam nearly the same updates (Adam divides the
  gradient by its running scale, up to its epsilon): how much a perturbation
  that should change nothing moves MAP@R here, i.e. the noise floor;
- `MSD`: S2SD's defaults (4 target heads, gamma 50, the KL into f only; the
  target heads' routing from `--targets-into-backbone`, default auto);
- `MSD_w1`: the same with f's metric loss weighted 1 instead of S2SD's 1/2.

Prints each run and a summary: mean ± std MAP@R on the unseen classes, and
the mean ± std per-seed difference to the baseline.

    python benchmarks/s2sd_paired_controls.py --backbone dense128 --seeds 10
    python benchmarks/s2sd_paired_controls.py --backbone dense128 --seeds 2 --variants baseline MSD
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_s2sd as bench  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

import keras_dml  # noqa: E402
from keras_dml.models import S2SD  # noqa: E402

VARIANTS = ("baseline", "baseline_half", "MSD", "MSD_w1")


class HalfLoss(keras.losses.Loss):
    """The benchmark's metric loss times 1/2."""

    def __init__(self, name: str):
        super().__init__()
        self.inner = bench.make_loss(name)

    def call(self, y_true, y_pred):
        return 0.5 * self.inner(y_true, y_pred)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="dense128",
                        choices=["trunk", "dense128", "conv1d", "glyphconv", "glyphgap"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None,
                        help="default: 20 (digits), 15 (signals), 3 (glyphs)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--targets-into-backbone", choices=["auto", "true", "false"],
                        default="auto", help="MSD's routing of the target heads (S2SD's default: "
                        "auto)")
    args = parser.parse_args(argv)
    dataset = {"conv1d": "signals", "glyphconv": "glyphs", "glyphgap": "glyphs"}.get(
        args.backbone, "digits")
    config = argparse.Namespace(
        backbone=args.backbone, embedding_dim=32, batch_size=128,
        epochs=args.epochs or {"digits": 20, "signals": 15, "glyphs": 3}[dataset],
        learning_rate=1e-3, loss="multi_similarity", eval_every=0, paired=True,
        samples_per_class=4 if dataset == "glyphs" else 0,
        target_dims=[128, 256, 384, 512], temperature=1.0, feature_delay=20,
        distillation_into_backbone=False, targets_into_backbone=args.targets_into_backbone,
    )
    data = {"digits": bench.load_digits_zero_shot,
            "signals": lambda: bench.load_signals_zero_shot(400),
            "glyphs": bench.load_glyphs}[dataset]()
    make_loss, total_loss = bench.make_loss, S2SD._total_loss

    def total_with_f_weighted_one(model, terms):
        return total_loss(model, terms) + 0.5 * ops.cast(terms["base_loss"], "float32")

    seeds = range(args.first_seed, args.first_seed + args.seeds)
    print(f"{dataset}, φ {args.backbone}, {config.epochs} epochs, seeds {list(seeds)}, "
          f"keras {keras.__version__} ({keras.backend.backend()}), keras-dml "
          f"{keras_dml.__version__}")
    results: dict[str, list[float]] = {}
    try:
        for variant in ["baseline", *[v for v in args.variants if v != "baseline"]]:
            bench.make_loss = HalfLoss if variant == "baseline_half" else make_loss
            S2SD._total_loss = total_with_f_weighted_one if variant == "MSD_w1" else total_loss
            name = {"baseline_half": "baseline", "MSD_w1": "MSD"}.get(variant, variant)
            for seed in seeds:
                value = bench.run(name, 50.0, seed, config, data)["map_at_r"]
                results.setdefault(variant, []).append(value)
                print(f"  {variant:<14} seed {seed}: MAP@R {value:.4f}", flush=True)
    finally:
        bench.make_loss, S2SD._total_loss = make_loss, total_loss
    base = np.array(results["baseline"])
    print("\n| variant | MAP@R | Δ vs baseline (per seed) | seeds ≥ baseline |")
    print("|---|---|---|---|")
    for variant, values in results.items():
        delta = np.array(values) - base
        print(f"| {variant} | {np.mean(values):.3f} ± {np.std(values):.3f} | "
              f"{delta.mean():+.3f} ± {delta.std():.3f} | {(delta >= 0).sum()}/{len(delta)} |")


if __name__ == "__main__":
    main()
