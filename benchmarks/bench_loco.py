"""LoCo vs Greedy InfoMax vs end-to-end SimCLR on digits: step memory and time, linear probe.

Part 1 (memory): the peak memory of one training step by TensorFlow's own
allocator statistics (`tf.config.experimental.get_memory_info`, which counts
every tensor, on CPU too), minus what was in use just before the step
(weights, optimizer slots, constants such as the loss's masks folded into the
graph): that difference is the step's activations, gradients and
temporaries. Each (layout, batch size, method) runs in a fresh process. The
encoder has 6 stages of two 3x3 conv-BN-ReLU at resolutions 8, 8, 4, 4, 2, 2
(the last one pooled), as the 6 stages of the paper's PResNet-50, in two
layouts:

- `pyramid`: 32, 32, 64, 64, 128, 128 channels (channels double as the
  resolution halves, as in ResNet-50): the first stages hold most of the
  activations, as ResNet-50's do in the paper (LoCo: 1.28x less memory);
- `balanced`: 16, 16, 64, 64, 256, 256 channels (x4 as the resolution
  halves): every stage holds the same activations, as in PResNet-50
  (LoCo: 2.76x less).

The `shares` line gives each stage's fraction of the encoder's layer
outputs: GIM's peak is about its largest stage, LoCo's its largest pair of
stages, end-to-end all of them; each local unit adds its decoder and its
loss, whose (2N, 2N) similarity matrices grow with the square of the batch.

Part 2 (quality): the three methods on the `pyramid` stages at half width,
trained self-supervised (no labels) for the same number of epochs on 80% of
the digits, for several seeds. The frozen encoder's pooled output is scored
on the held-out 20%: accuracy of a logistic-regression probe fit on the
training features, and MAP@R (cosine, leave-one-out) of the held-out
features. `random init` is the untrained encoder.

    python benchmarks/bench_loco.py                  # full run, ~10 min on 2 cores
    python benchmarks/bench_loco.py --quick          # smoke run, 2-3 min
    python benchmarks/bench_loco.py --part memory --batch-sizes 256 1024 4096
    python benchmarks/bench_loco.py --part memory --layouts conv32 resnet18 \
        --decoder-block resnet    # the cost of the ResNet decoder block
    python benchmarks/bench_loco.py --part profile --layouts conv32 resnet18 \
        --image-batch-sizes 128   # each unit's peak on its own, and what stays alive
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

METHODS = {
    "end-to-end": {"end_to_end": True},
    "GIM": {"overlap": 0},
    "LoCo": {"overlap": 1},
}
# Channels of the 6 stages; stages work at resolution 8, 8, 4, 4, 2, 2.
LAYOUTS = {
    "pyramid": (32, 32, 64, 64, 128, 128),
    "balanced": (16, 16, 64, 64, 256, 256),
}
STRIDES = (1, 1, 2, 1, 2, 1)
# 32x32x3 layouts (issue 13): memory only, random images.
IMAGE_LAYOUTS = ("conv32", "resnet18", "resnet18x8")


def build_image_stages(layout: str):
    """Four stages for 32x32x3 images, the last one pooled.

    - `conv32`: each stage two 3x3 Conv2D + ReLU, channels 64 / 96 / 128 / 192,
      strides 1 / 2 / 2 / 2 (stage 0 holds about 65% of the activations).
    - `resnet18`: a 3x3 stem then 4 stages of 2 basic blocks (conv-BN-ReLU,
      conv-BN, shortcut, ReLU), 64 / 128 / 256 / 512 channels at 32 / 16 / 8 / 4
      pixels: ResNet-18 as used on CIFAR.
    - `resnet18x8`: the same network cut into 8 stages of one basic block each
      (the stem goes with the first), so that a LoCo unit spans two blocks.
    """
    import keras

    if layout == "conv32":
        stages = []
        for channels, stride in zip((64, 96, 128, 192), (1, 2, 2, 2), strict=True):
            stages.append(keras.Sequential([
                keras.layers.Conv2D(channels, 3, strides=stride, padding="same",
                                    activation="relu"),
                keras.layers.Conv2D(channels, 3, padding="same", activation="relu"),
            ]))
        stages[-1].add(keras.layers.GlobalAveragePooling2D())
        return stages

    def basic_block(x, filters, stride):
        y = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
        y = keras.layers.ReLU()(keras.layers.BatchNormalization()(y))
        y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
        y = keras.layers.BatchNormalization()(y)
        if stride != 1 or x.shape[-1] != filters:
            x = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False)(x)
            x = keras.layers.BatchNormalization()(x)
        return keras.layers.ReLU()(keras.layers.Add()([x, y]))

    blocks = [(f, s) for f, s in zip((64, 128, 256, 512), (1, 2, 2, 2), strict=True)
              for s in (s, 1)]
    per_stage = 1 if layout == "resnet18x8" else 2
    stages, shape = [], (32, 32, 3)
    for i in range(0, len(blocks), per_stage):
        inputs = keras.Input(shape)
        x = inputs
        if i == 0:
            x = keras.layers.Conv2D(64, 3, padding="same", use_bias=False)(x)
            x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
        for filters, stride in blocks[i:i + per_stage]:
            x = basic_block(x, filters, stride)
        if i + per_stage == len(blocks):
            x = keras.layers.GlobalAveragePooling2D()(x)
        stages.append(keras.Model(inputs, x, name=f"stage_{len(stages)}"))
        shape = tuple(x.shape[1:])
    return stages


def build_stages(layout: str, width: float = 1.0):
    """Six stages of two 3x3 conv-BN-ReLU for 8x8x1 images, the last one pooled.

    `width` scales every stage's channels.
    """
    import keras

    def conv_bn_relu(filters, strides=1):
        return [
            keras.layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False),
            # Short runs: moving statistics must settle within a few hundred steps.
            keras.layers.BatchNormalization(momentum=0.9),
            keras.layers.ReLU(),
        ]

    stages = []
    for i, channels in enumerate(LAYOUTS[layout]):
        filters = max(1, round(channels * width))
        layers = conv_bn_relu(filters, strides=STRIDES[i]) + conv_bn_relu(filters)
        if i == len(LAYOUTS[layout]) - 1:
            layers.append(keras.layers.GlobalAveragePooling2D())
        stages.append(keras.Sequential(layers, name=f"stage_{i}"))
    return stages


def build_model(method: str, layout: str, seed: int, temperature: float, projection_dim: int,
                width: float = 1.0, decoder_block: str = "downsample"):
    import keras

    from keras_dml.data.augment import SimCLRAugmentation
    from keras_dml.models.loco import LoCo

    keras.utils.set_random_seed(seed)
    stages = (build_image_stages(layout) if layout in IMAGE_LAYOUTS
              else build_stages(layout, width))
    return LoCo(
        stages,
        temperature=temperature,
        augment=SimCLRAugmentation(seed=seed),
        projection_dim=projection_dim,
        decoder_block=decoder_block,
        **METHODS[method],
    )


def stage_shares(layout: str) -> list[float]:
    """Each stage's fraction of the per-image floats output by all encoder layers."""
    import keras

    sizes = []
    image = layout in IMAGE_LAYOUTS
    x = keras.KerasTensor((1, 32, 32, 3) if image else (1, 8, 8, 1))
    for stage in build_image_stages(layout) if image else build_stages(layout):
        total = 0
        if isinstance(stage, keras.Sequential):
            for layer in stage.layers:
                x = layer(x)
                total += _numel(x.shape)
        else:  # functional: every layer's output once
            for layer in stage.layers[1:]:
                total += _numel(layer.output.shape)
            x = stage(x)
        sizes.append(total)
    return [s / sum(sizes) for s in sizes]


def _numel(shape) -> int:
    n = 1
    for d in shape[1:]:
        n *= int(d)
    return n


def load_split(seed: int = 0):
    """Digits as (8, 8, 1) images in [0, 1], split 80/20 per class: (train, held out)."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    held_out = np.random.default_rng(seed).random(len(y)) < 0.2
    return (x[~held_out], y[~held_out]), (x[held_out], y[held_out])


def memory_worker(args) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    if args.layout in IMAGE_LAYOUTS:
        x = np.random.default_rng(0).random((args.batch, 32, 32, 3)).astype("float32")
    else:
        (x_train, _), _ = load_split(0)
        x = np.resize(x_train, (args.batch, 8, 8, 1))
    model = build_model(args.method, args.layout, 0, args.temperature, args.projection_dim,
                        decoder_block=args.decoder_block)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.train_on_batch(x)  # trace, build the optimizer, first run
    times, peaks = [], []
    for _ in range(args.steps):
        in_use = tf.config.experimental.get_memory_info("CPU:0")["current"]
        tf.config.experimental.reset_memory_stats("CPU:0")
        start = time.perf_counter()
        model.train_on_batch(x)  # returns NumPy logs, so the step has finished
        times.append(time.perf_counter() - start)
        peaks.append(tf.config.experimental.get_memory_info("CPU:0")["peak"] - in_use)
    return {
        "layout": args.layout,
        "decoder_block": args.decoder_block,
        "method": args.method,
        "batch": args.batch,
        "units": len(model.unit_stages),
        "params": model.count_params(),
        "in_use_mb": in_use / 2**20,
        # The executor's op order varies from step to step, and the peak with it (about
        # +-10% for the local methods): report the median step and keep the range.
        "step_peak_mb": float(np.median(peaks)) / 2**20,
        "step_peak_range_mb": [min(peaks) / 2**20, max(peaks) / 2**20],
        "step_ms": 1000 * float(np.median(times)),
    }


def profile_worker(args) -> dict:
    """Per-unit memory profile: each unit's forward, then forward + backward, on its own.

    Every unit runs as its own `tf.function` from the previous unit's output, as the
    train step does; for each, TensorFlow's allocator peak above what was in use before
    it, and what is still alive after it (its handoff to the next unit and gradients).
    """
    import keras
    import numpy as np
    import tensorflow as tf

    x = np.random.default_rng(0).random((args.batch, 32, 32, 3)).astype("float32")
    model = build_model(args.method, args.layout, 0, args.temperature, args.projection_dim,
                        decoder_block=args.decoder_block)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.train_on_batch(x)

    def measure(function, *inputs):
        function(*inputs)  # trace
        in_use = tf.config.experimental.get_memory_info("CPU:0")["current"]
        tf.config.experimental.reset_memory_stats("CPU:0")
        out = function(*inputs)
        info = tf.config.experimental.get_memory_info("CPU:0")
        return (info["peak"] - in_use) / 2**20, (info["current"] - in_use) / 2**20, out

    inputs = tf.function(lambda x: model._views(x))(x)
    units = []
    for k in range(len(model.unit_stages)):
        forward = tf.function(
            lambda inputs, k=k: model._unit_forward(k, inputs, None, training=True)[1])
        both = tf.function(lambda inputs, k=k: model._unit_gradients(k, inputs, None))
        forward_peak, _, _ = measure(forward, inputs)
        peak, alive, (_, handoff, _) = measure(both, inputs)
        units.append({"unit": list(model.unit_stages[k]), "forward_peak_mb": forward_peak,
                      "forward_backward_peak_mb": peak, "alive_after_mb": alive})
        inputs = handoff
    return {"layout": args.layout, "method": args.method, "batch": args.batch,
            "decoder_block": args.decoder_block, "units": units}


def _run_worker(args, layout: str, method: str, batch: int, extra: list[str]):
    """Runs one measurement in a fresh process: its JSON row, or the last line of its error."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    cmd = [sys.executable, __file__, "--worker", *extra, "--layout", layout,
           "--method", method, "--batch", str(batch), "--temperature", str(args.temperature),
           "--projection-dim", str(args.projection_dim), "--decoder-block", args.decoder_block]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["?"])[-1][:80]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_profile(args) -> list[dict]:
    rows = []
    batch = args.image_batch_sizes[0]
    print(f"\n## Per-unit profile, batch {batch}, decoder block {args.decoder_block!r}: each "
          "unit alone (forward; forward + backward), and what is alive after it")
    print("| layout | method | unit (stages) | forward peak MB | fwd+bwd peak MB "
          "| alive after MB |")
    print("|---|---|---|---|---|---|")
    for layout in [lay for lay in args.layouts if lay in IMAGE_LAYOUTS]:
        for method in args.methods:
            row = _run_worker(args, layout, method, batch, ["--profile"])
            if isinstance(row, str):
                print(f"| {layout} | {method} | failed: {row} |")
                continue
            rows.append(row)
            for unit in row["units"]:
                print(f"| {layout} | {method} | {tuple(unit['unit'])} "
                      f"| {unit['forward_peak_mb']:.1f} | {unit['forward_backward_peak_mb']:.1f} "
                      f"| {unit['alive_after_mb']:.1f} |", flush=True)
    return rows


def run_memory(args) -> list[dict]:
    rows = []
    print(f"\n## Part 1: one training step (each image gives 2 views), median of {args.steps} "
          "steps after a warm-up step, for both memory and time")
    for layout in args.layouts:
        shares = ", ".join(f"{s:.2f}" for s in stage_shares(layout))
        what = "32x32x3 images" if layout in IMAGE_LAYOUTS else f"channels {LAYOUTS[layout]}"
        print(f"\n{layout} ({what}), decoder block {args.decoder_block!r}, stage shares of "
              f"layer outputs: {shares}")
        print(f"| {'method':<10} | {'batch':>5} | {'units':>5} | {'params':>9} "
              f"| {'in use before MB':>16} | {'step peak MB':>12} | {'vs end-to-end':>13} "
              f"| {'step ms':>8} |")
        print(f"|{'-' * 12}|{'-' * 7}|{'-' * 7}|{'-' * 11}|{'-' * 18}|{'-' * 14}|{'-' * 15}"
              f"|{'-' * 10}|")
        batch_sizes = args.image_batch_sizes if layout in IMAGE_LAYOUTS else args.batch_sizes
        for batch, method in [(b, m) for b in batch_sizes for m in args.methods]:
            if method == args.methods[0]:
                baseline = None
            row = _run_worker(args, layout, method, batch, ["--steps", str(args.steps)])
            if isinstance(row, str):
                print(f"| {method:<10} | {batch:>5} | failed: {row}")
                continue
            rows.append(row)
            if method == "end-to-end":
                baseline = row["step_peak_mb"]
            ratio = f"{baseline / row['step_peak_mb']:.2f}x less" if baseline else "-"
            print(f"| {method:<10} | {batch:>5} | {row['units']:>5} | {row['params']:>9,} "
                  f"| {row['in_use_mb']:>16.1f} | {row['step_peak_mb']:>12.1f} | {ratio:>13} "
                  f"| {row['step_ms']:>8.0f} |", flush=True)
    return rows


def probe(method: str | None, seed: int, args, data) -> dict:
    """Pretrains (unless `method` is None) and scores the frozen encoder on the held-out split."""
    import keras
    import numpy as np
    import tensorflow as tf
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from keras_dml.evaluation import retrieval_metrics

    (x_train, y_train), (x_test, y_test) = data
    keras.backend.clear_session()
    model = build_model(method or "LoCo", "pyramid", seed, args.temperature, args.projection_dim,
                        args.width)
    model.build((None, 8, 8, 1))
    start = time.perf_counter()
    if method is not None:
        model.compile(optimizer=keras.optimizers.Adam(args.learning_rate))
        # Full batches only: a smaller last batch would retrace the train step.
        dataset = (
            tf.data.Dataset.from_tensor_slices(x_train)
            .shuffle(len(x_train), seed=seed)
            .batch(args.train_batch_size, drop_remainder=True)
        )
        model.fit(dataset, epochs=args.epochs, shuffle=False, verbose=0)
    seconds = time.perf_counter() - start
    encoder = model.encoder()
    f_train = encoder.predict(x_train, batch_size=512, verbose=0)
    f_test = encoder.predict(x_test, batch_size=512, verbose=0)
    scaler = StandardScaler().fit(f_train)
    classifier = LogisticRegression(max_iter=3000).fit(scaler.transform(f_train), y_train)
    accuracy = float(np.mean(classifier.predict(scaler.transform(f_test)) == y_test))
    map_at_r = retrieval_metrics(f_test, y_test, nmi=False)["map_at_r"]
    return {"method": method or "random init", "seed": seed, "accuracy": accuracy,
            "map_at_r": map_at_r, "train_s": seconds}


def run_probe(args) -> list[dict]:
    import numpy as np

    data = load_split(0)
    print(f"\n## Part 2: linear probe on held-out digits ({len(data[1][0])} images; "
          f"{len(data[0][0])} for pretraining), pyramid stages, {args.epochs} epochs, "
          f"batch {args.train_batch_size}, seeds {args.seeds}")
    rows = []
    for method in [None, *args.methods]:
        runs = [probe(method, seed, args, data) for seed in args.seeds]
        rows.extend(runs)
        acc = np.array([r["accuracy"] for r in runs])
        mapr = np.array([r["map_at_r"] for r in runs])
        seconds = np.mean([r["train_s"] for r in runs])
        print(f"| {runs[0]['method']:<11} | probe accuracy {acc.mean():.3f} ± {acc.std():.3f} "
              f"| MAP@R {mapr.mean():.3f} ± {mapr.std():.3f} | {seconds:>5.0f} s/run |",
              flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["memory", "profile", "probe", "all"], default="all")
    parser.add_argument("--quick", action="store_true",
                        help="small settings to check that everything runs")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--layouts", nargs="*", default=[*LAYOUTS, *IMAGE_LAYOUTS],
                        choices=[*LAYOUTS, *IMAGE_LAYOUTS])
    parser.add_argument("--decoder-block", default="downsample",
                        choices=["downsample", "resnet", "none"],
                        help="LoCoDecoder block of every unit")
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[256, 1024],
                        help="memory part: images per step (each gives 2 views)")
    parser.add_argument("--image-batch-sizes", nargs="*", type=int, default=[128, 256, 512],
                        help="memory part, 32x32 layouts: images per step")
    parser.add_argument("--steps", type=int, default=5,
                        help="memory part: measured steps (median memory and time)")
    parser.add_argument("--epochs", type=int, default=40, help="probe part: pretraining epochs")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--train-batch-size", type=int, default=256)
    parser.add_argument("--width", type=float, default=0.5,
                        help="probe part: channel multiplier of the pyramid stages")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--projection-dim", type=int, default=64)
    parser.add_argument("--json", help="also write all rows to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", default="pyramid", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="LoCo", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=256, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(profile_worker(args) if args.profile else memory_worker(args)))
        return
    if args.quick:
        args.layouts, args.batch_sizes, args.steps = ["pyramid"], [256], 1
        args.epochs, args.seeds = 2, [0]

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    start = time.time()
    print(f"# machine: {platform.machine()} {os.cpu_count()} CPUs, python "
          f"{platform.python_version()}; temperature {args.temperature}, "
          f"projection {args.projection_dim}")
    results = {}
    if args.part in ("memory", "all"):
        results["memory"] = run_memory(args)
    if args.part == "profile":
        results["profile"] = run_profile(args)
    if args.part in ("probe", "all"):
        results["probe"] = run_probe(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(f"\ndone in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
