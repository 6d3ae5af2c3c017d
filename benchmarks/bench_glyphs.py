"""Glyph dataset generation speed: rendering, loading from the cache, class selection.

Rendering runs in this process on one core (Pillow draws one glyph at a time);
the cache is a single `.npz` file per (size, samples per face, seed).

    python benchmarks/bench_glyphs.py                       # 32 and 64 px, 2 per face
    python benchmarks/bench_glyphs.py --sizes 32 --samples-per-face 1 2 4
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", type=int, default=[32, 64])
    parser.add_argument("--samples-per-face", nargs="*", type=int, default=[2])
    args = parser.parse_args(argv)

    from keras_dml.data import glyphs

    start = time.perf_counter()
    classes = glyphs.glyph_classes()
    select_s = time.perf_counter() - start
    print(f"# machine: {platform.machine()} {os.cpu_count()} CPUs, python "
          f"{platform.python_version()}")
    print(f"class selection (outline comparison over {len(glyphs.FACES)} faces): "
          f"{len(classes.code_points)} classes from {classes.shared} code points, "
          f"{classes.num_dropped} look-alikes dropped, {select_s:.1f} s")
    print("\n| size | per face | images | render s | images/s | cache MB | load from cache s |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for per_face in args.samples_per_face:
            with tempfile.TemporaryDirectory() as cache:
                start = time.perf_counter()
                images, _, _ = glyphs.render_glyphs(size, per_face, seed=0, cache_dir=cache)
                render_s = time.perf_counter() - start
                [path] = [os.path.join(cache, f) for f in os.listdir(cache)]
                start = time.perf_counter()
                glyphs.render_glyphs(size, per_face, seed=0, cache_dir=cache)
                load_s = time.perf_counter() - start
                print(f"| {size} | {per_face} | {len(images):,} | {render_s:.1f} "
                      f"| {len(images) / render_s:,.0f} | {os.path.getsize(path) / 2**20:.1f} "
                      f"| {load_s:.2f} |", flush=True)


if __name__ == "__main__":
    main()
