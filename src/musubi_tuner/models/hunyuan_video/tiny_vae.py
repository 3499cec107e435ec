"""Tiny HunyuanVideo VAE: diffusers' `AutoencoderKLHunyuanVideo` at toy widths (the released block layout: 4
levels, 8x spatial / 4x temporal compression, 16 latent channels), seeded, and writers for users' layouts."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from musubi_tuner.models.hunyuan_video.vae_files import HV_VAE_SCALING_FACTOR

TINY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "down_block_types": ("HunyuanVideoDownBlock3D",) * 4,
    "up_block_types": ("HunyuanVideoUpBlock3D",) * 4,
    "block_out_channels": (8, 16, 32, 32),
    "layers_per_block": 1,
    "act_fn": "silu",
    "norm_num_groups": 8,  # what the loader infers for these widths (the largest power of two dividing all)
    "scaling_factor": HV_VAE_SCALING_FACTOR,
    "spatial_compression_ratio": 8,
    "temporal_compression_ratio": 4,
    "mid_block_add_attention": True,
}


def tiny_hv_vae(seed: int = 0):
    """A seeded tiny `AutoencoderKLHunyuanVideo` in eval mode."""
    from diffusers import AutoencoderKLHunyuanVideo

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLHunyuanVideo.from_config(TINY_VAE_CONFIG).eval()


def write_tiny_hv_vae(out_dir: str | os.PathLike, layout: str = "official_pt", seed: int = 0) -> Path:
    """Save `tiny_hv_vae(seed)` as `official_pt` (`vae/pytorch_model.pt`: `{"state_dict": {"vae.<key>": ...}}`,
    the wrapping the reference unwraps) or `comfy` (`hunyuan_video_vae_bf16.safetensors`, plain keys)."""
    from musubi_tuner.utils.atomic import atomic_path, save_safetensors_atomic

    sd = {k: v.detach().contiguous() for k, v in tiny_hv_vae(seed).state_dict().items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if layout == "comfy":
        path = out / "hunyuan_video_vae_tiny.safetensors"
        save_safetensors_atomic(sd, path)
        return path
    if layout != "official_pt":
        raise ValueError(f"unknown layout {layout!r}; use official_pt or comfy")
    path = out / "pytorch_model.pt"
    with atomic_path(path) as tmp:
        torch.save({"state_dict": {"vae." + k: v for k, v in sd.items()}}, str(tmp))
    return path
