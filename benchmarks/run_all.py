"""Run every benchmark with small defaults (`make bench`); a few minutes on a 2-core CPU.

Each benchmark prints Markdown tables; see docs/benchmarks.md for what they mean and figures measured so far.
Options: --work_dir (where the 2.8 GB checkpoint of bench_load_memory is kept, default ~/.cache/musubi-bench),
--skip TRAIN|LOAD|CACHING|IMPORTS to leave one out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_caching  # noqa: E402
import bench_import_time  # noqa: E402
import bench_load_memory  # noqa: E402
import bench_train_overhead  # noqa: E402
from _bench_util import DEFAULT_WORK_DIR  # noqa: E402

BENCHMARKS = ("train", "load", "caching", "imports")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", type=Path, default=DEFAULT_WORK_DIR,
                        help="keeps the 1.3B-shaped checkpoint between runs (2.8 GB)")
    parser.add_argument("--skip", nargs="+", default=[], choices=BENCHMARKS, help="benchmarks to leave out")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if "train" not in args.skip:
        print("\n## trainer overhead\n", flush=True)
        bench_train_overhead.main([])
    if "load" not in args.skip:
        print("\n## DiT load memory\n", flush=True)
        bench_load_memory.main(["--work_dir", str(args.work_dir)])
    if "caching" not in args.skip:
        print("\n## latent caching throughput\n", flush=True)
        bench_caching.main([])
    if "imports" not in args.skip:
        print("\n## start-up and import time per command\n", flush=True)
        bench_import_time.main([])
    print(f"\nall benchmarks: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
