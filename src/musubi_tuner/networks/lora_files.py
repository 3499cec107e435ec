"""Reading and writing LoRA files (any supported layout), with hashes, atomically.

Layout detection and conversion live in `lora_formats` (re-exported here); metadata in `lora_metadata`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from musubi_tuner.errors import CheckpointError
from musubi_tuner.networks.lora_formats import (  # noqa: F401  (public re-exports)
    FORMATS,
    LoraWeights,
    NameIndex,
    convert_state_dict,
    detect_format,
    parse_lora_state_dict,
    to_default,
    to_diffusers,
    to_other,
)
from musubi_tuner.networks.lora_metadata import (  # noqa: F401
    build_modelspec,
    build_training_metadata,
    safetensors_hashes,
)
from musubi_tuner.utils.atomic import save_safetensors_atomic


def load_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a `.safetensors` file, or of a `.pt/.pth/.ckpt` read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"LoRA file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118 (not iterable)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read LoRA file {path}: {exc}") from exc
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types; all mean "not a usable file"
        raise CheckpointError(
            f"cannot read LoRA file {path} (only tensors are loaded, weights_only=True): {exc}"
        ) from exc
    if not isinstance(sd, dict):
        raise CheckpointError(f"LoRA file {path} does not hold a state dict")
    return sd, {}


def save_lora_file(
    state_dict: dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
    add_hashes: bool = True,
) -> None:
    """Write a `.safetensors` LoRA atomically; floating tensors cast to `dtype`; `sshs_*` hashes added."""
    tensors = {k: _cast(v.detach().to("cpu"), dtype) for k, v in state_dict.items()}
    metadata = dict(metadata or {})
    if add_hashes:
        metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = safetensors_hashes(tensors, metadata)
    if Path(path).suffix != ".safetensors":
        raise CheckpointError(f"LoRA files are written as .safetensors; got {path}")
    save_safetensors_atomic(tensors, path, metadata=metadata or None)


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t
