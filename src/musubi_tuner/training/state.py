"""Training state folders: everything `--resume` needs to continue exactly where a run stopped.

A state folder holds the LoRA weights (fp32), optimizer, LR scheduler, every RNG, and the counters.
It is written to a temp folder and renamed into place, with `musubi_state.json` written last, so a
crash mid-save leaves the previous state untouched and never a half folder that looks complete.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from musubi_tuner.errors import UserError
from musubi_tuner.training.checkpoint_files import read_state_marker, write_state_marker
from musubi_tuner.utils.atomic import atomic_directory, save_safetensors_atomic

STATE_FORMAT = 1


@dataclass
class TrainProgress:
    global_step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Current epoch (0-based)."""
    batch_in_epoch: int = 0
    """Next batch index to run within `epoch`."""
    batches_per_epoch: int = 0
    """Recorded so a resume with a changed dataset is noticed."""
    loss_window: dict = field(default_factory=dict)
    """The moving-average loss window (`MovingAverage.state_dict()`), so avr_loss continues too."""


def capture_rng(noise_generator: torch.Generator) -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "noise": noise_generator.get_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], noise_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    noise_generator.set_state(state["noise"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(process_index: int) -> str:
    """`rng.pt` for the main process (the layout of single-process states), `rng_rank{N}.pt` for the others."""
    return "rng.pt" if process_index == 0 else f"rng_rank{process_index}.pt"


def save_state(folder: Path, *, network_sd: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               lr_scheduler: Any, rng_states: list[dict[str, Any]], progress: TrainProgress) -> None:
    """rng_states: `capture_rng()` of every process, in process order (each draws its own noise)."""
    with atomic_directory(folder) as tmp:
        save_safetensors_atomic({k: v.detach().float().cpu() for k, v in network_sd.items()}, tmp / "network.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        for index, rng in enumerate(rng_states):
            torch.save(rng, tmp / rng_file(index))
        # written last: a folder without it is incomplete
        write_state_marker(tmp, {"format": STATE_FORMAT, **asdict(progress)})


def read_progress(folder: Path) -> TrainProgress:
    data = read_state_marker(folder)  # refuses a missing folder or an incomplete (interrupted) save
    if data.get("format") != STATE_FORMAT:
        raise UserError(f"--resume {folder}: state format {data.get('format')} is not supported (expected {STATE_FORMAT})")
    data.pop("format")
    return TrainProgress(**data)


def load_state(folder: Path, *, network: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any,
               noise_generator: torch.Generator, process_index: int = 0) -> TrainProgress:
    folder = Path(folder)
    progress = read_progress(folder)
    weights = load_file(str(folder / "network.safetensors"))
    missing, unexpected = network.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise UserError(f"--resume {folder}: the saved LoRA does not match this network "
                        f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}); use the same --network_dim/--network_args")
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(folder / "lr_scheduler.pt", weights_only=True))
    rng = folder / rng_file(process_index)
    if not rng.exists():
        raise UserError(f"--resume {folder}: no {rng.name}; the state was saved by fewer processes than this run has. "
                        "Resume with the same number of processes")
    restore_rng(torch.load(rng, weights_only=True), noise_generator)
    return progress
