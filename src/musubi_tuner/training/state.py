"""Training state folders: everything `--resume` needs to continue exactly where a run stopped.

A state folder holds the LoRA weights (fp32), optimizer, LR scheduler, every RNG, the counters and the flags
that shape the network and optimizer. It is written to a temp folder and renamed into place, with
`musubi_state.json` written last, so a crash mid-save leaves the previous state untouched and never a half
folder that looks complete.

Resuming is two steps: `read_state()` reads and checks every file and the flags (before the DiT loads, so a
bad state fails in seconds), `apply_state()` puts it into the built network/optimizer/scheduler.
"""

from __future__ import annotations

import argparse
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from musubi_tuner.errors import UserError
from musubi_tuner.training.checkpoint_files import read_state_marker, write_state_marker
from musubi_tuner.utils.atomic import atomic_directory, save_safetensors_atomic

logger = logging.getLogger(__name__)

STATE_FORMAT = 1
# Flags a state only fits with: another value gives other LoRA shapes or another optimizer state layout.
RESUME_FLAGS = ("network_module", "network_dim", "network_alpha", "network_args", "optimizer_type")


class StateError(UserError):
    """A --resume state that cannot be used (names the folder, the file or the flag)."""


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


@dataclass
class LoadedState:
    """A state folder read into memory and checked, ready for `apply_state`."""

    folder: Path
    progress: TrainProgress
    network_sd: dict[str, torch.Tensor]
    optimizer_sd: dict[str, Any]
    scheduler_sd: dict[str, Any] | None
    rng: dict[str, Any] | None
    reference_layout: bool = False
    """Saved by the reference (see reference_state): other key and optimizer orders."""


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


def resume_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name, None) for name in RESUME_FLAGS}


def save_state(folder: Path, *, network_sd: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               lr_scheduler: Any, rng_states: list[dict[str, Any]], progress: TrainProgress,
               flags: dict[str, Any] | None = None) -> None:
    """rng_states: `capture_rng()` of every process, in process order (each draws its own noise).
    flags: `resume_flags(args)`, checked against the resuming run's."""
    with atomic_directory(folder) as tmp:
        save_safetensors_atomic({k: v.detach().float().cpu() for k, v in network_sd.items()}, tmp / "network.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        for index, rng in enumerate(rng_states):
            torch.save(rng, tmp / rng_file(index))
        # written last: a folder without it is incomplete
        write_state_marker(tmp, {"format": STATE_FORMAT, **asdict(progress), "flags": flags or {}})


def read_progress(folder: Path) -> TrainProgress:
    return _read_marker(Path(folder))[0]


def _read_marker(folder: Path) -> tuple[TrainProgress, dict[str, Any]]:
    data = read_state_marker(folder)  # refuses a missing folder or an incomplete (interrupted) save
    if data.get("format") != STATE_FORMAT:
        raise StateError(f"--resume {folder}: state format {data.get('format')} is not supported (expected {STATE_FORMAT})")
    data.pop("format")
    flags = data.pop("flags", {})
    known = TrainProgress.__dataclass_fields__
    return TrainProgress(**{k: v for k, v in data.items() if k in known}), flags


def check_flags(folder: Path, saved: dict[str, Any], args: argparse.Namespace) -> None:
    """The flags that shape the LoRA and the optimizer must be those the state was saved with."""
    for name, value in saved.items():
        current = getattr(args, name, None)
        same = (str(value).lower() == str(current).lower()) if name == "optimizer_type" else value == current
        if not same:
            raise StateError(f"--resume {folder}: the state was saved with --{name} {_shown(value)}, this run has "
                             f"--{name} {_shown(current)}; use the same value to resume (or start a new run with "
                             "--network_weights <a saved LoRA file>)")


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) or "(none)"
    return "(default)" if value is None else str(value)


def load_torch_file(path: Path, folder: Path) -> Any:
    """A torch pickle of tensors and plain values (weights_only); a damaged file is a StateError naming it."""
    if not path.is_file():
        raise StateError(f"--resume {folder}: {path.name} is missing; the state is incomplete, use another one")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated pickles raise EOFError, UnpicklingError, RuntimeError...
        raise StateError(f"--resume {folder}: {path.name} is damaged ({type(exc).__name__}: {exc}); "
                         "the save was cut short, use an older state") from None


def load_safetensors_file(path: Path, folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise StateError(f"--resume {folder}: {path.name} is missing; the state is incomplete, use another one")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise StateError(f"--resume {folder}: {path.name} is damaged ({exc}); the save was cut short, "
                         "use an older state") from None


def read_state(folder: Path, args: argparse.Namespace, process_index: int = 0) -> LoadedState:
    """Read our state folder: every file loaded (so damage shows now) and the flags checked."""
    folder = Path(folder)
    progress, flags = _read_marker(folder)
    check_flags(folder, flags, args)
    rng_path = folder / rng_file(process_index)
    if process_index and not rng_path.exists():
        raise StateError(f"--resume {folder}: no {rng_path.name}; the state was saved by fewer processes than this "
                         "run has. Resume with the same number of processes")
    return LoadedState(
        folder=folder,
        progress=progress,
        network_sd=load_safetensors_file(folder / "network.safetensors", folder),
        optimizer_sd=load_torch_file(folder / "optimizer.pt", folder),
        scheduler_sd=load_torch_file(folder / "lr_scheduler.pt", folder),
        rng=load_torch_file(rng_path, folder),
    )


def apply_state(state: LoadedState, *, network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                lr_scheduler: Any, noise_generator: torch.Generator) -> TrainProgress:
    """Put a read state into the built network, optimizer, scheduler and RNGs; returns its progress."""
    folder = state.folder
    if state.reference_layout:
        from musubi_tuner.training.reference_state import load_reference_network, reorder_optimizer_state

        load_reference_network(network, state.network_sd, folder)
        optimizer_sd = reorder_optimizer_state(state.optimizer_sd, network, optimizer, folder)
    else:
        optimizer_sd = _load_our_network(network, state)
    try:
        optimizer.load_state_dict(optimizer_sd)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise StateError(f"--resume {folder}: the optimizer state does not fit this optimizer ({exc}); use the same "
                         "--optimizer_type/--optimizer_args and LoRA+ setting as the saved run") from None
    if state.scheduler_sd is not None:
        lr_scheduler.load_state_dict(state.scheduler_sd)
    if state.rng is not None:
        restore_rng(state.rng, noise_generator)
    return state.progress


def _load_our_network(network: torch.nn.Module, state: LoadedState) -> dict[str, Any]:
    folder = state.folder
    try:
        missing, unexpected = network.load_state_dict(state.network_sd, strict=False)
    except RuntimeError as exc:  # size mismatch: another rank
        raise StateError(f"--resume {folder}: the saved LoRA has other shapes than this network; use the same "
                         f"--network_dim/--network_args as the saved run ({str(exc).splitlines()[-1].strip()})") from None
    if missing or unexpected:
        raise StateError(f"--resume {folder}: the saved LoRA does not match this network "
                         f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}); use the same --network_dim/--network_args")
    return state.optimizer_sd
