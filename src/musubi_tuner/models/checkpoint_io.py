"""Safe, memory-frugal reading and atomic writing of state-dict files.

- `.safetensors`: opened with `safe_open`, so tensors are backed by the memory-mapped file until used.
- `.pt` / `.pth` / `.bin` / `.ckpt`: `torch.load(weights_only=True, mmap=True)`, never arbitrary unpickling.
- sharded `name-00001-of-00003.safetensors`: any one shard brings in all of them.

Every failure the user can fix is a `CheckpointError` naming the file and the flag that passed it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TypeVar

import torch

from musubi_tuner.errors import CheckpointError
from musubi_tuner.utils.atomic import atomic_path, save_safetensors_atomic

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WRAPPER_KEYS = ("module", "state_dict", "model")
"""Training scripts often save `{"state_dict": sd, ...}`; the official HunyuanVideo file uses `{"module": sd}`."""
COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.safetensors$")

V = TypeVar("V")


def _where(path: Path, flag: str | None) -> str:
    return f"{flag} {path}" if flag else str(path)


def shard_paths(path: str | os.PathLike, flag: str | None = None) -> list[Path]:
    """All files of a sharded safetensors checkpoint given any one shard; `[path]` for a single file."""
    path = Path(path)
    match = _SHARD_RE.match(path.name)
    if not match:
        return [path]
    total = int(match["total"])
    shards = [path.with_name(f"{match['stem']}-{i:05d}-of-{total:05d}.safetensors") for i in range(1, total + 1)]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise CheckpointError(f"{_where(path, flag)}: sharded checkpoint is incomplete, missing {', '.join(missing)} "
                              f"in {path.parent}; download every shard into the same folder")
    return shards


def _check_readable(path: Path, flag: str | None) -> None:
    if not path.exists():
        raise CheckpointError(f"{_where(path, flag)}: file not found; check the path passed to {flag or 'the loader'}")
    if not path.is_file():
        raise CheckpointError(f"{_where(path, flag)}: not a file (a folder?); pass the checkpoint file itself")


def _is_safetensors(path: Path) -> bool:
    return path.suffix.lower() == ".safetensors"


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    # Only floating tensors change dtype; integer buffers (e.g. step counters) are kept as saved.
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


def _load_safetensors(path: Path, dtype: torch.dtype | None, device: str | torch.device, flag: str | None) -> dict:
    from safetensors import SafetensorError, safe_open

    device = torch.device(device)
    # safetensors accepts "cpu" but not "cpu:0" (what accelerate reports in multi-process CPU runs)
    device_name = "cpu" if device.type == "cpu" else str(device)
    try:
        with safe_open(str(path), framework="pt", device=device_name) as f:
            return {key: _cast(f.get_tensor(key), dtype) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{_where(path, flag)}: not a readable .safetensors file ({exc}); "
                              "re-download it (an interrupted download leaves a truncated file)") from exc


_GLOBAL_RE = re.compile(r"unsupported global:? (?:GLOBAL )?(\S+)", re.IGNORECASE)


def _looks_like_pickle(path: Path) -> bool:
    """A torch zip archive (`PK`) or a raw pickle stream (protocol opcode 0x80): something torch.save could write."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return head.startswith(b"PK") or head[:1] == b"\x80"


def _pickle_error(path: Path, flag: str | None, exc: Exception) -> CheckpointError:
    """The weights-only unpickler refused the file: code/objects in a real pickle, or not a pickle at all."""
    found = _GLOBAL_RE.search(str(exc))
    if found is None and not _looks_like_pickle(path):
        return CheckpointError(f"{_where(path, flag)}: not a readable PyTorch weights file; "
                               "is it complete? re-download it")
    detail = f" ({found.group(1).rstrip('.')})" if found else ""
    return CheckpointError(
        f"{_where(path, flag)}: contains code/objects that are not plain tensors{detail}; refusing to unpickle it "
        "(pickles are only read with weights_only=True). Convert it to .safetensors on a machine where you trust "
        "the file, or use the official weights file")


def _torch_load(path: Path, device: str | torch.device, flag: str | None) -> object:
    try:
        return torch.load(str(path), map_location=device, weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise _pickle_error(path, flag, exc) from exc
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise CheckpointError(f"{_where(path, flag)}: cannot read this PyTorch file ({exc})") from exc
    # Legacy (pre-zip) torch.save format cannot be memory-mapped; read it whole, still weights-only.
    try:
        return torch.load(str(path), map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _pickle_error(path, flag, exc) from exc
    except Exception as exc:  # noqa: BLE001 - any other failure means an unreadable file
        raise CheckpointError(f"{_where(path, flag)}: cannot read this PyTorch file ({exc})") from exc


def _unwrap(obj: object, path: Path, flag: str | None) -> dict[str, torch.Tensor]:
    """`{"module"|"state_dict"|"model": sd}` -> sd; keeps only tensor entries."""
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(f"{_where(path, flag)}: no tensors found (expected a state dict, or one wrapped in "
                          f"{'/'.join(WRAPPER_KEYS)}); is this a model weights file?")


def load_state_dict(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", flag: str | None = None) -> dict[str, torch.Tensor]:
    """Read a checkpoint into `{key: tensor}`.

    `dtype` casts floating tensors (None keeps the file's dtypes). `flag` names the command-line flag that
    passed `path`, for error messages. Keys are returned as stored (see `strip_prefix`).
    """
    path = Path(path)
    _check_readable(path, flag)
    if _is_safetensors(path):
        state: dict[str, torch.Tensor] = {}
        for shard in shard_paths(path, flag):
            state.update(_load_safetensors(shard, dtype, device, flag))
        return state
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{_where(path, flag)}: unknown checkpoint type {path.suffix!r}; "
                              f"expected .safetensors or one of {', '.join(PICKLE_SUFFIXES)}")
    state = _unwrap(_torch_load(path, device, flag), path, flag)
    return {k: _cast(v, dtype) for k, v in state.items()}


def _read_header(path: Path, flag: str | None) -> dict:
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                raise ValueError("header size is implausible")
            return json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise CheckpointError(f"{_where(path, flag)}: not a readable .safetensors file ({exc}); "
                              "re-download it (an interrupted download leaves a truncated file)") from exc


def read_safetensors_keys(path: str | os.PathLike, flag: str | None = None) -> dict[str, tuple[int, ...]]:
    """Keys and shapes from the header(s) only, without reading tensor data (for detecting what a file is)."""
    path = Path(path)
    _check_readable(path, flag)
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shard_paths(path, flag):
        header = _read_header(shard, flag)
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


def read_keys_and_shapes(path: str | os.PathLike, flag: str | None = None) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of any checkpoint: header only for safetensors, a memory-mapped load for pickles."""
    path = Path(path)
    if _is_safetensors(path):
        return read_safetensors_keys(path, flag)
    return {k: tuple(v.shape) for k, v in load_state_dict(path, flag=flag).items()}


def strip_prefix(state_dict: Mapping[str, V], prefixes: Iterable[str] = COMFY_PREFIXES) -> dict[str, V]:
    """Remove the first prefix in `prefixes` that any key carries (ComfyUI's `model.diffusion_model.`).

    Keys without that prefix are dropped: in a combined checkpoint (DiT + VAE + text encoder) they belong
    to the other models. With no matching prefix the dict is returned unchanged (as a new dict).
    """
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def model_from_state_dict(make_model, state_dict: Mapping[str, torch.Tensor], error_prefix: str):
    """`make_model()` built on the meta device (no random init), then given `state_dict`'s tensors as its
    weights (strict). A mismatch is a `CheckpointError` starting with `error_prefix` (name the flag and file)."""
    with torch.device("meta"):
        model = make_model()
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{error_prefix}: {str(exc)[:300]}") from exc
    return model


def count_numbered(keys: Iterable[str], pattern: str) -> int:
    """How many numbered blocks a key layout has: `pattern` is a regex whose group 1 is the block index
    (e.g. `r"layers\\.(\\d+)\\."`); the highest index + 1, 0 when no key matches."""
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    metadata: dict[str, str] | None = None) -> None:
    """Write atomically: `.safetensors` (with string metadata) or a weights-only `torch.save` for pickles."""
    path = Path(path)
    if _is_safetensors(path):
        save_safetensors_atomic(dict(state_dict), path, metadata=metadata)
        return
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: cannot save as {path.suffix!r}; use .safetensors (recommended) or .pt/.pth")
    with atomic_path(path) as tmp:
        torch.save({k: v.contiguous() for k, v in state_dict.items()}, str(tmp))
