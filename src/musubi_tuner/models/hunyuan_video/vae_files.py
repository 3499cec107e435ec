"""The HunyuanVideo VAE (shared with FramePack): users' files -> diffusers' `AutoencoderKLHunyuanVideo`, latent
scaling, and the reference's memory switches.

Files: the official `vae/pytorch_model.pt` (a pickle, weights possibly under `state_dict` and prefixed `vae.`),
ComfyUI's `hunyuan_video_vae_bf16.safetensors` and diffusers' `diffusion_pytorch_model.safetensors` all use the
names diffusers' class has, so they load strictly without renaming. The config is read from the weights.

Memory switches, with the reference's meaning:
- `--vae_chunk_size N`: every causal 3D convolution runs over at most N output frames at a time. Exact: the
  output equals the unchunked one; only the peak memory changes.
- `--vae_tiling`: spatial tiles of 256 px overlapping by a quarter (stride 192), blended at the seams.
- `--vae_spatial_tile_sample_min_size S`: spatial tiles of S px (stride 3/4 of S); implies tiling.
Temporal tiling, which diffusers turns on by default for long videos, stays off: the reference encodes and
decodes the whole clip at once, so caches made here equal the reference's.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from musubi_tuner.errors import CheckpointError, UserError
from musubi_tuner.models.checkpoint_io import load_state_dict, strip_prefix
from musubi_tuner.models.file_kinds import describe_checkpoint, sample_keys
from musubi_tuner.models.meta_loading import assign_weights

__all__ = ["HV_VAE_SCALING_FACTOR", "infer_hv_vae_config", "load_hv_vae", "configure_hv_vae_memory",
           "encode_hv_latents", "decode_hv_latents", "decode_hv_pixels", "set_causal_conv_chunk_size"]

HV_VAE_SCALING_FACTOR = 0.476986
"""DiT latents = VAE latents * this (no shift), as the reference and diffusers' pipeline."""
TILE_OVERLAP = 0.25
"""The reference's spatial tile overlap factor: stride = tile * (1 - overlap)."""
DEFAULT_TILE = 256
EXPECTED = "the HunyuanVideo VAE: vae/pytorch_model.pt or hunyuan_video_vae_bf16.safetensors"
_MARKER = "decoder.up_blocks.0.resnets.0.conv1.conv.weight"


# ---- config ----------------------------------------------------------------------------------------------
def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def _group_count(channels: tuple[int, ...]) -> int:
    """GroupNorm groups are not stored in the weights: the released VAE uses 32; narrower presets the largest
    power of two dividing every width."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c in channels))


def infer_hv_vae_config(shapes: Mapping[str, Any], *, source: str = "the checkpoint", flag: str = "--vae") -> dict:
    """`AutoencoderKLHunyuanVideo` config from a state dict (tensors or shapes). Released: block_out
    (128, 256, 512, 512), 2 resnets per level, 16 latent channels, 8x spatial / 4x temporal compression."""
    shape = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in shapes.items()}
    if _MARKER not in shape or "encoder.conv_in.conv.weight" not in shape:
        kind = describe_checkpoint(shape) or f"not a HunyuanVideo VAE (first keys: {sample_keys(shape)})"
        raise CheckpointError(f"{flag} {source} is {kind}; {flag} expects {EXPECTED}")
    levels = _count(shape, r"encoder\.down_blocks\.(\d+)\.")
    block_out = tuple(shape[f"encoder.down_blocks.{i}.resnets.0.conv2.conv.weight"][0] for i in range(levels))
    return {
        "in_channels": shape["encoder.conv_in.conv.weight"][1],
        "out_channels": shape["decoder.conv_out.conv.weight"][0],
        "latent_channels": shape["decoder.conv_in.conv.weight"][1],
        "down_block_types": ("HunyuanVideoDownBlock3D",) * levels,
        "up_block_types": ("HunyuanVideoUpBlock3D",) * levels,
        "block_out_channels": block_out,
        "layers_per_block": _count(shape, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        "act_fn": "silu",
        "norm_num_groups": _group_count(block_out),
        "scaling_factor": HV_VAE_SCALING_FACTOR,
        "spatial_compression_ratio": 8,
        "temporal_compression_ratio": 4,
        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in shape,
    }


# ---- loading ---------------------------------------------------------------------------------------------
def load_hv_vae(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16,
                flag: str = "--vae") -> nn.Module:
    """Load the HunyuanVideo VAE (official `.pt`, ComfyUI or diffusers file) as a frozen, eval-mode
    `AutoencoderKLHunyuanVideo` in `dtype` (the reference's default is float16), temporal tiling off."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLHunyuanVideo

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{flag} {path} is a folder; {flag} expects {EXPECTED} (a single file)")
    state = strip_prefix(load_state_dict(path, device="cpu", flag=flag), ("vae.", "first_stage_model."))
    config = infer_hv_vae_config(state, source=str(path), flag=flag)
    with init_empty_weights():
        vae = AutoencoderKLHunyuanVideo.from_config(config)
    assign_weights(vae, state, dtype=dtype, source=str(path), flag=flag, device=device, what="HunyuanVideo VAE")
    configure_hv_vae_memory(vae)
    return vae.eval().requires_grad_(False)


# ---- memory switches ---------------------------------------------------------------------------------------
def _chunked_causal_conv(module: nn.Module, chunk: int, hidden_states: torch.Tensor) -> torch.Tensor:
    """`HunyuanVideoCausalConv3d.forward` over at most `chunk` output frames at a time (same result)."""
    padded = F.pad(hidden_states, module.time_causal_padding, mode=module.pad_mode)
    conv = module.conv
    kernel, stride, dilation = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    span = dilation * (kernel - 1) + 1
    frames_out = (padded.shape[2] - span) // stride + 1
    if frames_out <= chunk:
        return conv(padded)
    outs = []
    for first in range(0, frames_out, chunk):
        last = min(first + chunk, frames_out)  # output frames [first, last) read inputs [first*s, (last-1)*s+span)
        outs.append(conv(padded[:, :, first * stride : (last - 1) * stride + span]))
    return torch.cat(outs, dim=2)


def set_causal_conv_chunk_size(vae: nn.Module, chunk_size: int | None) -> int:
    """`--vae_chunk_size`: chunk every causal 3D convolution over time (None restores the plain forward).
    Returns how many convolutions were changed."""
    from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import HunyuanVideoCausalConv3d

    if chunk_size is not None and chunk_size < 1:
        raise UserError(f"--vae_chunk_size {chunk_size}: must be a positive number of frames (e.g. 32)")
    changed = 0
    for module in vae.modules():
        if isinstance(module, HunyuanVideoCausalConv3d):
            if chunk_size is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = functools.partial(_chunked_causal_conv, module, chunk_size)
            changed += 1
    return changed


def configure_hv_vae_memory(vae: nn.Module, *, chunk_size: int | None = None, tiling: bool = False,
                            spatial_tile_sample_min_size: int | None = None) -> None:
    """Apply `--vae_chunk_size`, `--vae_tiling` and `--vae_spatial_tile_sample_min_size` (see the module doc)."""
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    set_causal_conv_chunk_size(vae, chunk_size)
    if spatial_tile_sample_min_size is not None:
        size = spatial_tile_sample_min_size
        if size < 16 or size % 8:
            raise UserError(f"--vae_spatial_tile_sample_min_size {size}: use a multiple of 8 of at least 16 (e.g. 256)")
        tiling = True
    else:
        size = DEFAULT_TILE
    if not tiling:
        vae.disable_tiling()
        return
    stride = int(size * (1 - TILE_OVERLAP)) // 8 * 8
    vae.enable_tiling(tile_sample_min_height=size, tile_sample_min_width=size, tile_sample_stride_height=stride,
                      tile_sample_stride_width=stride)
    vae.use_framewise_encoding = False  # enable_tiling leaves these alone; say it again for clarity
    vae.use_framewise_decoding = False


# ---- latents -----------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_hv_latents(vae: nn.Module, video: torch.Tensor, sample: bool = True,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Pixels (B, 3, F, H, W) in [-1, 1] -> VAE latents (B, 16, (F-1)/4+1, H/8, W/8), NOT scaled.

    The reference caches exactly this (a posterior sample) and scales by 0.476986 when training; sample=False
    gives the posterior mean.
    """
    dist = vae.encode(video.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return dist.sample(generator) if sample else dist.mode()


def decode_hv_pixels(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """DiT latents (B, 16, f, h, w), or one sample (16, f, h, w) -> uint8 pixels (B, F, H, W, 3)."""
    from musubi_tuner.architectures.common import model_range_to_pixels

    if latents.dim() == 4:  # one sample without the batch axis
        latents = latents[None]
    return model_range_to_pixels(decode_hv_latents(vae, latents))


@torch.no_grad()
def decode_hv_latents(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """DiT latents (B, 16, f, h, w) -> pixels (B, 3, 4(f-1)+1, 8h, 8w) in about [-1, 1] (unscaled first)."""
    z = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
    return vae.decode(z).sample
