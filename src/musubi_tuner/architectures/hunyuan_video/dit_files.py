"""HunyuanVideo DiT files -> diffusers' `HunyuanVideoTransformer3DModel`, and back.

Users have the official `mp_rank_00_model_states.pt` (a pickle holding `{"module": state_dict}`), ComfyUI's
`hunyuan_video_t2v_720p_bf16.safetensors` (official names under `model.diffusion_model.`), the unofficial
`mp_rank_00_model_states_fp8.safetensors` (official names, Linear weights stored as float8_e4m3fn, no scales),
SkyReels V1 (official names, 32 input channels) and diffusers-layout files. diffusers' own single-file converter
hard-codes width 3072 and knows neither the `{"module": ...}` wrapper nor the ComfyUI prefix, so this module reads
every size from the weights: the tiny test preset goes through the same code as the released model.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from musubi_tuner.architectures.hunyuan_video.dit_names import diffusers_plan, linear_parts_for, original_plan
from musubi_tuner.architectures.key_plan import (
    block_count,
    default_axes_dims_rope,
    diffusers_to_original,
    original_to_diffusers,
)
from musubi_tuner.errors import CheckpointError
from musubi_tuner.models.checkpoint_io import load_state_dict, save_state_dict, strip_prefix
from musubi_tuner.models.file_kinds import describe_checkpoint, sample_keys
from musubi_tuner.models.meta_loading import assign_weights

__all__ = [
    "hv_original_to_diffusers", "hv_diffusers_to_original", "infer_hv_config", "load_hv_dit", "save_hv_dit_original",
    "original_linear_parts", "describe_not_hv",
]

DIT_FLAG_HINT = ("--dit expects a HunyuanVideo DiT: mp_rank_00_model_states.pt, hunyuan_video_t2v_720p_bf16.safetensors, "
                 "mp_rank_00_model_states_fp8.safetensors or a SkyReels V1 file")
_ORIGINAL_MARKER = "img_in.proj.weight"
_DIFFUSERS_MARKER = "x_embedder.proj.weight"


# ---- layouts ---------------------------------------------------------------------------------------------
def dit_layout(keys: Mapping[str, Any] | set[str]) -> str | None:
    """`original`, `diffusers`, or None when the keys are not a HunyuanVideo DiT (prefixes already stripped)."""
    if _ORIGINAL_MARKER in keys and any(k.startswith("double_blocks.") for k in keys) and "txt_in.input_embedder.weight" in keys:
        return "original"
    if _DIFFUSERS_MARKER in keys and "context_embedder.proj_in.weight" in keys:
        return "diffusers"
    return None


def hv_original_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official-layout state dict (no prefix) -> `HunyuanVideoTransformer3DModel` state dict, at any width.

    Fused q/k/v and single-block `linear1` become row views (no copy). Missing or unexpected keys are a
    CheckpointError. The input is not modified.
    """
    return original_to_diffusers(sd, original_plan(sd), sd[_ORIGINAL_MARKER].shape[0], layout="HunyuanVideo",
                                 hint=DIT_FLAG_HINT)


def hv_diffusers_to_original(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Exact inverse of `hv_original_to_diffusers` (for --save_merged_model and merged files)."""
    return diffusers_to_original(sd, diffusers_plan(sd), layout="HunyuanVideo", hint=DIT_FLAG_HINT)


# ---- what a file is --------------------------------------------------------------------------------------
def describe_not_hv(keys: Mapping[str, Any] | set[str]) -> str:
    """What a non-HunyuanVideo checkpoint looks like, for the error message."""
    kind = describe_checkpoint(keys)
    return kind if kind else f"not a HunyuanVideo DiT (first keys: {sample_keys(keys)})"


def _reject_unsupported(sd: Mapping[str, torch.Tensor], where: str, pickle_file: bool) -> None:
    if any(k.endswith((".scale_weight", "_scale")) for k in sd):
        raise CheckpointError(f"{where} is a scaled-fp8 checkpoint, which cannot be loaded; use the bf16 file "
                              "(mp_rank_00_model_states.pt) or mp_rank_00_model_states_fp8.safetensors, and "
                              "--fp8_base / --fp8_scaled to store it in fp8")
    fp8 = any(v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for v in sd.values())
    if fp8 and pickle_file:
        # Tencent's mp_rank_00_model_states_fp8.pt needs the per-layer scales of its separate *_fp8_map.pt.
        raise CheckpointError(f"{where} holds fp8 weights whose scales live in a separate *_fp8_map.pt, which is not "
                              "supported; use mp_rank_00_model_states.pt (with --fp8_base) or "
                              "kohya-ss' mp_rank_00_model_states_fp8.safetensors")


# ---- config ----------------------------------------------------------------------------------------------
def infer_hv_config(shapes: Mapping[str, Any], *, source: str = "the checkpoint", flag: str = "--dit",
                    rope_axes_dim: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """`HunyuanVideoTransformer3DModel` config from an official-layout state dict (tensors or shape tuples).

    Released T2V: 20 double + 40 single blocks, width 3072 = 24 heads x 128, 2 refiner blocks, LLM dim 4096,
    CLIP pooled 768, guidance embedding, 16 in/out channels, patch 1x2x2. SkyReels V1 I2V: 32 input channels.
    The RoPE split is not stored in the weights; (16, 56, 56) for 128-wide heads (see `default_axes_dims_rope`).
    """
    shape = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in shapes.items()}
    if dit_layout(shape) != "original":
        raise CheckpointError(f"{flag} {source} is {describe_not_hv(shape)}; {DIT_FLAG_HINT}")
    hidden, in_channels, patch_t, patch, _ = shape[_ORIGINAL_MARKER]
    norm_key = "double_blocks.0.img_attn_q_norm.weight"
    head_dim = shape[norm_key if norm_key in shape else "single_blocks.0.q_norm.weight"][0]
    if hidden % head_dim:
        raise CheckpointError(f"{flag} {source}: width {hidden} is not a multiple of the head size {head_dim}")
    mlp_rows = shape["double_blocks.0.img_mlp.fc1.weight"][0] if "double_blocks.0.img_mlp.fc1.weight" in shape \
        else shape["single_blocks.0.linear1.weight"][0] - 3 * hidden
    return {
        "in_channels": int(in_channels),
        "out_channels": int(shape["final_layer.linear.weight"][0] // (patch_t * patch * patch)),
        "num_attention_heads": int(hidden // head_dim),
        "attention_head_dim": int(head_dim),
        "num_layers": block_count(shape, "double_blocks."),
        "num_single_layers": block_count(shape, "single_blocks."),
        "num_refiner_layers": block_count(shape, "txt_in.individual_token_refiner.blocks."),
        "mlp_ratio": mlp_rows / hidden,
        "patch_size": int(patch),
        "patch_size_t": int(patch_t),
        "qk_norm": "rms_norm",
        "guidance_embeds": "guidance_in.mlp.0.weight" in shape,
        "text_embed_dim": int(shape["txt_in.input_embedder.weight"][1]),
        "pooled_projection_dim": int(shape["vector_in.in_layer.weight"][1]),
        "rope_theta": 256.0,
        "rope_axes_dim": tuple(rope_axes_dim or default_axes_dims_rope(int(head_dim))),
    }


# ---- loading ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _naming_file(flag: str, path: Path) -> Iterator[None]:
    """Prefix layout errors raised inside with `flag path:` so the user knows which file is wrong."""
    try:
        yield
    except CheckpointError as exc:
        if str(exc).startswith(flag):
            raise
        raise CheckpointError(f"{flag} {path}: {exc}") from exc


def build_empty_hv_dit(config: dict[str, Any]) -> nn.Module:
    """`HunyuanVideoTransformer3DModel` with parameters on the meta device (shapes only)."""
    from accelerate import init_empty_weights
    from diffusers import HunyuanVideoTransformer3DModel

    with init_empty_weights():
        return HunyuanVideoTransformer3DModel.from_config(config)


def hv_state_dict_to_diffusers(sd: Mapping[str, torch.Tensor], source: str, flag: str = "--dit",
                               pickle_file: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, diffusers state dict) from an official, ComfyUI-prefixed or diffusers-layout state dict."""
    sd = strip_prefix(sd)
    _reject_unsupported(sd, f"{flag} {source}", pickle_file)
    if dit_layout(sd) == "diffusers":
        shapes = {k: torch.empty(v.shape, device="meta") for k, v in sd.items()}
        return infer_hv_config(hv_diffusers_to_original(shapes), source=source, flag=flag), dict(sd)
    config = infer_hv_config(sd, source=source, flag=flag)
    return config, hv_original_to_diffusers(sd)


def load_hv_dit(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                in_channels: int | None = None, flag: str = "--dit") -> nn.Module:
    """Load a HunyuanVideo DiT file into a frozen, eval-mode `HunyuanVideoTransformer3DModel`.

    The file is read on the CPU (memory-mapped) and each tensor is cast on its way to `device` (None keeps the
    file's dtypes; fp8 files become `dtype` exactly). `in_channels` (`--dit_in_channels`) is checked against
    the weights: 16 for T2V, 32 for SkyReels V1 I2V.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{flag} {path} is a folder; {DIT_FLAG_HINT} (a single file)")
    state = load_state_dict(path, device="cpu", flag=flag)
    with _naming_file(flag, path):
        config, state = hv_state_dict_to_diffusers(state, str(path), flag, pickle_file=path.suffix != ".safetensors")
        if in_channels is not None and in_channels != config["in_channels"]:
            kind = "SkyReels V1 I2V" if config["in_channels"] == 32 else "T2V" if config["in_channels"] == 16 else "a"
            raise CheckpointError(f"{kind} DiT with {config['in_channels']} input channels, but --dit_in_channels is "
                                  f"{in_channels}; pass --dit_in_channels {config['in_channels']}")
        model = build_empty_hv_dit(config)
        assign_weights(model, state, dtype=dtype, device=device, source=str(path), flag=flag, what="HunyuanVideo DiT")
    model.to(device)  # non-persistent buffers were built on the CPU
    return model.eval().requires_grad_(False)


# ---- saving ----------------------------------------------------------------------------------------------
def save_hv_dit_original(model_or_state: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike, *,
                         layout: str = "safetensors", dtype: torch.dtype | None = None,
                         metadata: dict[str, str] | None = None) -> None:
    """Write a diffusers HunyuanVideo DiT in an official layout, atomically.

    layout: `official_pt` (`{"module": state_dict}` pickle, as `mp_rank_00_model_states.pt`), `comfy`
    (`model.diffusion_model.` prefix, safetensors) or `safetensors` (official names, no prefix).
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    out = {}
    for key, tensor in hv_diffusers_to_original(state).items():
        tensor = tensor.detach().cpu()
        out[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    if layout == "official_pt":
        from musubi_tuner.utils.atomic import atomic_path

        with atomic_path(Path(path)) as tmp:
            torch.save({"module": {k: v.contiguous() for k, v in out.items()}}, str(tmp))
        return
    if layout not in ("comfy", "safetensors"):
        raise ValueError(f"unknown layout {layout!r}; use official_pt, comfy or safetensors")
    prefix = "model.diffusion_model." if layout == "comfy" else ""
    save_state_dict({prefix + k: v for k, v in out.items()}, path, metadata=metadata)


# ---- LoRA name map ---------------------------------------------------------------------------------------
def original_linear_parts(dit: nn.Module) -> list[tuple[str, list[str]]]:
    """Every block Linear LoRA may target, as (official module path, [diffusers Linear paths in row order])."""
    return linear_parts_for(len(dit.transformer_blocks), len(dit.single_transformer_blocks))
