"""Wan2.1 VAE files (`Wan2.1_VAE.pth`, `wan_2.1_vae.safetensors`) <-> diffusers' `AutoencoderKLWan`, and the
per-channel latent normalisation the DiT is trained on.

Loading uses diffusers' `convert_wan_vae_to_diffusers`; its decoder index arithmetic assumes the published
block layout (4 levels, 2 residual blocks each), so tiny presets keep that layout and only shrink widths.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.models.file_kinds import describe_checkpoint, sample_keys
from musubi_tuner.errors import CheckpointError
from musubi_tuner.models.checkpoint_io import load_state_dict, save_state_dict, strip_prefix

__all__ = ["load_wan_vae", "infer_wan_vae_config", "wan_vae_to_original", "wan_vae_to_diffusers",
           "save_wan_vae_original", "normalize_latents", "denormalize_latents"]

EXPECTED = "Wan2.1_VAE.pth or wan_2.1_vae.safetensors"
_ORIGINAL_MARKER = "decoder.middle.0.residual.0.gamma"
_DIFFUSERS_MARKER = "decoder.mid_block.resnets.0.norm1.gamma"
_UP_STRIDE = 4
"""Original decoder `upsamples` entries per level: 3 residual blocks + 1 resample (num_res_blocks=2)."""
_RESNET_PARTS = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
                 "conv_shortcut": "shortcut"}


# ---- key layouts -------------------------------------------------------------------------------------
def _resnet(part: str) -> str:
    return _RESNET_PARTS.get(part, part)


# (pattern on a diffusers key, builder of the original key); tried in order, first match wins.
_TO_ORIGINAL: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = tuple(
    (re.compile(pattern), build) for pattern, build in (
        (r"(encoder|decoder)\.conv_in\.(.+)", lambda m: f"{m[1]}.conv1.{m[2]}"),
        (r"quant_conv\.(.+)", lambda m: f"conv1.{m[1]}"),
        (r"post_quant_conv\.(.+)", lambda m: f"conv2.{m[1]}"),
        (r"(encoder|decoder)\.norm_out\.(.+)", lambda m: f"{m[1]}.head.0.{m[2]}"),
        (r"(encoder|decoder)\.conv_out\.(.+)", lambda m: f"{m[1]}.head.2.{m[2]}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.(.+)",
         lambda m: f"{m[1]}.middle.{2 * int(m[2])}.{_resnet(m[3])}.{m[4]}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", lambda m: f"{m[1]}.middle.1.{m[2]}"),
        (r"encoder\.down_blocks\.(\d+)\.(\w+)\.(.+)", lambda m: f"encoder.downsamples.{m[1]}.{_resnet(m[2])}.{m[3]}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)",
         lambda m: f"decoder.upsamples.{_UP_STRIDE * int(m[1]) + int(m[2])}.{_resnet(m[3])}.{m[4]}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)",
         lambda m: f"decoder.upsamples.{_UP_STRIDE * int(m[1]) + _UP_STRIDE - 1}.{m[2]}"),
    )
)


def _key_to_original(key: str) -> str:
    for pattern, build in _TO_ORIGINAL:
        match = pattern.fullmatch(key)
        if match:
            return build(match)
    raise ValueError(f"no original Wan VAE name for {key!r}")


def wan_vae_to_diffusers(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Original keys -> `AutoencoderKLWan` keys, via diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    return convert_wan_vae_to_diffusers(dict(state_dict))


def wan_vae_to_original(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """`AutoencoderKLWan` keys -> original `Wan2.1_VAE.pth` keys; values untouched.

    Checked against diffusers' converter on the keys, so a layout it would not map back is an error here
    rather than a file that loads wrongly later.
    """
    out = {_key_to_original(k): v for k, v in state_dict.items()}
    round_trip = set(wan_vae_to_diffusers(dict.fromkeys(out)))
    if round_trip != set(state_dict):
        raise ValueError("this AutoencoderKLWan layout has no exact original-key equivalent "
                         f"(e.g. {sample_keys(round_trip ^ set(state_dict), 2)}); "
                         "only the Wan2.1 block layout is supported")
    return out


def _layout(keys: Mapping[str, Any]) -> str | None:
    if _ORIGINAL_MARKER in keys:
        return "original"
    if _DIFFUSERS_MARKER in keys:
        return "diffusers"
    return None


# ---- config --------------------------------------------------------------------------------------------
def infer_wan_vae_config(state_dict: Mapping[str, Any], *, source: str = "the checkpoint",
                         flag: str = "--vae") -> dict[str, Any]:
    """`AutoencoderKLWan` config from a state dict in original or diffusers layout (shapes only)."""
    layout = _layout(state_dict)
    if layout is None:
        kind = describe_checkpoint(state_dict)
        what = f"looks like {kind}" if kind else f"is not a Wan VAE (first keys: {sample_keys(state_dict)})"
        raise CheckpointError(f"{flag} {source} {what}; {flag} expects the Wan2.1 VAE ({EXPECTED})")
    names = ("encoder.conv1.weight", "conv2.weight", "decoder.head.2.weight") if layout == "original" else (
        "encoder.conv_in.weight", "post_quant_conv.weight", "decoder.conv_out.weight")
    first_conv, post_quant, last_conv = (tuple(state_dict[n].shape) for n in names)
    base_dim, in_channels, z_dim = first_conv[0], first_conv[1], post_quant[0]
    if z_dim != 16 or in_channels != 3:
        raise CheckpointError(f"{flag} {source} is a {z_dim}-channel VAE (Wan2.2_VAE.pth, for TI2V-5B); "
                              f"Wan2.1 tasks and Wan2.2 A14B use the 16-channel Wan2.1 VAE ({EXPECTED})")
    decoder_base_dim = last_conv[1]
    return {"base_dim": base_dim, "z_dim": z_dim,
            "decoder_base_dim": None if decoder_base_dim == base_dim else decoder_base_dim}


# ---- loading / saving ----------------------------------------------------------------------------------
def load_wan_vae(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, flag: str = "--vae"):
    """Load the Wan2.1 VAE from an original (`.pth`/`.safetensors`) or diffusers-layout file; eval, no grads."""
    from accelerate import init_empty_weights
    from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan

    path = Path(path)
    state = strip_prefix(load_state_dict(path, device=device, flag=flag), ("vae.", "first_stage_model."))
    config = infer_wan_vae_config(state, source=str(path), flag=flag)
    if _layout(state) == "original":
        state = wan_vae_to_diffusers(state)
    with init_empty_weights():
        vae = AutoencoderKLWan.from_config(config)
    expected = set(vae.state_dict())
    if expected != set(state):
        missing, unexpected = sample_keys(expected - set(state), 3), sample_keys(set(state) - expected, 3)
        raise CheckpointError(f"{flag} {path}: weights do not match the Wan2.1 VAE layout (missing: {missing}; "
                              f"unexpected: {unexpected}); use {EXPECTED}")
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        vae.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{flag} {path}: tensor shapes do not match the Wan2.1 VAE ({exc})") from exc
    vae.to(device)
    vae.requires_grad_(False)
    return vae.eval()


def save_wan_vae_original(model_or_state: torch.nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike, *,
                          dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None) -> None:
    """Write an `AutoencoderKLWan` in the original `Wan2.1_VAE` key layout (`.safetensors` or `.pth`), atomically."""
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    out = {}
    for key, tensor in wan_vae_to_original(state).items():
        tensor = tensor.detach().cpu()
        out[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    save_state_dict(out, path, metadata=metadata)


# ---- latent normalisation --------------------------------------------------------------------------------
def _mean_and_inv_std(vae, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel statistics shaped to broadcast over z: (B, C, F, H, W) or unbatched (C, F, H, W)."""
    channels = vae.config.z_dim
    shape = (1, channels, 1, 1, 1) if z.ndim == 5 else (channels, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
    return mean, inv_std


def normalize_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """VAE latents -> the DiT's latent space: (z - mean) * (1 / std), exactly as diffusers' Wan pipelines."""
    mean, inv_std = _mean_and_inv_std(vae, z)
    return (z - mean) * inv_std


def denormalize_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """The DiT's latents -> VAE latents for decoding: z / (1 / std) + mean, exactly as diffusers' Wan pipelines."""
    mean, inv_std = _mean_and_inv_std(vae, z)
    return z / inv_std + mean
