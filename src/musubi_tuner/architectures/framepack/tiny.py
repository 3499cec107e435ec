"""Tiny FramePack DiT: diffusers' `HunyuanVideoFramepackTransformer3DModel` at toy sizes, seeded, and a writer for
the three layouts users have: lllyasviel's 3 shards (`diffusion_pytorch_model-0000N-of-00003.safetensors` + index),
one repacked file (Kijai's `FramePackI2V_HY_bf16.safetensors`) and a diffusers folder (`config.json` + weights).

The tiny HunyuanVideo DiT's config (its text widths fit the tiny HunyuanVideo text encoders) plus the image
projection, whose input is the tiny SigLIP's hidden size, and the history embedder. The loader reads every size
from the weights, so these files go through the code paths of the released ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from musubi_tuner.architectures.hunyuan_video.tiny import TINY_DIT_CONFIG
from musubi_tuner.models.siglip_files import TINY_SIGLIP_HIDDEN

TINY_FRAMEPACK_CONFIG = {
    **TINY_DIT_CONFIG,  # the tiny HunyuanVideo DiT's, whose text widths fit the tiny HunyuanVideo text encoders
    "image_condition_type": None,
    "has_image_proj": True,
    "image_proj_dim": TINY_SIGLIP_HIDDEN,
    "has_clean_x_embedder": True,
}

LAYOUTS = ("shards", "single", "diffusers")
SHARD_COUNT = 3
SHARD_STEM = "diffusion_pytorch_model"
SINGLE_FILE_NAME = "FramePackI2V_HY_tiny.safetensors"


def tiny_framepack_config(single_layers: int = 2) -> dict:
    """A copy of the tiny config (2 double + 2 single blocks, 2 heads of 16, history embedder, image projection).
    single_layers: 4 lets `--blocks_to_swap 1` swap blocks (the reference's split takes 3 single blocks)."""
    return {**TINY_FRAMEPACK_CONFIG, "num_single_layers": single_layers}


def tiny_framepack_dit(seed: int = 0, single_layers: int = 2):
    """A seeded tiny `HunyuanVideoFramepackTransformer3DModel` in eval mode; every tensor non-trivial (diffusers
    zero-initialises some layers), so a swapped or missing weight changes the output."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    from musubi_tuner.architectures.framepack.dit_files import mark_repeated_blocks

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HunyuanVideoFramepackTransformer3DModel.from_config(tiny_framepack_config(single_layers))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return mark_repeated_blocks(model).eval()


def _shard_names(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """key -> shard file name, keys split in sorted order into SHARD_COUNT nearly equal groups."""
    keys = sorted(state)
    per_shard = -(-len(keys) // SHARD_COUNT)
    return {key: f"{SHARD_STEM}-{i // per_shard + 1:05d}-of-{SHARD_COUNT:05d}.safetensors" for i, key in enumerate(keys)}


def save_tiny_framepack(folder: str | os.PathLike, layout: str = "shards", seed: int = 0,
                        dtype: torch.dtype | None = None, single_layers: int = 2) -> Path:
    """Save `tiny_framepack_dit(seed, single_layers)` under `folder` in `layout`; returns what a user passes as --dit:

    - `shards`: the first of 3 shards plus `diffusion_pytorch_model.safetensors.index.json` (lllyasviel's release);
    - `single`: one safetensors file (the bf16 repacks; `dtype` casts floats, None keeps float32);
    - `diffusers`: a folder with `config.json` and `diffusion_pytorch_model.safetensors`.
    """
    from musubi_tuner.models.checkpoint_io import save_state_dict
    from musubi_tuner.utils.atomic import write_text_atomic

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in tiny_framepack_dit(seed, single_layers).state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if layout == "single":
        path = folder / SINGLE_FILE_NAME
        save_state_dict(state, path)
        return path
    if layout == "diffusers":
        config = {"_class_name": "HunyuanVideoFramepackTransformer3DModel", **tiny_framepack_config(single_layers)}
        write_text_atomic(folder / "config.json", json.dumps(config, indent=2))
        save_state_dict(state, folder / f"{SHARD_STEM}.safetensors")
        return folder
    weight_map = _shard_names(state)
    for shard in sorted(set(weight_map.values())):
        save_state_dict({k: v for k, v in state.items() if weight_map[k] == shard}, folder / shard)
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
             "weight_map": weight_map}
    write_text_atomic(folder / f"{SHARD_STEM}.safetensors.index.json", json.dumps(index, indent=2))
    return folder / sorted(set(weight_map.values()))[0]
