"""Multi-process (multi-host) data-parallel training with Keras 3's JAX engine.

Keras 3 trains one model over several processes with
`keras.distribution.initialize(...)` and `keras.distribution.DataParallel()`
on the JAX backend. Every process builds the same model and feeds its share
of each global batch; XLA partitions the step over all processes' devices,
so a metric loss sees the whole global batch (no gather code) and a step
equals the single-process step on the global batch
(`tests/test_multihost.py`).

This module holds the two pieces a script needs around that:

- `initialize()`, called first in each worker: selects gloo collectives on
  CPU and calls `keras.distribution.initialize()`, which reads the cluster
  from the `KERAS_DISTRIBUTION_*` environment variables.
- `launch_local(command, num_processes)`: starts `num_processes` copies of a
  command on this machine with those variables set (coordinator on a free
  localhost port), waits with a timeout and always kills what it started.

On several machines, run the same script on each with
`KERAS_DISTRIBUTION_JOB_ADDRESSES=<coordinator host:port>`,
`KERAS_DISTRIBUTION_NUM_PROCESSES` and `KERAS_DISTRIBUTION_PROCESS_ID` set;
only the local launch is tested here.

Example (no cluster variables set: `process_info()` describes one process):

>>> from keras_dml import multihost
>>> multihost.process_info()
(0, 1)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ADDRESS_VARIABLE = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
NUM_PROCESSES_VARIABLE = "KERAS_DISTRIBUTION_NUM_PROCESSES"
PROCESS_ID_VARIABLE = "KERAS_DISTRIBUTION_PROCESS_ID"


def free_port() -> int:
    """A TCP port that was free on localhost a moment ago (bound to port 0, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("localhost", 0))
        return int(sock.getsockname()[1])


def process_info() -> tuple[int, int]:
    """`(process_id, num_processes)` from the `KERAS_DISTRIBUTION_*` variables; `(0, 1)` without."""
    count = int(os.environ.get(NUM_PROCESSES_VARIABLE, "1"))
    return int(os.environ.get(PROCESS_ID_VARIABLE, "0")), count


def is_worker() -> bool:
    """True in a process started for a multi-process cluster (the variables are set)."""
    return ADDRESS_VARIABLE in os.environ and process_info()[1] > 1


def initialize(cpu_collectives: str | None = "gloo") -> tuple[int, int]:
    """Joins this process to the cluster described by the `KERAS_DISTRIBUTION_*` variables.

    Call it before any JAX computation. On CPU, JAX needs a collectives
    implementation for cross-process all-reduces: `"gloo"` (the default
    here) or `"mpi"`; `None` leaves JAX's setting alone (GPUs and TPUs use
    their own). Does nothing but return `(0, 1)` when the variables are not
    set (a single process).

    Returns:
        `(process_id, num_processes)`.
    """
    if not is_worker():
        return 0, 1
    import keras

    if keras.backend.backend() != "jax":
        raise RuntimeError(
            "keras_dml.multihost.initialize() needs KERAS_BACKEND=jax (Keras's "
            f"multi-process engine), got {keras.backend.backend()!r}."
        )
    import jax

    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    keras.distribution.initialize()
    return process_info()


@dataclass
class ProcessResult:
    """What one launched process did: its id, exit status and output."""

    process_id: int
    returncode: int | None  # None: killed at the timeout
    stdout: str
    stderr: str


def launch_local(
    command: Sequence[str],
    num_processes: int,
    timeout: float = 600.0,
    env: Mapping[str, str] | None = None,
    backend: str = "jax",
) -> list[ProcessResult]:
    """Runs `num_processes` copies of `command` on this machine as one Keras cluster.

    Each copy gets `KERAS_BACKEND=backend`, the coordinator address
    `localhost:<free port>`, the process count and its own process id in the
    `KERAS_DISTRIBUTION_*` variables, which `initialize()` (or
    `keras.distribution.initialize()`) reads. Output goes to temporary files
    (no pipe can fill up). When one copy fails, the others would wait for it
    in a collective forever, so all are killed; all are killed at the
    timeout too, and in any case before returning.

    Args:
        command: the program and its arguments, e.g.
            `[sys.executable, "train.py"]`.
        num_processes: copies to start (>= 1).
        timeout: seconds to wait for all of them.
        env: the environment (default: this process's).
        backend: `KERAS_BACKEND` of the copies.

    Returns:
        One `ProcessResult` per process, in process-id order. A process
        killed at the timeout or because another failed has `returncode`
        None or negative.
    """
    if num_processes < 1:
        raise ValueError(f"`num_processes` must be >= 1, got {num_processes}.")
    base = dict(os.environ if env is None else env)
    base["KERAS_BACKEND"] = backend
    base[ADDRESS_VARIABLE] = f"localhost:{free_port()}"
    base[NUM_PROCESSES_VARIABLE] = str(num_processes)
    procs, files = [], []
    with tempfile.TemporaryDirectory(prefix="keras_dml_launch_") as tmp:
        try:
            for i in range(num_processes):
                out = open(os.path.join(tmp, f"{i}.out"), "w+")  # noqa: SIM115
                err = open(os.path.join(tmp, f"{i}.err"), "w+")  # noqa: SIM115
                files.append((out, err))
                procs.append(subprocess.Popen(
                    list(command), stdout=out, stderr=err,
                    env=dict(base, **{PROCESS_ID_VARIABLE: str(i)}),
                    start_new_session=True,  # its own group: killing it kills its children
                ))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                codes = [p.poll() for p in procs]
                if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                    break
                time.sleep(0.1)
        finally:
            for p in procs:
                if p.poll() is None:
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:  # pragma: no cover - a zombie
                    pass
        results = []
        for i, (p, (out, err)) in enumerate(zip(procs, files, strict=True)):
            out.seek(0)
            err.seek(0)
            results.append(ProcessResult(i, p.returncode, out.read(), err.read()))
            out.close()
            err.close()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m keras_dml.multihost N script.py [args...]`: runs N local copies of a script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: python -m keras_dml.multihost NUM_PROCESSES script.py [args...]",
              file=sys.stderr)
        return 2
    results = launch_local([sys.executable, *argv[1:]], int(argv[0]))
    for r in results:
        sys.stdout.write(r.stdout)
        sys.stderr.write(r.stderr)
    return 0 if all(r.returncode == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
