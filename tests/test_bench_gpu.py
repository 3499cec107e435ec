"""benchmarks/bench_gpu.py: says so and exits 0 without a GPU; its code paths run on the CPU with --smoke."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_gpu  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def _rows(text: str) -> dict[str, list[str]]:
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| ")]
    return {row[0]: row[1:] for row in cells if row[0] != "variant"}


def test_quick_set_covers_every_switch_and_writes_the_markdown_report(tmp_path, capsys):
    report = tmp_path / "bench.md"
    assert bench_gpu.main(["--smoke", "--quick", "--arch", "hunyuan_video", "--warmup", "0",
                           "--markdown", str(report)]) == 0
    text = report.read_text()
    assert text.startswith("# bench_gpu ") and "--quick" in text and "HunyuanVideo" in text
    rows = _rows(text)
    expected = [v.name for v in bench_gpu.QUICK_TRAIN_VARIANTS + bench_gpu.QUICK_GENERATE_VARIANTS]
    assert set(rows) == set(expected)
    for name in ("gc + fp8_base + fp8_scaled", "gc + blocks_to_swap (overlapped)", "fp8 + fp8_fast",
                 "gc + blocks_to_swap + img_in_txt_in_offloading", "gc + cpu_offload"):
        assert float(rows[name][0]) > 0, name  # measured, not skipped
    assert _rows(capsys.readouterr().out) == rows  # the file holds what was printed


def test_the_time_budget_turns_the_remaining_rows_into_not_run(capsys):
    assert bench_gpu.main(["--smoke", "--quick", "--arch", "wan", "--only", "generate", "--time_budget_s", "0"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows and all(cells[0] == "not run (time budget)" for cells in rows.values())


def test_input_offloading_is_skipped_for_a_family_without_img_in_txt_in(capsys):
    assert bench_gpu.main(["--smoke", "--arch", "wan", "--only", "train", "--variants", "img_in_txt_in",
                           "--steps", "1", "--warmup", "0"]) == 0
    (cells,) = _rows(capsys.readouterr().out).values()
    assert cells[0] == "skipped" and "no img_in/txt_in" in cells[3]
