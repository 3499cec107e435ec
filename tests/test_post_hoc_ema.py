"""lora_post_hoc_ema.py: each beta mode against a hand computation, dtypes, ordering, metadata and the errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from musubi_tuner.errors import CheckpointError, UserError
from musubi_tuner.lora_post_hoc_ema import main as ema_main
from musubi_tuner.networks.post_hoc_ema import ema_betas, post_hoc_ema, sigma_rel_to_gamma

ROOT = Path(__file__).resolve().parents[1]
DOWN, UP, ALPHA = "lora_unet_blocks_0_self_attn_q.lora_down.weight", "lora_unet_blocks_0_self_attn_q.lora_up.weight", \
    "lora_unet_blocks_0_self_attn_q.alpha"


def _write(path: Path, value: float, mtime: int, alpha: float = 2.0, dtype=torch.float32, meta: str = "") -> Path:
    sd = {DOWN: torch.full((2, 3), value, dtype=dtype), UP: torch.arange(6, dtype=torch.float32).view(3, 2) * value,
          ALPHA: torch.tensor(alpha), "lokr_factor": torch.tensor(int(value) + 7)}
    save_file(sd, str(path), metadata={"ss_output_name": meta, "sshs_model_hash": "stale"})
    os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def three(tmp_path):
    # given newest-first on the command line; by modification time the order is 1.0, 2.0, 4.0
    return [_write(tmp_path / "c.safetensors", 4.0, 3000, meta="newest"),
            _write(tmp_path / "a.safetensors", 1.0, 1000, meta="oldest"),
            _write(tmp_path / "b.safetensors", 2.0, 2000, meta="middle")]


def test_constant_beta_by_modification_time(three, tmp_path):
    out = tmp_path / "ema.safetensors"
    post_hoc_ema([str(p) for p in three], out, beta=0.9)
    sd = load_file(str(out))
    expected = (1.0 * 0.9 + 2.0 * 0.1) * 0.9 + 4.0 * 0.1  # 1.702
    assert torch.allclose(sd[DOWN], torch.full((2, 3), expected))
    assert torch.allclose(sd[UP], torch.arange(6.0).view(3, 2) * expected)
    assert float(sd[ALPHA]) == 2.0
    assert int(sd["lokr_factor"]) == 8  # non-float: the oldest file's, as the reference
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_output_name"] == "newest" and meta["sshs_model_hash"] != "stale"


def test_no_sort_keeps_the_given_order(three, tmp_path):
    out = tmp_path / "ema.safetensors"
    post_hoc_ema([str(p) for p in three], out, beta=0.5, no_sort=True)  # 4, 1, 2
    assert torch.allclose(load_file(str(out))[DOWN], torch.full((2, 3), (4.0 * 0.5 + 1.0 * 0.5) * 0.5 + 2.0 * 0.5))


def test_beta_interpolated_to_beta2(three, tmp_path):
    assert ema_betas(3, 0.9, 0.6) == pytest.approx([0.9, 0.75, 0.6])
    assert ema_betas(1, 0.9, 0.6) == [0.9]
    out = tmp_path / "ema.safetensors"
    ema_main([*(str(p) for p in three), "--output_file", str(out), "--beta", "0.9", "--beta2", "0.5"])
    expected = (1.0 * 0.9 + 2.0 * 0.1) * 0.5 + 4.0 * 0.5
    assert torch.allclose(load_file(str(out))[DOWN], torch.full((2, 3), expected))


def test_sigma_rel_power_function_ema(three, tmp_path):
    gamma = sigma_rel_to_gamma(0.2)
    s = 0.2**-2
    assert gamma > 0 and abs(gamma**3 + 7 * gamma**2 + (16 - s) * gamma + (12 - s)) < 1e-9
    betas = ema_betas(2, sigma_rel=0.2)
    assert betas == pytest.approx([0.0, 0.5 ** (gamma + 1)])  # t = 1, 2 as the reference counts
    out = tmp_path / "ema.safetensors"
    post_hoc_ema([str(p) for p in three], out, sigma_rel=0.2)
    expected = 2.0 * betas[1] + 4.0 * (1 - betas[1])  # the oldest file gets weight 0 (beta_1 = 0)
    assert torch.allclose(load_file(str(out))[DOWN], torch.full((2, 3), expected))
    with pytest.raises(UserError, match="--sigma_rel"):
        sigma_rel_to_gamma(0.5)


def test_math_in_fp32_and_dtypes_kept(tmp_path):
    files = [_write(tmp_path / f"{i}.safetensors", v, 1000 + i, dtype=torch.bfloat16) for i, v in enumerate([1.0, 1.5])]
    out = tmp_path / "ema.safetensors"
    post_hoc_ema([str(p) for p in files], out, beta=0.99)
    sd = load_file(str(out))
    assert sd[DOWN].dtype == torch.bfloat16 and sd[UP].dtype == torch.float32
    assert torch.equal(sd[DOWN], torch.full((2, 3), 1.005, dtype=torch.float32).to(torch.bfloat16))


def test_mismatches_name_both_files(tmp_path):
    a = _write(tmp_path / "a.safetensors", 1.0, 1000)
    b = _write(tmp_path / "b.safetensors", 1.0, 2000, alpha=4.0)
    with pytest.raises(CheckpointError, match=r"b\.safetensors.*a\.safetensors"):
        post_hoc_ema([str(a), str(b)], tmp_path / "o.safetensors")
    c = tmp_path / "c.safetensors"
    save_file({DOWN: torch.ones(4, 3), UP: torch.ones(3, 4), ALPHA: torch.tensor(2.0),
               "lokr_factor": torch.tensor(8)}, str(c))
    with pytest.raises(CheckpointError, match=r"shape \(4, 3\) in .*c\.safetensors.*\(2, 3\) in .*a\.safetensors"):
        post_hoc_ema([str(a), str(c)], tmp_path / "o.safetensors", no_sort=True)
    d = tmp_path / "d.safetensors"
    save_file({DOWN: torch.ones(2, 3), UP: torch.ones(3, 2), ALPHA: torch.tensor(2.0)}, str(d))
    with pytest.raises(CheckpointError, match=r"d\.safetensors lacks \['lokr_factor'\].*a\.safetensors"):
        post_hoc_ema([str(a), str(d)], tmp_path / "o.safetensors", no_sort=True)


def test_output_checked_before_reading(tmp_path):
    a = _write(tmp_path / "a.safetensors", 1.0, 1000)
    with pytest.raises(UserError, match="--output_file"):
        post_hoc_ema([str(a), str(tmp_path / "missing.safetensors")], tmp_path)  # a folder
    with pytest.raises(UserError, match="is one of the inputs"):
        post_hoc_ema([str(a), str(a)], a)
    with pytest.raises(UserError, match="not found"):
        post_hoc_ema([str(a), str(tmp_path / "missing.safetensors")], tmp_path / "o.safetensors")


def test_script_runs_as_a_file_and_errors_are_one_line(tmp_path):
    a = _write(tmp_path / "a.safetensors", 1.0, 1000)
    result = subprocess.run([sys.executable, str(ROOT / "src/musubi_tuner/lora_post_hoc_ema.py"), str(a),
                             "--output_file", str(tmp_path / "o.safetensors")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "at least two" in result.stderr and "Traceback" not in result.stderr
