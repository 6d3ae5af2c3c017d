"""A run directory's integrity: written whole, every artefact stamped with its run id.

`keras-dml train --out DIR` writes the whole run into a hidden sibling
(`.DIR.partial-*`), flushes it, then swaps it with `DIR` in one rename
(`keras_dml._atomic`): an interruption leaves the previous run or the new
one, never a mix. The previous run is then removed file by file; a file
that no run writes (yours) is never deleted: the previous run's directory is
kept beside `DIR` instead.

Every run has a run id (`config.json`'s `run_id`, a uuid4). Each artefact
carries it, so that one from another run (a stale `embedding_int8.tflite`,
an `embedding.keras` copied from elsewhere) is refused rather than used:

| artefact | where the run id is |
| --- | --- |
| `model.keras`, `embedding.keras` | an entry `keras_dml_run_id` in the `.keras` zip |
| `saved_model/`, `retrieval_model/` | `assets.extra/run_id` (TensorFlow never loads that folder) |
| `*.tflite` | a sidecar `<file>.run_id` |
| `index/` | `info.run_id` in the checksummed `index.json` |
| `metrics*.json` | a `run_id` field |

Runs written before run ids existed (no `run_id` in `config.json`) are not
checked. Reading a half-written run raises `RunError` naming the file.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from keras_dml._atomic import (
    fsync_tree,
    make_staging,
    remove_stale_staging,
    swap_into_place,
    write_text,
)
from keras_dml.runs.errors import RunError

if TYPE_CHECKING:
    from keras_dml.runs.config import TrainConfig

# Every file a run writes, by role: the one table of run-file names.
RUN_FILES = {
    "config": "config.json",
    "model": "model.keras",
    "embedding": "embedding.keras",
    "saved_model": "saved_model",
    "retrieval_model": "retrieval_model",
    "tflite": "embedding.tflite",
    "tflite_float16": "embedding_float16.tflite",
    "tflite_int8": "embedding_int8.tflite",
    "index": "index",
    "metrics": "metrics.json",
    "history": "history.json",
    "test_labels": "test_labels.npy",
    "test_thumbnails": "test_thumbnails.npy",
    "embeddings_2d": "embeddings_2d.png",
    "retrieval_plot": "retrieval.png",
    "distances_plot": "distances.png",
    "training_curves": "training_curves.png",
    "projector": "projector",
}
# The artefacts that embed, by the name `evaluate --using` takes.
MODEL_FILES = {
    "keras": RUN_FILES["embedding"],
    "saved_model": RUN_FILES["saved_model"],
    "tflite": RUN_FILES["tflite"],
    "tflite-float16": RUN_FILES["tflite_float16"],
    "tflite-int8": RUN_FILES["tflite_int8"],
}
CONFIG_FILE = RUN_FILES["config"]
KERAS_ENTRY = "keras_dml_run_id"
SAVED_MODEL_STAMP = os.path.join("assets.extra", "run_id")
SIDECAR_SUFFIX = ".run_id"
# Every name a run (train, evaluate, search, export) writes in its directory: the
# table above, metrics of other artefacts, search strips and TFLite run-id sidecars.
RUN_FILE_PATTERNS = (
    *RUN_FILES.values(), "metrics_*.json", "search_*.png", "*.tflite" + SIDECAR_SUFFIX,
)
# What `config.json` must hold to rebuild the run's data.
REQUIRED_CONFIG = ("dataset", "holdout", "seed")


class RunDir:
    """A run directory: the path of every file a run writes, named from `RUN_FILES`.

    `RunDir(path).metrics` is `path/metrics.json`, `.artefact("tflite-int8")`
    the int8 TFLite file, and so on; no other module spells a run-file name.

    Example:

    >>> from keras_dml.runs import RunDir
    >>> run = RunDir("runs/digits")
    >>> run.metrics, run.artefact("tflite-int8"), run.metrics_for("tflite")
    ('runs/digits/metrics.json', 'runs/digits/embedding_int8.tflite', \
'runs/digits/metrics_tflite.json')
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)

    def __repr__(self) -> str:
        return f"RunDir({self.path!r})"

    def file(self, role: str) -> str:
        """The path of the file of `role` (a key of `RUN_FILES`)."""
        return os.path.join(self.path, RUN_FILES[role])

    def artefact(self, using: str) -> str:
        """The path of the artefact `evaluate --using` calls `using` (a key of `MODEL_FILES`)."""
        return os.path.join(self.path, MODEL_FILES[using])

    def metrics_for(self, using: str = "keras") -> str:
        """`metrics.json` for the Keras model, `metrics_<using>.json` for another artefact."""
        name = RUN_FILES["metrics"] if using == "keras" else f"metrics_{using}.json"
        return os.path.join(self.path, name)

    def search_png(self, query_index: int) -> str:
        return os.path.join(self.path, f"search_{query_index}.png")

    def read_config(self) -> dict:
        """`config.json` as written, a dict; `RunError` if missing, truncated or incomplete."""
        return read_config(self.path)

    def train_config(self) -> TrainConfig:
        """`config.json` as a `TrainConfig`; `RunError` naming the file if it is not one."""
        from keras_dml.runs.config import TrainConfig

        try:
            return TrainConfig.from_dict(self.read_config())
        except ValueError as error:
            raise RunError(f"{self.config} is not a train config ({error}); run keras-dml "
                           "train again") from None


def _role_path(role: str) -> property:
    return property(lambda self: self.file(role), doc=f"`{RUN_FILES[role]}` of the run.")


for _role in RUN_FILES:
    setattr(RunDir, _role, _role_path(_role))
del _role


def new_run_id() -> str:
    return uuid.uuid4().hex


# -- stamps --------------------------------------------------------------------------


def stamp(path: str, run_id: str) -> None:
    """Records `run_id` in or beside the artefact at `path` (see the module's table)."""
    if path.endswith(".keras"):
        with zipfile.ZipFile(path, "a") as archive:
            archive.writestr(KERAS_ENTRY, run_id)
    elif os.path.isdir(path):
        os.makedirs(os.path.dirname(os.path.join(path, SAVED_MODEL_STAMP)), exist_ok=True)
        _write_text(os.path.join(path, SAVED_MODEL_STAMP), run_id)
    else:
        _write_text(path + SIDECAR_SUFFIX, run_id)


def read_stamp(path: str) -> str | None:
    """The run id recorded for the artefact at `path`, None if it has none.

    Raises:
        RunError: if a `.keras` file is not a complete zip archive.
    """
    if path.endswith(".keras"):
        try:
            with zipfile.ZipFile(path) as archive:
                if KERAS_ENTRY not in archive.namelist():
                    return None
                return archive.read(KERAS_ENTRY).decode().strip()
        except (zipfile.BadZipFile, EOFError, OSError) as error:
            raise RunError(
                f"{path} is truncated or corrupt (not a complete .keras archive: {error}); "
                "the run is incomplete: run keras-dml train again") from None
    if os.path.isdir(path):
        stamp_path = os.path.join(path, SAVED_MODEL_STAMP)
    else:
        stamp_path = path + SIDECAR_SUFFIX
    if not os.path.isfile(stamp_path):
        return None
    with open(stamp_path, encoding="utf-8", errors="replace") as f:
        return f.read().strip()


def check_stamp(path: str, config: dict | TrainConfig, fix: str) -> None:
    """Refuses the artefact at `path` unless it carries the run id of `config`.

    `fix` is the command that writes the artefact again. A `.keras` file that
    is not a complete zip archive is refused whatever the run.
    """
    _compare(path, read_stamp(path), config, fix)


def check_index_stamp(path: str, config: dict | TrainConfig) -> None:
    """Refuses a saved index (already loaded, so checked) not written by this run."""
    from keras_dml.index import Index

    found = Index.saved_info(path).get("run_id")
    _compare(path, found, config, "run keras-dml train again")


def config_run_id(config: dict | TrainConfig) -> str | None:
    """The run id of a `config.json` dict or a `TrainConfig`; None if it has none."""
    return config.get("run_id") if isinstance(config, dict) else config.run_id


def _compare(path: str, found: str | None, config: dict | TrainConfig, fix: str) -> None:
    run_id = config_run_id(config)
    if run_id is None:  # a run written before run ids: nothing to compare
        return
    if found is None:
        raise RunError(f"{path} has no run id: it was not written by this run ({run_id}); "
                           f"refusing to use it; {fix}")
    if found != run_id:
        raise RunError(f"{path} comes from another run ({found}), not this run ({run_id} "
                           f"in {CONFIG_FILE}): it is stale; refusing to use it; {fix}")


# -- reading a run ---------------------------------------------------------------------


def read_config(run_dir: str) -> dict:
    """`config.json` of a run; a truncated or incomplete one raises `RunError`."""
    path = RunDir(run_dir).config
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise RunError(f"{path} does not exist; run keras-dml train again") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunError(f"{path} is truncated or corrupt ({error}); the run is incomplete: "
                           "run keras-dml train again") from None
    missing = ([] if not isinstance(config, dict)
               else [key for key in REQUIRED_CONFIG if key not in config])
    if not isinstance(config, dict) or missing:
        raise RunError(f"{path} is incomplete (missing {', '.join(missing) or 'everything'}); "
                           "run keras-dml train again")
    return config


def read_metrics(path: str, config: dict | TrainConfig) -> dict:
    """A run's earlier metrics, or {} if absent, unreadable or from another run."""
    try:
        with open(path, encoding="utf-8") as f:
            metrics = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(metrics, dict):
        return {}
    run_id = config_run_id(config)
    if run_id is not None and metrics.get("run_id") != run_id:
        return {}
    return metrics


def load_artefact(path: str, loader: Callable[[str], Any], fix: str = "run keras-dml train "
                  "again") -> Any:
    """`loader(path)`, any failure but an interruption reported as one line naming `path`."""
    if not os.path.exists(path):
        raise RunError(f"{path} does not exist; {fix}")
    try:
        return loader(path)
    except RunError:
        raise
    except Exception as error:  # noqa: BLE001  (the message is what the user can act on)
        text = " ".join(str(error).split()) or type(error).__name__
        if len(text) > 300:
            text = text[:300] + "..."
        raise RunError(f"{path} cannot be read ({type(error).__name__}: {text}); the file is "
                           f"truncated, corrupt or incomplete; {fix}") from None


# -- writing a run ---------------------------------------------------------------------


def is_run_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in RUN_FILE_PATTERNS)


def write_run(out: str, write: Callable[[str], None]) -> str | None:
    """Calls `write(staging)` and swaps the complete staging directory in at `out`.

    Returns where the previous run was kept because it held files no run
    writes (None when it was removed, or there was none).
    """
    out = os.path.realpath(out)  # through a symlink: the run replaces its target, not the link
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    remove_stale_staging(out)  # what a killed `train` left beside it
    staging = make_staging(out)
    try:
        write(staging)
        fsync_tree(staging)
        _check_replaceable(out, staging)
        cwd = os.path.realpath(os.getcwd())
        swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if cwd == out or cwd.startswith(out + os.sep):  # the shell was in the old run: follow `out`
        os.chdir(out)
    # `staging` now holds the previous run (or the empty directory that was there).
    return _remove_previous_run(staging, out)


def _check_replaceable(out: str, staging: str) -> None:
    """`--out` was checked before training; refuses it if it changed since (kept the new run)."""
    problem = None
    if os.path.lexists(out) and (not os.path.isdir(out) or os.path.islink(out)):
        problem = "is no longer a directory"
    elif os.path.isdir(out) and os.listdir(out) and not os.path.isfile(
            os.path.join(out, CONFIG_FILE)):
        problem = "is no longer empty or a keras-dml run"
    if problem:
        kept = f"{out}.new-{os.path.basename(staging).rsplit('-', 1)[-1]}"
        os.rename(staging, kept)
        raise RunError(f"--out {out} {problem}; nothing of it was touched; the new run is "
                           f"in {kept}")


def _remove_previous_run(previous: str, out: str) -> str | None:
    foreign = sorted(name for name in os.listdir(previous) if not is_run_file(name))
    if foreign:
        kept = f"{out}.previous-{_run_id_of(previous) or os.path.basename(previous)[-8:]}"
        if os.path.lexists(kept):
            kept = tempfile.mkdtemp(prefix=os.path.basename(kept) + "-", dir=os.path.dirname(out))
            os.rmdir(kept)
        os.rename(previous, kept)
        return kept
    shutil.rmtree(previous, ignore_errors=True)
    return None


def _run_id_of(run_dir: str) -> str | None:
    try:
        with open(os.path.join(run_dir, CONFIG_FILE), encoding="utf-8") as f:
            run_id = json.load(f).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return run_id[:12] if isinstance(run_id, str) else None


def replace_file(path: str, write: Callable[[str], None]) -> None:
    """Writes a file or directory at a temporary sibling with `write(tmp)`, then swaps it in."""
    remove_stale_staging(os.path.abspath(path))
    staging = make_staging(os.path.abspath(path))
    target = os.path.join(staging, os.path.basename(path))
    try:
        write(target)
        fsync_tree(staging)
        if os.path.isdir(target):
            swap_into_place(target, os.path.abspath(path))
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_text(path: str, text: str) -> None:
    write_text(path, text + "\n")
