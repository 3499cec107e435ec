"""FLUX autoencoder files: the BFL `ae.safetensors` layout <-> diffusers `AutoencoderKL`.

The forward conversion is diffusers' own `convert_ldm_vae_checkpoint` (it reads block counts from
the config, so it works at any width). We add what it lacks: a config inferred from the weights
(the tiny preset uses the same path), a strict key check, and the exact inverse.

Latent convention (FLUX): `z = (mean_or_sample - shift) * scale` with shift 0.1159, scale 0.3611.
"""

from __future__ import annotations

import os
import re

import torch

from musubi_tuner.architectures.flux_kontext.dit_files import _cast, _naming_file, _read_safetensors
from musubi_tuner.errors import CheckpointError

FLUX_AE_SCALING_FACTOR = 0.3611
FLUX_AE_SHIFT_FACTOR = 0.1159
AE_FLAG_HINT = "--vae expects the FLUX ae.safetensors (BFL layout)"


def _count(sd: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in sd if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def infer_flux_ae_config(sd: dict[str, torch.Tensor]) -> dict:
    """`AutoencoderKL` config from a BFL-layout AE state dict (shapes only).

    Real FLUX AE: block_out (128, 256, 512, 512), 2 resnets per level, 16 latent channels, no
    quant convs. GroupNorm's group count is not stored in the weights; FLUX uses 32.
    """
    if "encoder.conv_in.weight" not in sd or "decoder.conv_in.weight" not in sd:
        shown = ", ".join(list(sd)[:3]) or "no keys"
        raise CheckpointError(f"not an autoencoder in BFL layout (first keys: {shown}); {AE_FLAG_HINT}")
    levels = _count(sd, r"encoder\.down\.(\d+)\.")
    block_out = tuple(int(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in range(levels))
    if any(c % 32 for c in block_out):
        raise CheckpointError(
            f"AE channel widths {block_out} are not multiples of 32 (GroupNorm groups); {AE_FLAG_HINT}"
        )
    return {
        "in_channels": int(sd["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(sd["decoder.conv_out.weight"].shape[0]),
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": block_out,
        "layers_per_block": _count(sd, r"encoder\.down\.0\.block\.(\d+)\."),
        "act_fn": "silu",
        "latent_channels": int(sd["decoder.conv_in.weight"].shape[1]),
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": FLUX_AE_SCALING_FACTOR,
        "shift_factor": FLUX_AE_SHIFT_FACTOR,
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in sd,
        "force_upcast": True,
    }


def bfl_ae_to_diffusers(sd: dict[str, torch.Tensor], config: dict | None = None) -> dict[str, torch.Tensor]:
    """BFL AE state dict -> `AutoencoderKL` state dict (diffusers' converter; input not modified)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = config or infer_flux_ae_config(sd)
    out = convert_ldm_vae_checkpoint(dict(sd), config)
    if len(out) != len(sd):  # the diffusers converter silently drops keys it does not know
        known = {flux_ae_key_to_bfl(k, len(config["up_block_types"])) for k in out}
        extra = sorted(set(sd) - known)
        raise CheckpointError(f"unexpected keys in the AE file ({', '.join(extra[:5])}); {AE_FLAG_HINT}")
    return out


_AE_RENAMES = (
    (r"^down_blocks\.(\d+)\.resnets\.", r"down.\1.block."),
    (r"^down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
    (r"^mid_block\.resnets\.0\.", "mid.block_1."),
    (r"^mid_block\.resnets\.1\.", "mid.block_2."),
    (r"^mid_block\.attentions\.0\.group_norm\.", "mid.attn_1.norm."),
    (r"^mid_block\.attentions\.0\.to_q\.", "mid.attn_1.q."),
    (r"^mid_block\.attentions\.0\.to_k\.", "mid.attn_1.k."),
    (r"^mid_block\.attentions\.0\.to_v\.", "mid.attn_1.v."),
    (r"^mid_block\.attentions\.0\.to_out\.0\.", "mid.attn_1.proj_out."),
    (r"^conv_norm_out\.", "norm_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
)


def flux_ae_key_to_bfl(key: str, num_up_blocks: int) -> str:
    """One diffusers `AutoencoderKL` key -> its BFL name (decoder levels are numbered in reverse)."""
    side, sep, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return key  # quant_conv / post_quant_conv keep their names
    m = re.match(r"^up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)$", rest)
    if m:
        level = num_up_blocks - 1 - int(m.group(1))
        kind = "block" if m.group(2) == "resnets" else "upsample"
        rest = f"up.{level}.{kind}.{m.group(3)}"
    for pattern, repl in _AE_RENAMES:
        rest = re.sub(pattern, repl, rest)
    return side + sep + rest


def flux_ae_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Exact inverse of `bfl_ae_to_diffusers`: attention Linear weights go back to 1x1 convs."""
    num_up = _count(sd, r"decoder\.up_blocks\.(\d+)\.")
    out = {}
    for key, value in sd.items():
        bfl = flux_ae_key_to_bfl(key, num_up)
        if ".mid.attn_1." in bfl and bfl.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[bfl] = value
    return out


def build_flux_ae(config: dict, sd: dict[str, torch.Tensor]):
    """`AutoencoderKL` from a config and a diffusers state dict, without a random init."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    with torch.device("meta"):
        ae = AutoencoderKL.from_config(config)
    try:
        ae.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as exc:  # shapes that fit no AutoencoderKL config
        msg = f"the AE weights do not fit the inferred config: {str(exc)[:300]}; {AE_FLAG_HINT}"
        raise CheckpointError(msg) from exc
    return ae


def load_flux_ae(
    path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = torch.float32
):
    """Load the FLUX `ae.safetensors` (BFL layout, optional `vae.`/`first_stage_model.` prefix) as a
    frozen, eval-mode diffusers `AutoencoderKL` (16 latent channels, scaling 0.3611, shift 0.1159)."""
    sd = _read_safetensors(path, "--vae")
    for prefix in ("first_stage_model.", "vae."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    with _naming_file("--vae", path):
        config = infer_flux_ae_config(sd)
        ae = build_flux_ae(config, _cast(bfl_ae_to_diffusers(sd, config), device, dtype))
    return ae.eval().requires_grad_(False)


@torch.no_grad()
def encode_flux_latents(
    ae, pixels: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> FLUX latents (B, 16, H/8, W/8): `(z - shift) * scale`.

    sample=True draws from the posterior, as the reference (BFL AutoEncoder) does when caching;
    sample=False uses its mean.
    """
    pixels = pixels.to(device=ae.device, dtype=ae.dtype)
    dist = ae.encode(pixels).latent_dist
    z = dist.sample(generator) if sample else dist.mode()
    return (z - ae.config.shift_factor) * ae.config.scaling_factor


@torch.no_grad()
def decode_flux_latents(ae, latents: torch.Tensor) -> torch.Tensor:
    """FLUX latents (B, 16, h, w) -> pixels (B, 3, 8h, 8w) in about [-1, 1] (inverse scaling first)."""
    z = latents.to(device=ae.device, dtype=ae.dtype) / ae.config.scaling_factor + ae.config.shift_factor
    return ae.decode(z).sample
