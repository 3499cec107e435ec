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
import re
import shutil
from pathlib import Path
from typing import Any, Literal

from musubi_tuner.errors import UserError
from musubi_tuner.utils.atomic import write_text_atomic

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
    return (Path(state_dir) / STATE_MARKER).is_file()


def find_latest_complete_state(output_dir: str | Path, name: str) -> Path | None:
    """Newest complete state of `name`, by step number (epoch states ranked after their step via the
    marker's `global_step` when present), or the final `{name}-state`. None when there is none."""
    candidates: list[tuple[int, int, Path]] = []
    for kind in ("step_state", "epoch_state"):
        for number, path in list_saves(output_dir, name, kind).items():
            if is_complete_state(path):
                step = _marker_step(path, number if kind == "step_state" else -1)
                candidates.append((step, 0, path))
    final = Path(output_dir) / last_state_name(name)
    if is_complete_state(final):
        candidates.append((_marker_step(final, -1), 1, final))
    return max(candidates, key=lambda c: (c[0], c[1]))[2] if candidates else None


def _marker_step(path: Path, default: int) -> int:
    try:
        return int(json.loads((path / STATE_MARKER).read_text(encoding="utf-8")).get("global_step", default))
    except (ValueError, OSError, AttributeError):
        return default
