"""What `keras-dml train | evaluate | search | export | index` do; `keras_dml.cli.main` calls these.

Each command turns its parsed arguments into a call of the run library
(`keras_dml.runs`: `train_run`, `evaluate_run`, `search_run`, `export_run`)
and prints what it returns. Training, scoring and every file write are the
library's; the library raises `RunError` (`CommandError`), printed by `main`
as one line.
"""

from __future__ import annotations

import os

import keras_dml
from keras_dml.cli.errors import CommandError
from keras_dml.data.tfds import DatasetUnavailableError
from keras_dml.runs import rundir
from keras_dml.runs.config import TrainConfig
from keras_dml.runs.evaluate import evaluate_run
from keras_dml.runs.export import export_run
from keras_dml.runs.metrics import format_metrics_table, transfer_note
from keras_dml.runs.report import format_artefacts
from keras_dml.runs.search import search_run
from keras_dml.runs.train import train_run

keras_dml._load_all()  # registers the losses, heads and layers that saved models name

# Errors whose message is enough for the user; main prints them as one line.
ExpectedError = DatasetUnavailableError


def train_config(args) -> TrainConfig:
    """The `TrainConfig` of `keras-dml train`'s parsed arguments."""
    return TrainConfig.from_dict({key: value for key, value in vars(args).items()
                                  if key != "handler"})


def _print_metrics(metrics: dict) -> None:
    print(format_metrics_table(metrics))
    print(f"({metrics['protocol']})")
    note = transfer_note(metrics)
    if note:
        print(note)


def train(args) -> int:
    """`keras-dml train`: fit, then write model, exports, index, metrics and plots."""
    result = train_run(train_config(args), args.out, log=lambda line: print(line, flush=True))
    print()
    _print_metrics(result.metrics)
    print()
    print(format_artefacts(args.out))
    if result.kept:
        print(f"\nthe previous run in {args.out} held files no run writes; it is kept, whole, in "
              f"{result.kept}")
    print(f"\ndone in {result.seconds:.0f} s")
    return 0


def evaluate(args) -> int:
    """`keras-dml evaluate DIR`: re-embed the run's test data with one artefact and report."""
    result = evaluate_run(args.run_dir, args.using, args.projection)
    print(format_artefacts(args.run_dir))
    print(f"\nretrieval metrics of {result.config.dataset} with the {args.using} artefact "
          f"({rundir.MODEL_FILES[args.using]}):")
    _print_metrics(result.metrics)
    return 0


def search(args) -> int:
    """`keras-dml search DIR --query-index N`: neighbours of test image N, printed and drawn."""
    result = search_run(args.run_dir, args.query_index, args.k, args.png)
    k = result.k
    print(f"query: test image {result.query_index}, label {result.query_label}; {k} nearest of "
          f"{result.index_size} (ScaNN index of the unseen classes, cosine similarity):")
    print(f"{'rank':>4}  {'id':>6}  {'label':>6}  {'similarity':>10}  match")
    for rank, (item, label, score) in enumerate(
            zip(result.ids, result.labels, result.scores, strict=True), start=1):
        match = "yes" if label == result.query_label else "no"
        print(f"{rank:>4}  {item:>6}  {label:>6}  {score:>10.4f}  {match}")
    print(f"precision@{k}: {result.correct / k:.2f}")
    print(f"saved {result.png}")
    return 0


def export(args) -> int:
    """`keras-dml export DIR --tflite int8`: TFLite (+ SavedModel) and agreement with Keras."""
    result = export_run(args.run_dir, args.tflite)
    print(f"wrote {result.path} ({args.tflite}, {result.size_kib:.0f} KiB) and "
          f"{result.saved_model}")
    print(f"TFLite vs Keras embeddings on {len(result.cosine)} test images: cosine similarity "
          f"mean {result.cosine.mean():.4f}, min {result.cosine.min():.4f}")
    print(f"full metrics with this file: keras-dml evaluate {args.run_dir} --using "
          f"{result.artefact}")
    return 0


def index(args) -> int:
    """`keras-dml index`: embeds and indexes a gallery on Apache Beam (`keras_dml.beam`)."""
    from keras_dml.beam.index_pipeline import build_index

    pipeline_args = list(args.pipeline_args or [])
    if args.workers is not None:
        pipeline_args.append(f"--direct_num_workers={args.workers}")
        if not any(arg.startswith("--direct_running_mode") for arg in pipeline_args):
            # Not multi_threading: Beam 2.77 dropped items in that mode (BENCHMARKS.md).
            pipeline_args.append("--direct_running_mode=multi_processing")
    try:
        summary = build_index(
            args.source, args.model, args.out, num_shards=args.num_shards, index=args.index,
            shard_by=args.shard_by, distance=args.distance, batch_size=args.batch_size,
            image_feature=args.image_feature, id_feature=args.id_feature,
            data_dir=args.data_dir, overwrite=args.overwrite, pipeline_args=pipeline_args,
        )
    except (ValueError, FileExistsError) as error:
        raise CommandError(str(error)) from None
    dead = sum(summary[f"dead_letter_{stage}"] for stage in ("decode", "embed", "index"))
    print(f"indexed {summary['indexed']} of {summary['read']} items into "
          f"{args.num_shards} {args.index} shards in {summary['seconds']:.1f} s: "
          f"{os.path.join(args.out, 'index')}")
    if dead:
        print(f"{dead} items failed (decode {summary['dead_letter_decode']}, embed "
              f"{summary['dead_letter_embed']}, index {summary['dead_letter_index']}): "
              f"{os.path.join(args.out, 'dead_letter')}")
    return 0

