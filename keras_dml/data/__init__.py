"""Input pipelines for metric learning.

- `SimCLRAugmentation`: two-view image augmentation in `keras.ops` (any backend).
- `make_pairs`, `make_pair_indices`: labelled same-class / different-class
  pairs for `SiameseModel` and verification (NumPy).
- `m_per_class_dataset`: class-balanced (P × M) batches with `tf.data`.
- `load_digits_zero_shot`, `load_glyphs_zero_shot`: the bundled zero-shot
  benchmarks (scikit-learn's digits; characters rendered from matplotlib's
  fonts), as NumPy arrays.

The `tf.data` parts import TensorFlow on first use, so importing this package
under the JAX or torch backend does not pull TensorFlow in.
"""

from keras_dml.data.augment import SimCLRAugmentation
from keras_dml.data.pairs import make_pair_indices, make_pairs

_LAZY = {
    "m_per_class_dataset": "keras_dml.data.sampler",
    "ZeroShotArrays": "keras_dml.data.digits",
    "load_digits_zero_shot": "keras_dml.data.digits",
    "load_glyphs_zero_shot": "keras_dml.data.glyphs",
}

__all__ = [
    "SimCLRAugmentation",
    "ZeroShotArrays",
    "load_digits_zero_shot",
    "load_glyphs_zero_shot",
    "m_per_class_dataset",
    "make_pair_indices",
    "make_pairs",
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'keras_dml.data' has no attribute {name!r}")
