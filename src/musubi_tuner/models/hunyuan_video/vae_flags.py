"""The HunyuanVideo VAE's command-line flags (shared by HunyuanVideo and FramePack scripts): adding, checking,
and loading the VAE they describe."""

from __future__ import annotations

import argparse

import torch
from torch import nn

from musubi_tuner.errors import UserError


def add_hv_vae_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vae_tiling", action="store_true",
                        help="spatial VAE tiling (256 px tiles, 1/4 overlap); implied by "
                             "--vae_spatial_tile_sample_min_size")
    parser.add_argument("--vae_chunk_size", type=int, default=None,
                        help="run the VAE's causal 3D convolutions over at most this many frames at a time "
                             "(same result, less memory), e.g. 32")
    parser.add_argument("--vae_spatial_tile_sample_min_size", type=int, default=None,
                        help="spatial tile size in pixels (default 256 when tiling)")


def validate_hv_vae_arguments(args: argparse.Namespace) -> None:
    for flag in ("vae_chunk_size", "vae_spatial_tile_sample_min_size"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise UserError(f"--{flag} {value}: must be a positive number")
    if getattr(args, "vae_spatial_tile_sample_min_size", None) is not None and args.vae_spatial_tile_sample_min_size % 8:
        raise UserError(f"--vae_spatial_tile_sample_min_size {args.vae_spatial_tile_sample_min_size}: must be a "
                        "multiple of 8 (e.g. 128 or 256)")


def load_hv_vae_from_args(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """`--vae` (float16 unless `--vae_dtype`, as the reference runs it) with the memory flags applied."""
    from musubi_tuner.architectures.common import str_to_dtype
    from musubi_tuner.models.hunyuan_video.vae_files import configure_hv_vae_memory, load_hv_vae

    if not args.vae:
        raise UserError("no VAE given: pass --vae vae/pytorch_model.pt (or hunyuan_video_vae_bf16.safetensors)")
    vae = load_hv_vae(args.vae, device=device, dtype=str_to_dtype(args.vae_dtype, torch.float16, "--vae_dtype"))
    configure_hv_vae_memory(vae, chunk_size=getattr(args, "vae_chunk_size", None),
                            tiling=bool(getattr(args, "vae_tiling", False)),
                            spatial_tile_sample_min_size=getattr(args, "vae_spatial_tile_sample_min_size", None))
    return vae
