"""`keras-dml`: train an embedding, then evaluate, search and export it, from the shell.

    keras-dml train --dataset digits --loss triplet --epochs 15 --out runs/digits
    keras-dml export runs/digits --tflite int8
    keras-dml search runs/digits --query-index 0 -k 5
    keras-dml evaluate runs/digits
    keras-dml index runs/digits --source "images:photos/*.png" --out gallery --num-shards 4

Errors in what you typed (an unknown dataset or loss, a missing run
directory, a TFDS dataset that is not available offline) print one line,
`keras-dml <command>: error: ...`, and exit with status 2 (usage) or 1.
Arguments are checked before TensorFlow is imported, so mistakes fail fast.
"""

from __future__ import annotations

import argparse
import os
import sys

from keras_dml.cli import registry, rundir
from keras_dml.cli.errors import CommandError
from keras_dml.runs.config import TrainConfig

USAGE_ERROR = 2
RUN_ERROR = 1


class _UsageError(Exception):
    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """Reports usage errors as one line (`<prog>: error: ...`) instead of usage text + exit."""

    def error(self, message):
        raise _UsageError(self.prog, message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _dims(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        dims = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, e.g. 128,256, got {text!r}"
        ) from None
    if any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"dimensions must be positive, got {text!r}")
    return dims


def build_parser() -> argparse.ArgumentParser:
    """The `keras-dml` argument parser with its five subcommands."""
    parser = _Parser(
        prog="keras-dml",
        description="Deep metric learning for Keras 3: train an embedding on a zero-shot split, "
        "evaluate retrieval, search its index, export it for serving and phones.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    losses = ", ".join(registry.LOSSES)
    train = commands.add_parser(
        "train",
        help="train an embedding and write model, SavedModel, TFLite, index, metrics and plots",
        description="Train on the training classes of a zero-shot split and write, in --out: "
        "the .keras model, an embedding SavedModel, a retrieval SavedModel, a TFLite file, a "
        "ScaNN index of the unseen test classes, metrics.json and PNG plots.",
    )
    train.add_argument("--dataset", default="glyphs",
                       help="glyphs (bundled: 589 characters rendered from matplotlib's fonts, "
                       "default), digits (bundled), mnist, caltech_birds2011 (cub), cars196 "
                       "(cars), stanford_online_products (sop); TFDS datasets must be prepared")
    train.add_argument("--loss", default="triplet", help=f"one of: {losses} (default triplet)")
    train.add_argument("--s2sd", action="store_true",
                       help="train with S2SD self-distillation (target heads dropped at test time)")
    train.add_argument("--s2sd-target-dims", type=_dims, default=None, metavar="D1,D2,...",
                       help="S2SD target head widths (default 4x, 8x, 16x the embedding dim)")
    train.add_argument("--distillation-weight", type=float, default=50.0,
                       help="S2SD distillation weight gamma (default 50)")
    train.add_argument("--s2sd-features", action="store_true",
                       help="with --s2sd: also distil from the backbone features (MSDF), "
                       "switched on after an eighth of the training steps")
    train.add_argument("--epochs", type=_positive_int, default=15)
    train.add_argument("--steps-per-epoch", type=_positive_int, default=None,
                       help="default: one pass over the training images")
    train.add_argument("--batch-size", type=_positive_int, default=None,
                       help="images per batch (default 80 on glyphs, digits and MNIST, 64 "
                       "otherwise)")
    train.add_argument("--classes-per-batch", type=_positive_int, default=None,
                       help="P of the P x M class-balanced batches (default: min(classes, 16))")
    train.add_argument("--embedding-dim", type=_positive_int, default=None,
                       help="default 32 for small_conv, 128 for ImageNet backbones")
    train.add_argument("--learning-rate", type=float, default=None,
                       help="Adam learning rate (default 1e-3 for small_conv, 1e-4 otherwise)")
    train.add_argument("--centers-lr-multiplier", type=float, default=10.0,
                       help="margin heads: class centres learn this many times faster")
    train.add_argument("--backbone", default="auto", choices=registry.BACKBONES,
                       help="auto: small_conv for glyphs/digits/MNIST, resnet50 otherwise")
    train.add_argument("--weights", default="imagenet", choices=("imagenet", "none"),
                       help="initial weights of a Keras application backbone")
    train.add_argument("--image-size", type=_positive_int, default=None,
                       help="input side in pixels (default: the backbone's)")
    train.add_argument("--holdout", type=_fraction, default=0.2,
                       help="fraction of the training classes' images held out to measure "
                       "retrieval on seen classes (default 0.2)")
    train.add_argument("--max-images", type=_positive_int, default=None,
                       help="use at most this many images per part (quick trials)")
    train.add_argument("--max-classes", type=_positive_int, default=None,
                       help="glyphs: use this many characters, drawn at random (quick trials)")
    train.add_argument("--data-dir", default=None, help="TFDS data directory")
    train.add_argument("--download", action="store_true",
                       help="let TFDS download and prepare a missing dataset")
    train.add_argument("--projection", default="pca", choices=("pca", "umap", "auto"),
                       help="2-D projection of the embedding plot (umap needs umap-learn)")
    train.add_argument("--seed", type=_non_negative_int, default=0)
    train.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2),
                       help="Keras fit verbosity: 0 silent, 1 progress bar, 2 one line per epoch")
    train.add_argument("--out", required=True, help="directory to write the run to")
    train.set_defaults(handler="train")

    evaluate = commands.add_parser(
        "evaluate",
        help="re-embed the test data, print and save the metrics table and plots",
        description="Embed the run's held-out seen-class images and unseen test classes with "
        "one of its artefacts, write metrics.json (or metrics_<artefact>.json) and the plots, "
        "and print where every artefact is.",
    )
    evaluate.add_argument("run_dir", metavar="DIR", help="a directory written by keras-dml train")
    evaluate.add_argument("--using", default="keras", choices=tuple(rundir.MODEL_FILES),
                          help="the artefact that embeds: keras (default), saved_model, tflite, "
                          "tflite-float16, tflite-int8")
    evaluate.add_argument("--projection", default="pca", choices=("pca", "umap", "auto"))
    evaluate.set_defaults(handler="evaluate")

    search = commands.add_parser(
        "search",
        help="print the nearest neighbours of a test image and save a PNG strip",
        description="Search the run's ScaNN index of the unseen test classes with test image N; "
        "print the neighbours with their labels and save query + neighbours as a PNG.",
    )
    search.add_argument("run_dir", metavar="DIR", help="a directory written by keras-dml train")
    search.add_argument("--query-index", type=_non_negative_int, required=True, metavar="N",
                        help="row of the test set to use as the query")
    search.add_argument("-k", type=_positive_int, default=5, help="neighbours to show (5)")
    search.add_argument("--png", default=None,
                        help="where to save the strip (default DIR/search_N.png)")
    search.set_defaults(handler="search")

    export = commands.add_parser(
        "export",
        help="write a TFLite file (float32, float16 or int8) and refresh the SavedModel",
        description="Export the run's embedding model: a TFLite flatbuffer (int8 calibrated on "
        "training images) and the embedding SavedModel; prints the agreement with Keras.",
    )
    export.add_argument("run_dir", metavar="DIR", help="a directory written by keras-dml train")
    export.add_argument("--tflite", default="float32", choices=("float32", "float16", "int8"),
                        help="TFLite precision (default float32)")
    export.set_defaults(handler="export")

    index = commands.add_parser(
        "index",
        help="embed a gallery on Apache Beam and write one index per shard plus a manifest",
        description="Read items (TFRecords, image files or a TFDS split), embed them with Beam "
        "ML's RunInference, and write in --out: index/ (a ShardedIndex: one ExactIndex or "
        "ScaNNIndex per shard and its manifest), embeddings/ (ids, embeddings, metadata per "
        "shard), dead_letter/ (items that failed, one JSON line each) and pipeline.json. "
        "Needs apache-beam (pip install keras-dml[beam]). Runs on the local runner; "
        "arguments after -- are Beam pipeline options, e.g. -- --runner=DataflowRunner "
        "--project=P --region=R --temp_location=gs://B/tmp.",
    )
    index.add_argument("model", metavar="MODEL",
                       help="a keras-dml run directory (its model.keras), a .keras embedding "
                       "model or an embedding SavedModel directory")
    index.add_argument("--source", required=True,
                       help="tfrecord:GLOB (tf.train.Examples with 'image' and 'id' "
                       "features), images:GLOB (image files; the id is the path) or "
                       "tfds:NAME:SPLIT (a prepared TFDS split)")
    index.add_argument("--out", required=True, help="output directory (new or empty)")
    index.add_argument("--num-shards", type=_positive_int, default=2)
    index.add_argument("--index", default="exact", choices=("exact", "scann"),
                       help="index of each shard (default exact)")
    index.add_argument("--shard-by", default="hash", choices=("hash", "kmeans"),
                       help="hash of the id (default) or nearest k-means centre")
    index.add_argument("--distance", default="dot", choices=("dot", "squared_l2"),
                       help="dot: cosine similarity (default)")
    index.add_argument("--batch-size", type=_positive_int, default=256,
                       help="largest batch RunInference embeds at once (256)")
    index.add_argument("--workers", type=_positive_int, default=None,
                       help="local runner: this many worker processes (Beam's "
                       "direct_num_workers with direct_running_mode=multi_processing; default 1)")
    index.add_argument("--image-feature", default="image",
                       help="TFRecord/TFDS feature holding the image (image)")
    index.add_argument("--id-feature", default="id", help="TFRecord feature holding the id (id)")
    index.add_argument("--data-dir", default=None, help="TFDS data directory")
    index.add_argument("--overwrite", action="store_true",
                       help="replace a previous output of keras-dml index in --out")
    index.set_defaults(handler="index")
    return parser


def _check_run_dir(path: str) -> str:
    if not os.path.isdir(path):
        raise CommandError(f"directory {path!r} does not exist; train first: "
                           f"keras-dml train --out {path}")
    if not os.path.isfile(rundir.RunDir(path).config):
        raise CommandError(f"{path!r} is not a keras-dml run (no config.json); train first: "
                           f"keras-dml train --out {path}")
    return path


def _check_out_dir(path: str) -> None:
    """Refuses an `--out` that training could not write, before hours of training.

    `--out` must be new, empty or a previous run (it has `config.json`), and
    writable (probed by creating a file: permission bits say nothing to root
    or about a read-only mount).
    """
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"--out {path!r} exists and is not a directory")
    if os.path.isdir(path):
        entries = os.listdir(path)
        if entries and not os.path.isfile(rundir.RunDir(path).config):
            raise ValueError(
                f"--out {path!r} is not empty and is not a keras-dml run (no config.json); "
                "choose a new or empty directory, nothing of yours is overwritten"
            )
        probe_dir = path
    else:
        probe_dir = os.path.dirname(os.path.abspath(path))
        while not os.path.isdir(probe_dir):
            probe_dir = os.path.dirname(probe_dir)
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".keras-dml-write-test.", dir=probe_dir)
        os.close(fd)
        os.remove(probe)
    except OSError as error:
        raise ValueError(f"--out {path!r} is not writable ({error.strerror})") from None


def _index_model(path: str) -> str:
    """The model `keras-dml index` embeds with: a run's model.keras, a .keras file, a SavedModel."""
    if os.path.isdir(path) and os.path.isfile(rundir.RunDir(path).config):
        path = rundir.RunDir(path).artefact("keras")
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    if os.path.isfile(path) and path.endswith(".keras"):
        return path
    raise ValueError(f"MODEL {path!r} is not a keras-dml run directory, a .keras file or a "
                     "SavedModel directory")


def _check_index_args(args: argparse.Namespace) -> None:
    import importlib.util

    from keras_dml.beam.checks import check_output_dir, parse_source

    kind, rest = parse_source(args.source)
    if kind in ("tfrecord", "images") and "://" not in rest:
        import glob

        if not glob.glob(rest):
            raise ValueError(f"--source {args.source!r} matches no file")
    args.model = _index_model(args.model)
    try:
        check_output_dir(args.out, args.overwrite)
    except FileExistsError as error:
        raise ValueError(f"--out: {error}") from None
    if importlib.util.find_spec("apache_beam") is None:
        raise ValueError("needs Apache Beam: pip install 'keras-dml[beam]'")


def _validate(args: argparse.Namespace) -> None:
    """Checks names and paths before anything heavy is imported; raises `_UsageError`."""
    prog = f"keras-dml {args.command}"
    try:
        if args.handler == "train":
            args.dataset = registry.canonical_dataset(args.dataset)
            args.loss = registry.canonical_loss(args.loss)
            if args.s2sd_features and not args.s2sd:
                raise ValueError("--s2sd-features needs --s2sd")
            if args.max_classes is not None and args.dataset != "glyphs":
                raise ValueError("--max-classes applies to --dataset glyphs only")
            if args.max_classes is not None and args.max_classes < 2:
                raise ValueError("--max-classes must be at least 2")
            # Every option's type and range, as `train_run` will check them.
            TrainConfig.from_dict({key: value for key, value in vars(args).items()
                                   if key != "handler"})
            _check_out_dir(args.out)
        elif args.handler == "index":
            _check_index_args(args)
        else:
            _check_run_dir(args.run_dir)
    except ValueError as error:
        raise _UsageError(prog, str(error)) from None
    except CommandError as error:
        raise _UsageError(prog, str(error)) from None


def main(argv: list[str] | None = None) -> int:
    """Runs `keras-dml` with `argv` (default `sys.argv[1:]`) and returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    beam_args: list[str] = []
    if "--" in argv:  # `keras-dml index ... -- --runner=...`: Beam's own options
        cut = argv.index("--")
        argv, beam_args = argv[:cut], argv[cut + 1:]
    try:
        args = parser.parse_args(argv)
        if beam_args and args.command != "index":
            raise _UsageError(f"keras-dml {args.command}",
                              "options after -- are Beam pipeline options of keras-dml index")
        args.pipeline_args = beam_args
        _validate(args)
    except _UsageError as error:
        print(f"{error.prog}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    from keras_dml.cli import commands

    prog = f"keras-dml {args.command}"
    handlers = {"train": commands.train, "evaluate": commands.evaluate,
                "search": commands.search, "export": commands.export, "index": commands.index}
    try:
        return handlers[args.handler](args)
    except (CommandError, commands.ExpectedError) as error:
        message = " ".join(str(error).split())
        print(f"{prog}: error: {message}", file=sys.stderr)
        return RUN_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
