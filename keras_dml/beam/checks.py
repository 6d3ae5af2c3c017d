"""Checks of the pipeline's arguments that need neither Apache Beam nor TensorFlow.

`keras-dml index` runs them before importing anything heavy, so a mistyped
source or a non-empty output directory fails in a fraction of a second.
"""

from __future__ import annotations

import os

SOURCE_KINDS = ("tfrecord", "images", "tfds")
# What the pipeline writes in `out`; `overwrite` removes these and nothing else.
OUTPUT_ENTRIES = ("index", "embeddings", "dead_letter", "pipeline.json")


def parse_source(spec: str) -> tuple[str, str]:
    """Splits `"tfrecord:GLOB"`, `"images:GLOB"` or `"tfds:NAME:SPLIT"` into `(kind, rest)`.

    Raises:
        ValueError: for another prefix, an empty pattern or a TFDS source
            without a split.

    Example:

    >>> from keras_dml.beam.checks import parse_source
    >>> parse_source("tfds:mnist:test")
    ('tfds', 'mnist:test')
    """
    kind, _, rest = str(spec).partition(":")
    if kind not in SOURCE_KINDS or not rest:
        raise ValueError(
            f"unknown source {spec!r}; use tfrecord:GLOB, images:GLOB or tfds:NAME:SPLIT"
        )
    if kind == "tfds" and (rest.count(":") != 1 or not all(rest.split(":"))):
        raise ValueError(f"a TFDS source is tfds:NAME:SPLIT, e.g. tfds:mnist:test, got {spec!r}")
    return kind, rest


def check_output_dir(out: str, overwrite: bool) -> None:
    """Refuses a non-empty `out` unless `overwrite` and it holds only a previous output.

    A previous output is a directory with `pipeline.json` and nothing but
    `OUTPUT_ENTRIES`; with `overwrite` those entries are replaced, and a
    directory holding anything else is never touched.

    Raises:
        FileExistsError: if `out` is a file, is not empty and `overwrite` is
            False, or holds files this pipeline did not write.
    """
    if os.path.lexists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out} exists and is not a directory")
    if not os.path.isdir(out) or not os.listdir(out):
        return
    if not overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite to replace its index")
    foreign = sorted(set(os.listdir(out)) - set(OUTPUT_ENTRIES))
    if foreign or not os.path.isfile(os.path.join(out, "pipeline.json")):
        what = ", ".join(foreign[:5]) if foreign else "no pipeline.json"
        raise FileExistsError(
            f"{out} does not look like an output of keras-dml index ({what}); "
            "refusing to overwrite it"
        )
