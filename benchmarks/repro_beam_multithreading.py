"""Reproduce the Beam 2.77 `multi_threading` corruption that keras_dml.beam works around.

Pure Beam, no keras-dml code: `N` items `(id, float32[128] payload, {})` made by a
FlatMap go through a GroupByKey on `FnApiRunner` with `direct_num_workers` /
`direct_running_mode` as given, and a Map checks every grouped item. The payload
is a NumPy row view (`ndarray`), an owned copy (`copy`), or its bytes (`bytes`,
what `IndexEmbeddings` sends through its shuffle since issue 20's fix). Each
case runs in a child process that is killed past `--rss-limit-gb` resident
memory. Prints a Markdown table: exit, peak RSS, seconds, items checked, bad
items, and the last error line.

    python benchmarks/repro_beam_multithreading.py              # 50k and 200k items
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys
import numpy as np, apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
items, workers, mode, payload, report = sys.argv[1:6]
items, workers = int(items), int(workers)
def make(chunk):
    x = np.random.default_rng(chunk).normal(size=(5000, 128)).astype("float32")
    for row in range(5000):
        v = {"ndarray": lambda: x[row], "copy": lambda: x[row].copy(),
             "bytes": lambda: x[row].tobytes()}[payload]()
        yield chunk * 5000 + row, v, {}
def check(kv):
    key, group = kv
    group = list(group)
    bad = sum(1 for item in group if not (isinstance(item, tuple) and len(item) == 3))
    with open(report, "a") as f:
        f.write(json.dumps([len(group), bad]) + "\n")
options = PipelineOptions([f"--direct_num_workers={workers}", f"--direct_running_mode={mode}"])
with beam.Pipeline(runner=FnApiRunner(), options=options) as p:
    _ = (p | beam.Create(range(items // 5000)) | beam.Reshuffle() | beam.FlatMap(make)
         | beam.Map(lambda item: (item[0] % 4, item)) | beam.GroupByKey() | beam.Map(check))
"""


def run_case(items: int, workers: int, mode: str, payload: str, limit: float):
    import psutil

    with tempfile.TemporaryDirectory() as scratch:
        report = os.path.join(scratch, "groups.jsonl")
        log = open(os.path.join(scratch, "stderr.txt"), "w+")
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(items), str(workers), mode, payload, report],
            stdout=subprocess.DEVNULL, stderr=log,
        )
        peak, killed = 0, False
        watched = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak = max(peak, watched.memory_info().rss)
            except psutil.Error:
                pass
            if peak > limit * 2**30:
                proc.kill()
                killed = True
            time.sleep(0.25)
        seconds = time.perf_counter() - start
        groups = []
        if os.path.exists(report):
            groups = [json.loads(line) for line in open(report)]
        log.seek(0)
        lines = [line.strip() for line in log if line.strip() and "apitools" not in line]
        error = next((line for line in reversed(lines) if "Error" in line), "")
        exit_text = f"killed past {limit:g} GB" if killed else str(proc.returncode)
        return (exit_text, peak / 2**30, seconds, sum(g[0] for g in groups),
                sum(g[1] for g in groups), error[:90])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--cases", nargs="+", default=[
        "1:in_memory:ndarray", "2:multi_threading:ndarray", "2:multi_threading:copy",
        "2:multi_threading:bytes",
    ], help="WORKERS:MODE:PAYLOAD (payload: ndarray, copy, bytes)")
    parser.add_argument("--rss-limit-gb", type=float, default=5.0)
    args = parser.parse_args()
    print("| items | workers, mode | payload | exit | peak RSS, GB | s | items checked "
          "| bad items | last error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for items in args.items:
        for case in args.cases:
            workers, mode, payload = case.split(":")
            row = run_case(items, int(workers), mode, payload, args.rss_limit_gb)
            exit_text, peak, seconds, checked, bad, error = row
            print(f"| {items:,} | {workers}, {mode} | {payload} | {exit_text} | {peak:.2f} | "
                  f"{seconds:.0f} | {checked:,} | {bad} | {error} |", flush=True)


if __name__ == "__main__":
    main()
