"""The `keras-dml` command line: train, evaluate, search and export metric-learning models.

Run `keras-dml --help`, or `python -m keras_dml.cli --help` without the
console script. `keras_dml.cli.main.main(argv)` runs a command in-process and
returns its exit status.
"""
