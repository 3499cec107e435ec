"""Two training processes on the CPU (torchrun + gloo), as `accelerate launch --num_processes 2` would run them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from musubi_tuner import wan_cache_latents, wan_cache_text_encoder_outputs
from wan_fixtures import make_workspace, run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="needs torchrun")
def test_two_processes_stay_in_sync_resume_exactly_and_only_the_main_one_writes(tmp_path):
    ws = make_workspace(tmp_path)
    assert run(wan_cache_latents.main, ["--dataset_config", str(ws.toml), *ws.vae_args]) == 0
    assert run(wan_cache_text_encoder_outputs.main, ["--dataset_config", str(ws.toml), *ws.t5_args]) == 0
    full = _train_two_processes(ws.train_args(tmp_path / "full", 4, "--save_every_n_steps", "2", "--save_state"))
    # 3 batches per epoch shared by 2 processes -> 2 steps per epoch for each
    assert full.stderr.count("3 batches per epoch, 2 steps per epoch, 4 steps in total") == 2
    assert full.stderr.count("saved ") == 4  # LoRA + state at step 2 and at the end, by the main process only
    state = tmp_path / "full" / "lora-step00000002-state"
    assert (state / "rng.pt").exists() and (state / "rng_rank1.pt").exists()  # each process's own noise RNG
    sd = load_file(str(tmp_path / "full" / "lora.safetensors"))
    assert any(sd[k].abs().sum() > 0 for k in sd if k.endswith("lora_up.weight"))
    assert all(torch.isfinite(v).all() for v in sd.values())

    resumed = _train_two_processes(ws.train_args(tmp_path / "resumed", 4, "--resume", str(state)))
    assert _checksums(resumed) == _checksums(full)


def _train_two_processes(args: list[str]) -> subprocess.CompletedProcess:
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    script = str(Path(__file__).with_name("_multiprocess_train.py"))
    result = subprocess.run([torchrun, "--nproc_per_node", "2", script, json.dumps(args)],
                            capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _checksums(result: subprocess.CompletedProcess) -> list[str]:
    """Both ranks' LoRA checksums; gradients are averaged over the processes, so they must agree."""
    checksums = sorted(line.split()[-1] for line in result.stdout.splitlines() if " checksum " in line)
    assert len(checksums) == 2 and checksums[0] == checksums[1], result.stdout
    return checksums
