"""FLUX.1 Kontext DiT files: BFL <-> diffusers key layouts, config inference, loading and saving.

Users have `flux1-kontext-dev.safetensors` in the original Black Forest Labs (BFL) layout, sometimes
with the ComfyUI `model.diffusion_model.` prefix. We run diffusers' `FluxTransformer2DModel`.
diffusers' own single-file converter hard-codes hidden size 3072, so this one reads every width
from the weights: the tiny test preset goes through exactly the same code as the real model.

One table (`_DOUBLE_LINEARS`, `_SINGLE_LINEARS`) drives the weight conversion in both directions
and the LoRA name map, so the two cannot disagree.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from musubi_tuner.architectures.key_plan import (  # noqa: F401 (default_axes_dims_rope re-exported)
    KeyEntry,
    block_count,
    default_axes_dims_rope,
    diffusers_to_original,
    linear_entries,
    original_to_diffusers,
)
from musubi_tuner.errors import CheckpointError

# ---- the name table --------------------------------------------------------------------------
# (BFL module inside a block, diffusers Linear(s) inside the same block, in output-row order).
# A fused BFL layer is split over several diffusers layers: every part but the last is `hidden`
# rows wide, the last takes the rest (q,k,v = hidden each; single-block mlp = 4*hidden).
_DOUBLE_LINEARS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("img_mod.lin", ("norm1.linear",)),
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("img_attn.proj", ("attn.to_out.0",)),
    ("img_mlp.0", ("ff.net.0.proj",)),
    ("img_mlp.2", ("ff.net.2",)),
    ("txt_mod.lin", ("norm1_context.linear",)),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("txt_attn.proj", ("attn.to_add_out",)),
    ("txt_mlp.0", ("ff_context.net.0.proj",)),
    ("txt_mlp.2", ("ff_context.net.2",)),
)
_SINGLE_LINEARS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    ("linear2", ("proj_out",)),
    ("modulation.lin", ("norm.linear",)),
)
# RMSNorm scales of the q/k norms (parameter names, not modules).
_DOUBLE_NORMS = (
    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
    ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
)
_SINGLE_NORMS = (
    ("norm.query_norm.scale", "attn.norm_q.weight"),
    ("norm.key_norm.scale", "attn.norm_k.weight"),
)
_EMBEDDERS = (
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
)
_GUIDANCE_EMBEDDERS = (
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
)
# BFL's final modulation is (shift, scale); diffusers' AdaLayerNormContinuous expects (scale, shift).
_FINAL_MOD = ("final_layer.adaLN_modulation.1", "norm_out.linear")

PREFIXES = ("model.diffusion_model.", "diffusion_model.")
"""Prefixes stripped from BFL keys (ComfyUI full checkpoints / ComfyUI diffusion models)."""

DIT_FLAG_HINT = "--dit expects flux1-kontext-dev.safetensors (BFL layout)"


# ---- one conversion plan for both directions -------------------------------------------------
def _plan(num_double: int, num_single: int, guidance: bool) -> list[KeyEntry]:
    plan: list[KeyEntry] = []
    for bfl, dif in _EMBEDDERS + (_GUIDANCE_EMBEDDERS if guidance else ()):
        plan += linear_entries(bfl, (dif,))
    plan += linear_entries(_FINAL_MOD[0], (_FINAL_MOD[1],), swap=True)
    for i in range(num_double):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for bfl, parts in _DOUBLE_LINEARS:
            plan += linear_entries(b + bfl, tuple(d + p for p in parts))
        plan += [KeyEntry(b + bfl, (d + dif,)) for bfl, dif in _DOUBLE_NORMS]
    for i in range(num_single):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for bfl, parts in _SINGLE_LINEARS:
            plan += linear_entries(b + bfl, tuple(d + p for p in parts))
        plan += [KeyEntry(b + bfl, (d + dif,)) for bfl, dif in _SINGLE_NORMS]
    return plan


def bfl_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL-layout FLUX state dict (no prefix) -> `FluxTransformer2DModel` state dict, at any width.

    Fused q/k/v and single-block `linear1` become row views (no copy). Raises CheckpointError on a
    missing or unexpected key. The input dict is not modified.
    """
    _require_bfl(sd)
    plan = _plan(block_count(sd, "double_blocks."), block_count(sd, "single_blocks."), "guidance_in.in_layer.weight" in sd)
    return original_to_diffusers(sd, plan, sd["img_in.weight"].shape[0], layout="FLUX BFL", hint=DIT_FLAG_HINT)


def diffusers_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Exact inverse of `bfl_to_diffusers` (`FluxTransformer2DModel` state dict -> BFL keys, no prefix)."""
    plan = _plan(
        block_count(sd, "transformer_blocks."),
        block_count(sd, "single_transformer_blocks."),
        "time_text_embed.guidance_embedder.linear_1.weight" in sd,
    )
    return diffusers_to_original(sd, plan, layout="FLUX", hint=DIT_FLAG_HINT)


# ---- layout detection and config -------------------------------------------------------------
def strip_known_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove a ComfyUI `model.diffusion_model.` / `diffusion_model.` prefix when every key has it."""
    for prefix in PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix) :]: v for k, v in sd.items()}
    # Mixed files (prefixed DiT plus e.g. VAE/TE keys): keep only the DiT part.
    for prefix in PREFIXES:
        inner = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        if "img_in.weight" in inner:
            return inner
    return sd


def is_bfl_layout(sd: dict) -> bool:
    return "img_in.weight" in sd and any(k.startswith(("double_blocks.", "single_blocks.")) for k in sd)


def is_diffusers_layout(sd: dict) -> bool:
    return "x_embedder.weight" in sd and any(
        k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in sd
    )


def _require_bfl(sd: dict) -> None:
    if not is_bfl_layout(sd):
        shown = ", ".join(list(sd)[:3]) or "no keys"
        raise CheckpointError(f"not a FLUX DiT in BFL layout (first keys: {shown}); {DIT_FLAG_HINT}")


def infer_flux_config(sd: dict[str, torch.Tensor], axes_dims_rope: tuple[int, int, int] | None = None) -> dict:
    """`FluxTransformer2DModel` config from a BFL-layout state dict (shapes only; meta tensors work).

    Real Kontext dev: 19 double + 38 single blocks, hidden 3072 = 24 heads x 128, T5 dim 4096,
    pooled 768, guidance embedding, 64 input channels (16 latent channels packed 2x2).
    """
    _require_bfl(sd)
    hidden, in_channels = sd["img_in.weight"].shape
    norm_key = "double_blocks.0.img_attn.norm.query_norm.scale"
    if norm_key not in sd:
        norm_key = "single_blocks.0.norm.query_norm.scale"
    head_dim = sd[norm_key].shape[0]
    if hidden % head_dim:
        raise CheckpointError(f"hidden size {hidden} is not a multiple of the head size {head_dim}; {DIT_FLAG_HINT}")
    _check_mlp_ratio(sd, hidden)
    out_channels = sd["final_layer.linear.weight"].shape[0]
    return {
        "patch_size": 1,
        "in_channels": int(in_channels),
        "out_channels": None if out_channels == in_channels else int(out_channels),
        "num_layers": block_count(sd, "double_blocks."),
        "num_single_layers": block_count(sd, "single_blocks."),
        "attention_head_dim": int(head_dim),
        "num_attention_heads": int(hidden // head_dim),
        "joint_attention_dim": int(sd["txt_in.weight"].shape[1]),
        "pooled_projection_dim": int(sd["vector_in.in_layer.weight"].shape[1]),
        "guidance_embeds": "guidance_in.in_layer.weight" in sd,
        "axes_dims_rope": tuple(axes_dims_rope or default_axes_dims_rope(int(head_dim))),
    }


def _check_mlp_ratio(sd: dict, hidden: int) -> None:
    """diffusers' FLUX blocks fix the MLP width at 4 x hidden; refuse other files clearly."""
    widths = {}
    if "double_blocks.0.img_mlp.0.weight" in sd:
        widths["double_blocks.0.img_mlp.0.weight"] = sd["double_blocks.0.img_mlp.0.weight"].shape[0]
    if "single_blocks.0.linear1.weight" in sd:
        widths["single_blocks.0.linear1.weight (mlp rows)"] = sd["single_blocks.0.linear1.weight"].shape[0] - 3 * hidden
    for key, width in widths.items():
        if width != 4 * hidden:
            raise CheckpointError(
                f"{key}: MLP width {width}, expected 4 x hidden ({4 * hidden}); unsupported FLUX variant"
            )


# ---- file I/O --------------------------------------------------------------------------------
def _read_safetensors(path: str | os.PathLike, flag: str) -> dict[str, torch.Tensor]:
    """Read a checkpoint file on CPU (memory-mapped for .safetensors), errors naming `flag`."""
    from musubi_tuner.models.checkpoint_io import load_state_dict

    return load_state_dict(path, flag=flag)


@contextlib.contextmanager
def _naming_file(flag: str, path: str | os.PathLike) -> Iterator[None]:
    """Prefix layout errors raised inside with `flag path:` so the user knows which file is wrong."""
    try:
        yield
    except CheckpointError as exc:
        raise CheckpointError(f"{flag} {path}: {exc}") from exc


def _cast(
    sd: dict[str, torch.Tensor], device: torch.device | str, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    return {
        k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
        for k, v in sd.items()
    }


def _shape_only(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in sd.items()}


def flux_state_dict_to_diffusers(sd: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, diffusers state dict) from a BFL, ComfyUI-prefixed or diffusers-layout state dict."""
    sd = strip_known_prefix(sd)
    if is_diffusers_layout(sd):
        config = infer_flux_config(diffusers_to_bfl(_shape_only(sd)))
        return config, sd
    if not is_bfl_layout(sd):
        shown = ", ".join(list(sd)[:3]) or "no keys"
        raise CheckpointError(f"this file is not a FLUX DiT (first keys: {shown}); {DIT_FLAG_HINT}")
    return infer_flux_config(sd), bfl_to_diffusers(sd)


def build_flux_dit(config: dict, sd: dict[str, torch.Tensor]) -> nn.Module:
    """`FluxTransformer2DModel` from a config and a diffusers state dict, without a random init."""
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as exc:  # shapes that fit no FLUX config
        raise CheckpointError(f"the FLUX DiT weights do not fit the inferred config: {str(exc)[:300]}") from exc
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"FLUX DiT tensors left unloaded: {leftover[:3]}")
    return model


def load_flux_dit(
    path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = torch.bfloat16
) -> nn.Module:
    """Load `flux1-kontext-dev.safetensors` (BFL layout, optionally ComfyUI-prefixed) as a frozen,
    eval-mode `FluxTransformer2DModel` with weights in `dtype` (None keeps the file's dtypes).

    A diffusers-layout single file is accepted as well; a diffusers folder is refused with a hint.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"--dit {path} is a folder; {DIT_FLAG_HINT}, a single file "
            "(the diffusers 'transformer' folder is not supported; use the file from the repo root)"
        )
    sd = _read_safetensors(path, "--dit")
    with _naming_file("--dit", path):
        config, sd = flux_state_dict_to_diffusers(sd)
        model = build_flux_dit(config, _cast(sd, device, dtype))
    return model.eval().requires_grad_(False)


def save_flux_dit_bfl(
    model: nn.Module,
    path: str | os.PathLike,
    prefix: str = "",
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a `FluxTransformer2DModel` as a BFL-layout safetensors file (atomic).

    prefix: "" (the flux1-kontext-dev.safetensors layout) or "model.diffusion_model." (ComfyUI).
    """
    from musubi_tuner.utils.atomic import save_safetensors_atomic

    sd = diffusers_to_bfl({k: v.detach().cpu() for k, v in model.state_dict().items()})
    sd = {prefix + k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in sd.items()}
    save_safetensors_atomic(sd, path, metadata=metadata)


# ---- LoRA name map ---------------------------------------------------------------------------
def original_linear_parts(dit: nn.Module) -> list[tuple[str, list[str]]]:
    """Every Linear LoRA may target, as (original BFL module path, [diffusers Linear paths]).

    Fused originals list their parts in output-row order: `double_blocks.N.img_attn.qkv` ->
    `transformer_blocks.N.attn.to_q/to_k/to_v`; `single_blocks.N.linear1` -> `to_q/to_k/to_v` +
    `proj_mlp`. Modulation layers are included (the caller applies the default excludes).
    """
    return linear_parts_for(len(dit.transformer_blocks), len(dit.single_transformer_blocks))


def linear_parts_for(num_double: int, num_single: int) -> list[tuple[str, list[str]]]:
    """`original_linear_parts` from block counts alone."""
    out: list[tuple[str, list[str]]] = []
    for i in range(num_double):
        out += [
            (f"double_blocks.{i}.{b}", [f"transformer_blocks.{i}.{p}" for p in parts]) for b, parts in _DOUBLE_LINEARS
        ]
    for i in range(num_single):
        out += [
            (f"single_blocks.{i}.{b}", [f"single_transformer_blocks.{i}.{p}" for p in parts])
            for b, parts in _SINGLE_LINEARS
        ]
    return out


bfl_fused_lora_layout = original_linear_parts
