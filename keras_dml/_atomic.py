"""Replacing a file tree atomically: write a complete copy beside it, flush it, swap it in.

Shared by `Index.save` and `keras-dml train --out`: an interruption leaves
the old tree, complete, or the new one; never a mix, never nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys


def fsync_tree(directory: str) -> None:
    """Flushes every file and directory under `directory` to disk (best effort)."""
    for root, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_directory(root)


def fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def exchange(a: str, b: str) -> bool:
    """Swaps two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def swap_into_place(staging: str, directory: str) -> None:
    """Puts the complete `staging` at `directory`; an old `directory` ends up at `staging`."""
    parent = os.path.dirname(directory)
    if not os.path.lexists(directory):
        os.rename(staging, directory)
        os.makedirs(staging)  # so that the caller's cleanup has its usual target
    elif not exchange(staging, directory):
        backup = staging + ".old"
        os.rename(directory, backup)
        try:
            os.rename(staging, directory)
        except BaseException:
            os.rename(backup, directory)
            raise
        os.rename(backup, staging)
    fsync_directory(parent)
