"""Replacing a file tree atomically: write a complete copy beside it, flush it, swap it in.

Shared by `Index.save` and `keras-dml train --out`: an interruption leaves
the old tree, complete, or the new one; never a mix, never nothing.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import socket
import sys
import tempfile
import uuid


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


def write_text(path: str, text: str) -> None:
    """Writes `text` to `path` through a flushed temporary sibling and one rename."""
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def make_staging(target: str) -> str:
    """Creates an empty staging directory beside `target`, named after it and its writer.

    The name (`.NAME.partial-HOST-PID-RANDOM`) lets a later writer of the same
    target recognise, and remove, what a killed process left behind
    (`remove_stale_staging`).
    """
    parent = os.path.dirname(target)
    prefix = f".{os.path.basename(target)}.partial-{_host_tag()}-{os.getpid()}-"
    return tempfile.mkdtemp(prefix=prefix, dir=parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def remove_stale_staging(target: str) -> list[str]:
    """Removes staging directories of `target` whose writer, on this host, is gone.

    Returns the paths removed. Staging directories of live processes, of other
    hosts (a shared file system) and of unknown writers are left alone.
    """
    parent = os.path.dirname(target) or "."
    prefix = f".{os.path.basename(target)}.partial-{_host_tag()}-"
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        pid_text = name[len(prefix):].split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _alive(int(pid_text)):
            continue
        path = os.path.join(parent, name)
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            removed.append(path)
    return removed
