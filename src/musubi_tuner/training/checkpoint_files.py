"""Checkpoint and state names (the reference's), pruning of old saves, and complete-state checks.

Files: `{name}-{epoch:06d}.safetensors`, `{name}-step{step:08d}.safetensors`, final `{name}.safetensors`.
State folders: `{name}-{epoch:06d}-state`, `{name}-step{step:08d}-state`, final `{name}-state`.

Pruning follows the reference's observable behaviour:
- epochs (`--save_last_n_epochs[_state]` = K): after saving epoch N only the last K epoch saves remain;
- steps (`--save_last_n_steps[_state]` = N steps, a step window, not a count): after saving step S,
  saves older than S - N are removed (with every 10 / last 30, step 50 keeps 20, 30, 40, 50).
Unlike the reference, every stale save of the kind is listed (not just one computed number), so
saves left behind by an interrupted run are cleaned up too; saves newer than `current` are kept.

A state folder is complete only when its marker file `musubi_state.json` exists; the trainer writes
it last, atomically, after everything else in the folder.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Literal

from musubi_tuner.errors import UserError
from musubi_tuner.utils.atomic import (
    BACKUP_SUFFIX,
    backup_path,
    leftover_temp_paths,
    path_size,
    restore_interrupted_replacement,
    write_text_atomic,
)

logger = logging.getLogger(__name__)

STATE_MARKER = "musubi_state.json"
Kind = Literal["epoch", "step", "epoch_state", "step_state"]
KINDS = ("epoch", "step", "epoch_state", "step_state")


def epoch_ckpt_name(name: str, epoch: int) -> str:
    return f"{name}-{epoch:06d}.safetensors"


def step_ckpt_name(name: str, step: int) -> str:
    return f"{name}-step{step:08d}.safetensors"


def last_ckpt_name(name: str) -> str:
    return f"{name}.safetensors"


def epoch_state_name(name: str, epoch: int) -> str:
    return f"{name}-{epoch:06d}-state"


def step_state_name(name: str, step: int) -> str:
    return f"{name}-step{step:08d}-state"


def last_state_name(name: str) -> str:
    return f"{name}-state"


def state_dir_name(name: str, kind: str, number: int | None) -> str:
    """State folder of a save: kind `epoch` / `step` (with its number) or `final`."""
    if kind == "final":
        return last_state_name(name)
    return {"epoch": epoch_state_name, "step": step_state_name}[kind](name, number)


def name_for(kind: Kind, name: str, number: int) -> str:
    """The file/folder name of save `number` (epoch or step) of `kind`."""
    return {
        "epoch": epoch_ckpt_name,
        "step": step_ckpt_name,
        "epoch_state": epoch_state_name,
        "step_state": step_state_name,
    }[kind](name, number)


def _pattern(kind: Kind, name: str) -> re.Pattern[str]:
    number = r"(\d{6,})" if kind.startswith("epoch") else r"step(\d{8,})"
    suffix = r"\.safetensors" if kind in ("epoch", "step") else r"-state"
    return re.compile(re.escape(name) + "-" + number + suffix)


def list_saves(output_dir: str | Path, name: str, kind: Kind) -> dict[int, Path]:
    """Existing saves of `kind` for `name`, by epoch/step number."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return {}
    pattern = _pattern(kind, name)
    found: dict[int, Path] = {}
    for entry in output_dir.iterdir():
        match = pattern.fullmatch(entry.name)
        is_state = kind.endswith("state")
        if match and (entry.is_dir() if is_state else entry.is_file()):
            found[int(match.group(1))] = entry
    return found


def files_to_prune(output_dir: str | Path, name: str, kind: Kind, keep_last_n: int | None, current: int) -> list[Path]:
    """Saves of `kind` to delete after saving number `current` (see the module doc for the rules).

    keep_last_n: --save_last_n_epochs[_state] (a count) for epoch kinds, --save_last_n_steps[_state]
    (a step window) for step kinds; None keeps everything. Sorted oldest first.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if keep_last_n is None:
        return []
    saves = {n: p for n, p in list_saves(output_dir, name, kind).items() if n <= current}
    if kind.startswith("epoch"):
        numbers = sorted(saves)
        stale = numbers[: max(len(numbers) - keep_last_n, 0)]
    else:
        stale = sorted(n for n in saves if n < current - keep_last_n)
    return [saves[n] for n in stale]


def keep_last_n_for(args: Any, kind: Kind) -> int | None:
    """The --save_last_n_* value that governs `kind`; the *_state flags override for states."""
    unit = "epochs" if kind.startswith("epoch") else "steps"
    base = getattr(args, f"save_last_n_{unit}", None)
    if kind.endswith("state"):
        override = getattr(args, f"save_last_n_{unit}_state", None)
        return override if override else base
    return base


def stale_saves(output_dir: str | Path, args: Any, kind: Literal["epoch", "step"], current: int) -> list[Path]:
    """LoRA files and state folders of `kind` to delete after save `current`, per the --save_last_n_* flags."""
    stale: list[Path] = []
    for what in (kind, f"{kind}_state"):
        stale += files_to_prune(output_dir, args.output_name, what, keep_last_n_for(args, what), current)
    return stale


def remove_path(path: str | Path) -> None:
    """Delete a pruned LoRA file or state folder (gone already is fine)."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


# ---- state completeness --------------------------------------------------------------------------


def write_state_marker(state_dir: str | Path, info: dict[str, Any]) -> None:
    """Mark `state_dir` complete; call after everything else in it is written."""
    write_text_atomic(Path(state_dir) / STATE_MARKER, json.dumps(info, indent=2, sort_keys=True))


def read_state_marker(state_dir: str | Path) -> dict[str, Any]:
    """The marker of a complete state folder; `UserError` when missing or incomplete (--resume check)."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise UserError(f"--resume {state_dir}: no such state folder")
    marker = state_dir / STATE_MARKER
    if not marker.is_file():
        raise UserError(f"--resume {state_dir}: incomplete state (interrupted save?); {STATE_MARKER} is missing")
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--resume {state_dir}: {STATE_MARKER} is unreadable ({exc})") from None


def is_complete_state(state_dir: str | Path) -> bool:
    """Ours (marker present) or one saved by the reference (see `is_reference_state`)."""
    return (Path(state_dir) / STATE_MARKER).is_file() or is_reference_state(state_dir)


# The reference saves states with accelerate's save_state: these files, no marker (see training.reference_state).
REFERENCE_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
REFERENCE_OPTIMIZER_FILE = "optimizer.bin"


def is_reference_state(folder: str | Path) -> bool:
    """A folder in accelerate's save_state layout, without our marker."""
    folder = Path(folder)
    return (folder.is_dir() and not (folder / STATE_MARKER).exists() and (folder / REFERENCE_OPTIMIZER_FILE).is_file()
            and any((folder / name).is_file() for name in REFERENCE_WEIGHT_FILES))


def find_latest_complete_state(output_dir: str | Path, name: str) -> Path | None:
    """Newest complete state of `name`, by step number (epoch states ranked after their step via the
    marker's `global_step` when present), or the final `{name}-state`. None when there is none.

    A state parked by an interrupted replacement (`.{folder}.old`, see utils.atomic) counts for its folder
    while that folder is missing or incomplete."""
    candidates: list[tuple[int, int, Path]] = []
    for kind in ("step_state", "epoch_state"):
        for number, path in _state_folders(output_dir, name, kind).items():
            step = _marker_step(path, number if kind == "step_state" else -1)
            candidates.append((step, 0, path))
    final = _complete_or_parked(Path(output_dir) / last_state_name(name))
    if final is not None:
        candidates.append((_marker_step(final, -1), 1, final))
    return max(candidates, key=lambda c: (c[0], c[1]))[2] if candidates else None


def _complete_or_parked(folder: Path) -> Path | None:
    for candidate in (folder, backup_path(folder)):
        if is_complete_state(candidate):
            return candidate
    return None


def _state_folders(output_dir: str | Path, name: str, kind: Kind) -> dict[int, Path]:
    """Complete state folders of `kind` by number, including parked ones whose folder is gone."""
    found: dict[int, Path] = {}
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return found
    pattern = _pattern(kind, name)
    for entry in output_dir.iterdir():
        plain = entry.name[1:-len(BACKUP_SUFFIX)] if entry.name.endswith(BACKUP_SUFFIX) else entry.name
        match = pattern.fullmatch(plain)
        if match and entry.is_dir():
            path = _complete_or_parked(output_dir / plain)
            if path is not None:
                found[int(match.group(1))] = path
    return found


def clean_interrupted_saves(output_dir: str | Path, name: str) -> None:
    """Start-of-run housekeeping for saves of `name` that a killed run left behind in `output_dir`: a state
    folder parked mid-replacement is put back; our own temp files/folders (`.{name}....tmp`) are removed.
    Only names matching the temp pattern of utils.atomic are touched; each removal is logged."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return

    def is_ours(target: str) -> bool:  # `{name}.safetensors`, `{name}-...` (saves and states), nothing else
        return target == last_ckpt_name(name) or target.startswith(f"{name}-")

    for entry in output_dir.iterdir():
        if entry.name.startswith(".") and entry.name.endswith(BACKUP_SUFFIX) and is_ours(entry.name[1:-len(BACKUP_SUFFIX)]):
            target = output_dir / entry.name[1:-len(BACKUP_SUFFIX)]
            if restore_interrupted_replacement(target):
                logger.warning("restored %s: a save was interrupted while replacing it", target)
    leftovers = leftover_temp_paths(output_dir, is_ours)
    total = 0
    for path in leftovers:
        size = path_size(path)
        remove_path(path)
        total += size
        logger.info("removed %s (%.1f MB) left by an interrupted save", path.name, size / 2**20)
    if leftovers:
        logger.info("cleaned up %d leftover(s) of interrupted saves in %s, %.1f MB freed", len(leftovers),
                    output_dir, total / 2**20)


def _marker_step(path: Path, default: int) -> int:
    try:
        return int(json.loads((path / STATE_MARKER).read_text(encoding="utf-8")).get("global_step", default))
    except (ValueError, OSError, AttributeError):
        return default
