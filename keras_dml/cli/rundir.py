"""The run directory of the command line: `keras_dml.runs.rundir`, re-exported.

The run library owns run directories (`keras_dml.runs.RunDir`, the table of
run-file names, run-id stamps, atomic writes); this module keeps the old
import path `keras_dml.cli.rundir` working.
"""

from keras_dml.runs.rundir import (  # noqa: F401
    CONFIG_FILE,
    KERAS_ENTRY,
    MODEL_FILES,
    REQUIRED_CONFIG,
    RUN_FILE_PATTERNS,
    RUN_FILES,
    SAVED_MODEL_STAMP,
    SIDECAR_SUFFIX,
    RunDir,
    check_index_stamp,
    check_stamp,
    config_run_id,
    is_run_file,
    load_artefact,
    new_run_id,
    read_config,
    read_metrics,
    read_stamp,
    replace_file,
    stamp,
    write_run,
)
