"""Tiny Wan presets: the same diffusers classes with 2 layers and small widths, seeded, for tests and the demo.

The DiT keeps the published 128-wide heads (2 heads, width 256) so the loaders infer its config from the
weights by the same rule as for real files. Its text width (32) matches the tiny umT5 (d_model 32) and its
CLIP image width (32) the tiny CLIP vision tower. The VAE keeps the Wan2.1 block layout (diffusers'
converter depends on it) with base width 8.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.architectures.wan.dit_files import MODE_IN_DIM, _diffusers_config, get_wan_task, save_wan_dit_original
from musubi_tuner.architectures.wan.vae_files import save_wan_vae_original

TINY_TEXT_DIM = 32
"""= d_model of the tiny umT5."""
TINY_CLIP_DIM = 32
"""= hidden size of the tiny CLIP vision tower (image context for I2V/FLF2V)."""
TINY_CLIP_TOKENS = 17
"""Image tokens per frame of the tiny CLIP (56 px / patch 14 -> 16 + class token; the real one gives 257);
sizes the FLF2V position embedding over the first and last frame."""


def tiny_dit_config(task: str = "t2v-1.3B") -> dict[str, Any]:
    """`WanTransformer3DModel` config of the tiny preset for a `--task` (only its mode matters)."""
    mode = get_wan_task(task).mode
    return _diffusers_config(dim=256, num_heads=2, num_layers=2, ffn_dim=64, in_dim=MODE_IN_DIM[mode],
                             mode=mode, text_dim=TINY_TEXT_DIM, freq_dim=32, image_dim=TINY_CLIP_DIM,
                             image_tokens=TINY_CLIP_TOKENS)


def tiny_vae_config() -> dict[str, Any]:
    """`AutoencoderKLWan` config of the tiny preset (published layout and latent statistics, base width 8)."""
    return {"base_dim": 8, "z_dim": 16}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Seeded noise on every parameter, so zero-initialised biases/embeddings and unit norms also carry
    distinct values and a mis-mapped key cannot go unnoticed in output comparisons."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator, dtype=torch.float32).to(param.dtype))


def make_tiny_dit(task: str = "t2v-1.3B", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A seeded tiny `WanTransformer3DModel` for `task` (eval mode)."""
    from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel.from_config(tiny_dit_config(task))
    _perturb(model, seed)
    keep = model._keep_in_fp32_modules or []
    for name, param in model.named_parameters():
        if not any(part in keep for part in name.split(".")):  # fp32 islands as from_pretrained keeps them
            param.data = param.data.to(dtype)
    return model.eval()


def make_tiny_vae(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A seeded tiny `AutoencoderKLWan` (eval mode)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan.from_config(tiny_vae_config())
    _perturb(vae, seed)
    return (vae if dtype == torch.float32 else vae.to(dtype)).eval()


def write_tiny_wan_files(out_dir: str | os.PathLike, task: str = "t2v-1.3B", *, dtype: torch.dtype = torch.float32,
                         seed: int = 0, comfy_prefix: bool = False) -> dict[str, Path]:
    """Save the tiny DiT (original/ComfyUI layout) and VAE (original layout) as `.safetensors` files.

    fp32 (default) keeps round trips exact; bf16 mimics the published files. Returns {"dit": ..., "vae": ...}.
    """
    out_dir = Path(out_dir)
    mode = get_wan_task(task).mode
    dtype_name = str(dtype).removeprefix("torch.").replace("float", "fp").replace("bfp16", "bf16")
    paths = {"dit": out_dir / f"wan2.1_{mode}_tiny_{dtype_name}.safetensors",
             "vae": out_dir / "wan_2.1_vae_tiny.safetensors"}
    save_wan_dit_original(make_tiny_dit(task, seed), paths["dit"], dtype=dtype,
                          prefix="model.diffusion_model." if comfy_prefix else "")
    save_wan_vae_original(make_tiny_vae(seed), paths["vae"], dtype=dtype)
    return paths
