"""Tiny HunyuanVideo DiT: diffusers' `HunyuanVideoTransformer3DModel` at toy sizes, seeded, and writers for the
layouts users have (official `{"module": ...}` `.pt`, ComfyUI prefixed safetensors).

Widths fit the tiny text encoders: LLM hidden 32 = `text_embed_dim`, CLIP pooled 32 = `pooled_projection_dim`;
16 latent channels as the real VAE (32 input channels for the SkyReels V1 I2V variant). The loaders infer every
size from the weights, so these files go through the code paths of the released ones.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from musubi_tuner.architectures.hunyuan_video.dit_files import save_hv_dit_original

TINY_TEXT_DIM = 32
TINY_POOLED_DIM = 32
TINY_DIT_CONFIG = {
    "in_channels": 16,
    "out_channels": 16,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "num_refiner_layers": 1,
    "mlp_ratio": 4.0,
    "patch_size": 2,
    "patch_size_t": 1,
    "qk_norm": "rms_norm",
    "guidance_embeds": True,
    "text_embed_dim": TINY_TEXT_DIM,
    "pooled_projection_dim": TINY_POOLED_DIM,
    "rope_theta": 256.0,
    "rope_axes_dim": (4, 6, 6),
}


def tiny_hv_config(in_channels: int = 16, single_layers: int = 2) -> dict:
    """The tiny config; `in_channels=32` is the SkyReels V1 I2V variant (image latents concatenated).
    single_layers: 4 lets `--blocks_to_swap 1` swap blocks (the reference's split takes 3 single blocks)."""
    return {**TINY_DIT_CONFIG, "in_channels": in_channels, "num_single_layers": single_layers}


def tiny_hv_dit(seed: int = 0, in_channels: int = 16, single_layers: int = 2):
    """A seeded tiny `HunyuanVideoTransformer3DModel` (2 double + 2 single blocks, 2 heads of 16), eval mode."""
    from diffusers import HunyuanVideoTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HunyuanVideoTransformer3DModel.from_config(tiny_hv_config(in_channels, single_layers))
        # diffusers zero-initialises nothing here, but make every tensor non-trivial so a mix-up shows
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def write_tiny_hv_dit(out_dir: str | os.PathLike, layout: str = "official_pt", seed: int = 0,
                      in_channels: int = 16, single_layers: int = 2) -> Path:
    """Save `tiny_hv_dit(seed, in_channels)` as `official_pt` (`mp_rank_00_model_states.pt`), `comfy`
    (`model.diffusion_model.` safetensors) or `safetensors` (official names, no prefix); returns the path."""
    names = {"official_pt": "mp_rank_00_model_states.pt", "comfy": "hunyuan_video_tiny_bf16.safetensors",
             "safetensors": "hunyuan_video_tiny.safetensors"}
    path = Path(out_dir) / names[layout]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_hv_dit_original(tiny_hv_dit(seed, in_channels, single_layers), path, layout=layout)
    return path
