"""Helpers shared by the benchmark scripts: memory readings, timing, tables, the machine's description.

Benchmarks print figures; they are not tests. Each script runs on its own (`python benchmarks/<name>.py`)
and `run_all.py` runs them all with small defaults.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORK_DIR = Path(os.environ.get("MUSUBI_BENCH_DIR", Path.home() / ".cache" / "musubi-bench"))
"""Where files that are slow to make (the 1.3B-shaped checkpoint) are written once and reused."""


def offline_environment() -> None:
    """Benchmarks never touch the network (tokenizers, configs and weights are all local)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mib() -> float:
    """Resident set size now: psutil when installed, else /proc/self/status, else the peak."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        pass
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mib()


def rss_breakdown_mib() -> dict[str, float]:
    """{"rss", "anon", "file"}: file-backed pages (memory-mapped checkpoints) are counted in RSS but are clean
    page cache the kernel can drop; anonymous pages are the process's own copies. Linux only (else rss only)."""
    out = {"rss": current_rss_mib(), "anon": float("nan"), "file": float("nan")}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out["anon" if key == "RssAnon" else "file"] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """`with stopwatch() as t: ...` then `t[0]` holds the elapsed seconds."""
    result = [0.0]
    start = time.perf_counter()
    try:
        yield result
    finally:
        result[0] = time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def machine_description() -> str:
    """One line: CPU count, memory, accelerator, torch version."""
    import torch

    mem = ""
    try:
        kib = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal:")).split()[1])
        mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    threads = torch.get_num_threads()
    return (f"{platform.machine()} {os.cpu_count()} CPU cores ({threads} torch threads){mem}, {gpu}, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (so the output can be pasted into docs/benchmarks.md), without a final newline."""
    cells = [[str(c) for c in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    print(markdown_table(headers, rows))
    sys.stdout.flush()


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
