"""benchmarks/bench_gpu.py: says so and exits 0 without a GPU; its code paths run on the CPU with --smoke."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_gpu  # noqa: E402


def test_without_a_gpu_it_says_so_and_exits_0(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_gpu.main(["--arch", "wan"]) == 0
    assert "no CUDA GPU on this machine; nothing measured" in capsys.readouterr().out


def test_smoke_run_fills_the_table_for_swap_and_fp8_variants(capsys):
    assert bench_gpu.main(["--smoke", "--arch", "wan", "--only", "generate", "--variants", "bf16", "overlapped",
                           "fp8_fast", "--steps", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["bf16", "fp8 + fp8_fast", "blocks_to_swap (overlapped)"]
    assert all(float(r.split("|")[2]) > 0 for r in rows)  # seconds per step measured, nothing skipped


@pytest.mark.parametrize("name, peak", [("NVIDIA H200", 989), ("NVIDIA GeForce RTX 4090", 165), ("Radeon", None)])
def test_peak_flops_by_gpu_name(name, peak):
    assert bench_gpu.peak_tflops_for(name) == peak
