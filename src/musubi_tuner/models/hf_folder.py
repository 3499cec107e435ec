"""Hugging Face model folders (`config.json` + `model.safetensors` / shards / `pytorch_model.bin`), offline.

Official HunyuanVideo ships its text encoders this way (`text_encoder`, `text_encoder_2`). We read the
config and the weights ourselves instead of `from_pretrained`, so that single files and folders go through
the same model builders (key normalisation, fp8 casting, error messages naming the flag).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from musubi_tuner.errors import CheckpointError
from musubi_tuner.models.checkpoint_io import load_state_dict, shard_paths

_INDEX_FILES = ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json",
                "pytorch_model.bin.index.json")
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")


def weight_files(folder: str | os.PathLike, flag: str) -> list[Path]:
    """The weight files of a model folder: those its index names, else every `*.safetensors` (or `.bin`)."""
    folder = Path(folder)
    for index in _INDEX_FILES:
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text(encoding="utf-8")).get("weight_map", {})
            return [folder / name for name in sorted(set(weight_map.values()))]
    for pattern in _WEIGHT_GLOBS:
        found = sorted(folder.glob(pattern))
        if found:
            return found
    raise CheckpointError(f"{flag} {folder}: no model weights in this folder (expected model.safetensors, "
                          "shards with an index, or pytorch_model.bin); pass the model folder or its single file")


def read_model_folder(
    folder: str | os.PathLike, flag: str, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, or {} without one; the folder's whole state dict)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{flag} {config_path}: not valid JSON ({exc}); re-download config.json") from exc
    state: dict[str, torch.Tensor] = {}
    done: set[Path] = set()
    for file in weight_files(folder, flag):
        if file in done:
            continue
        done.update(shard_paths(file, flag))  # one shard name brings in its siblings
        state.update(load_state_dict(file, dtype=dtype, device=device, flag=flag))
    return config, state
