"""`python -m keras_dml.cli ...` runs the `keras-dml` command line."""

import sys

from keras_dml.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
