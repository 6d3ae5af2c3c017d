"""Export an embedding model to TFLite (float32, float16, int8) and check each file on-device style.

For every precision the script writes a `.tflite` file with
`keras_dml.export.export_tflite`, runs it with LiteRT's interpreter
(`ai_edge_litert`, the runtime phones use), and reports the file size, the
latency of one image, the cosine agreement of its embeddings with the Keras
model's, and retrieval quality (MAP@R) on the unseen digits 5-9. int8 is
calibrated on a few hundred training images.

    python examples/tflite_edge.py --epochs 10
    python examples/tflite_edge.py --run runs/demo     # a keras-dml train output
"""

from __future__ import annotations

import argparse
import os
import time

import keras
import numpy as np

import keras_dml
from keras_dml.data.digits import load_digits_zero_shot
from keras_dml.evaluation import retrieval_metrics
from keras_dml.export import export_tflite


def embedding_model(run_dir: str | None, data, epochs: int, seed: int) -> keras.Model:
    """The embedding model of a `keras-dml train` run, or a small one trained here."""
    if run_dir:
        return keras.saving.load_model(os.path.join(run_dir, "embedding.keras"), compile=False)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras_dml.layers.MetricEmbedding(32),
    ])
    model.compile(optimizer="adam", loss=keras_dml.TripletLoss(margin=0.2))
    model.fit(data.x_train, data.y_train, batch_size=128, epochs=epochs, shuffle=True, verbose=2)
    return model


class LiteRTEmbedder:
    """Runs a `.tflite` embedding model with LiteRT, resizing the batch as needed."""

    def __init__(self, path: str):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=path)
        self.input = self.interpreter.get_input_details()[0]["index"]
        self.output = self.interpreter.get_output_details()[0]["index"]
        self.shape = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.shape != self.shape:
            self.interpreter.resize_tensor_input(self.input, list(batch.shape))
            self.interpreter.allocate_tensors()
            self.shape = batch.shape
        self.interpreter.set_tensor(self.input, batch)
        self.interpreter.invoke()
        return np.array(self.interpreter.get_tensor(self.output))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a keras-dml train output directory")
    parser.add_argument("--epochs", type=int, default=10, help="when training here")
    parser.add_argument("--timing-runs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/tflite_edge")
    args = parser.parse_args(argv)

    data = load_digits_zero_shot(seed=args.seed)
    embedder = embedding_model(args.run, data, args.epochs, args.seed)
    reference = embedder.predict(data.x_unseen, verbose=0)
    keras_map = retrieval_metrics(reference, data.y_unseen, nmi=False)["map_at_r"]
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for precision in ("float32", "float16", "int8"):
        path = os.path.join(args.out, f"embedding_{precision}.tflite")
        export_tflite(embedder, path, quantization=None if precision == "float32" else precision,
                      representative_data=data.x_train[:300] if precision == "int8" else None)
        run = LiteRTEmbedder(path)
        embeddings = run(data.x_unseen)
        cosine = np.sum(embeddings * reference, axis=1) / np.maximum(
            np.linalg.norm(embeddings, axis=1) * np.linalg.norm(reference, axis=1), 1e-12)
        one = data.x_unseen[:1]
        run(one)  # warm-up at batch size 1
        start = time.perf_counter()
        for _ in range(args.timing_runs):
            run(one)
        latency = (time.perf_counter() - start) / args.timing_runs * 1e3
        results[precision] = {
            "kib": os.path.getsize(path) / 1024,
            "ms_per_image": latency,
            "mean_cosine_to_keras": float(cosine.mean()),
            "map_at_r": retrieval_metrics(embeddings, data.y_unseen, nmi=False)["map_at_r"],
        }
    print(f"\n{'':<9}{'KiB':>8}{'ms/image':>10}{'cos to Keras':>14}{'MAP@R':>8}   "
          f"(Keras MAP@R {keras_map:.3f}, unseen digits 5-9)")
    for precision, r in results.items():
        print(f"{precision:<9}{r['kib']:>8.0f}{r['ms_per_image']:>10.3f}"
              f"{r['mean_cosine_to_keras']:>14.4f}{r['map_at_r']:>8.3f}")
    return results


if __name__ == "__main__":
    main()
