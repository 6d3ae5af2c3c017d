"""Shared test helpers: backend-agnostic gradients and mixed-precision scoping."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile

import keras
import numpy as np
import pytest

if keras.backend.backend() == "jax" and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    # Many tests compile the same XLA programs (the same loss, head or step on the same
    # shapes, from new Python functions); JAX's persistent cache, keyed by the program,
    # compiles each once. One fresh directory per test process (no sharing between
    # pytest-xdist workers), removed at exit. Measured from an empty cache: three JAX
    # files alone 173 -> 136 s; the whole JAX run 453 -> 430 s (BENCHMARKS.md).
    import jax

    _JAX_CACHE = tempfile.mkdtemp(prefix="keras-dml-jax-cache-")
    atexit.register(shutil.rmtree, _JAX_CACHE, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _JAX_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# `make test` runs every test under TensorFlow, then the files of `backend_agnostic.txt`
# again under JAX and torch. In these files the parametrizations vary the loss, head,
# distance or precision policy, not the backend's code path: off TensorFlow only the first
# parametrization of each test runs (every test function still runs on every backend;
# the catalogue's `*_backends.py` files cover each class on each backend).
# `KERAS_DML_ALL_PARAMS=1` runs them all.
FIRST_PARAMETRIZATION_OFF_TENSORFLOW = frozenset({
    "test_center.py", "test_circle.py", "test_contrastive.py", "test_curricularface.py",
    "test_distributed.py", "test_heads.py", "test_lifted_struct.py", "test_loss_faults.py",
    "test_losses_common.py", "test_margin_model.py", "test_mixed_precision.py",
    "test_multi_similarity.py", "test_npairs.py", "test_ntxent.py", "test_partial_fc.py",
    "test_proxy.py", "test_quadruplet.py", "test_s2sd.py", "test_semi_hard_mining.py",
    "test_sphereface.py", "test_supcon.py", "test_triplet.py",
})


def pytest_collection_modifyitems(config, items):
    if keras.backend.backend() == "tensorflow" or os.environ.get("KERAS_DML_ALL_PARAMS"):
        return
    seen, keep, drop = set(), [], []
    for item in items:
        name = os.path.basename(str(item.fspath))
        if name in FIRST_PARAMETRIZATION_OFF_TENSORFLOW and hasattr(item, "callspec"):
            key = (name, item.originalname)
            if key in seen:
                drop.append(item)
                continue
            seen.add(key)
        keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True)
def _seed_everything():
    """Seeds Python, NumPy and the backend before every test.

    Layers built inside a test draw their initial weights from the backend's
    global generator; without a seed a tolerance that is too tight fails once in
    a few hundred runs and cannot be reproduced. Tests that need their own seed
    still set it. `KERAS_DML_TEST_SEED=N make test` runs the suite under
    another seed (to look for tolerances that hold only by luck).
    """
    keras.utils.set_random_seed(int(os.environ.get("KERAS_DML_TEST_SEED", "20261123")))
    yield


def loss_gradient(fn, x):
    """Returns `(value, d value / d x)` as NumPy arrays on the active backend.

    Args:
        fn: maps a float tensor shaped like `x` to a scalar tensor.
        x: NumPy array.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        var = tf.Variable(x)
        with tf.GradientTape() as tape:
            value = fn(var)
        grad = tape.gradient(value, var)
        grad = np.zeros_like(x) if grad is None else grad.numpy()
        return np.asarray(value), grad
    if backend == "jax":
        import jax

        value, grad = jax.value_and_grad(lambda v: fn(v))(x)
        return np.asarray(value), np.asarray(grad)
    if backend == "torch":
        import torch

        x = np.asarray(x)
        if x.dtype.name == "bfloat16":  # torch cannot read NumPy's (ml_dtypes) bfloat16
            var = torch.tensor(x.astype("float32")).to(torch.bfloat16).requires_grad_()
        else:
            var = torch.tensor(x, requires_grad=True)
        value = fn(var)
        if not value.requires_grad:  # the value does not depend on x
            return value.detach().float().numpy(), np.zeros(x.shape, "float32")
        value.backward()
        return value.detach().float().numpy(), var.grad.float().numpy()
    raise NotImplementedError(f"No gradient helper for backend {backend!r}.")


def assert_head_gradients_finite(head, x, labels):
    """The head's cross-entropy has finite, not all-zero gradients w.r.t. `x` and the centres.

    The centres' gradient goes through `head.stateless_call`, with the head's
    non-trainable state as it is.
    """
    kernel = keras.ops.convert_to_numpy(head.kernel)
    state = list(head.non_trainable_variables)

    def cross_entropy(logits):
        return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(labels, logits, True))

    def of_x(v):
        return cross_entropy(head(v, labels))

    def of_kernel(w):
        return cross_entropy(head.stateless_call([w], state, x, labels)[0])

    for fn, value in ((of_x, x), (of_kernel, kernel)):
        total, grad = loss_gradient(fn, value)
        assert np.isfinite(total) and np.all(np.isfinite(grad)) and np.any(grad != 0)


@contextlib.contextmanager
def mixed_precision(policy: str):
    """Sets a global Keras dtype policy for the duration of the block."""
    previous = keras.config.dtype_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def ref_semi_hard_terms(d, negatives, queries, margin):
    """NumPy reference of semi-hard mining (tfa's rule), with loops.

    Returns the hinge `max(margin + d(a, p) - d(a, n*), 0)` summed over the
    queries, and their number.
    """
    total, count = 0.0, 0
    for a in range(d.shape[0]):
        negs = [d[a, n] for n in range(d.shape[1]) if negatives[a, n]]
        for p in range(d.shape[1]):
            if not queries[a, p]:
                continue
            count += 1
            farther = [v for v in negs if v > d[a, p]]
            if farther:
                neg = min(farther)
            elif negs:
                neg = max(negs)
            else:
                neg = d[a].min()
            total += max(margin + d[a, p] - neg, 0.0)
    return total, count
