"""Wan2.1 DiT files: the task table, what a checkpoint is (from its weights), loading and saving.

Users have the original / ComfyUI single files (`wan2.1_t2v_14B_bf16.safetensors`, `..._i2v_480p_14B_...`,
optionally prefixed `model.diffusion_model.`) or diffusers-layout files. Both load into diffusers'
`WanTransformer3DModel`, built on the meta device and filled with `load_state_dict(assign=True)`, so the
weights are held once. The model's config comes from the weights: width from `patch_embedding`, depth
from the highest block index, I2V from `img_emb`, FLF2V from `img_emb.emb_pos`. Heads are 128 wide in
every published Wan model, so the head count is width // 128 (tiny presets keep that rule too).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.architectures.wan.dit_names import diffusers_module_name, original_module_name
from musubi_tuner.models.comfy_scaled_fp8 import dequantize_comfy_scaled_fp8, is_comfy_scaled_fp8, without_scale_keys
from musubi_tuner.models.file_kinds import describe_checkpoint, sample_keys
from musubi_tuner.models.meta_loading import assign_weights
from musubi_tuner.errors import CheckpointError, UserError
from musubi_tuner.models.checkpoint_io import (
    count_numbered,
    load_state_dict,
    read_keys_and_shapes,
    read_safetensors_keys,
    save_state_dict,
    strip_prefix,
)

__all__ = [
    "WAN_TASKS", "WanTask", "get_wan_task", "infer_wan_config", "check_task_matches", "load_wan_dit",
    "wan_dit_to_original", "wan_dit_to_diffusers", "save_wan_dit_original", "original_module_name",
    "diffusers_module_name",
]

HEAD_DIM = 128
"""Attention head width of every published Wan2.1/2.2 DiT."""


@dataclass(frozen=True)
class WanTask:
    """One reference `--task` value and the DiT weights it needs."""

    name: str
    dim: int
    num_layers: int
    ffn_dim: int
    num_heads: int
    mode: str
    """Which weights: `t2v` (16 input channels), `i2v` (36 + CLIP image branch), `flf2v` (i2v + `emb_pos`),
    `i2v_noclip` (36 channels, no image branch: each Wan2.2 I2V-A14B expert), `fc` (Fun-Control: 48 input channels +
    CLIP image branch, for its T2V and I2V tasks alike)."""
    example_file: str

    @property
    def in_dim(self) -> int:
        return MODE_IN_DIM[self.mode]

    @property
    def has_image_branch(self) -> bool:
        """CLIP image context: `img_emb` plus `k_img`/`v_img` in every cross-attention."""
        return self.mode in IMAGE_BRANCH_MODES

    @property
    def size(self) -> str:
        return "1.3B" if self.dim == 1536 else "14B"

    def diffusers_config(self) -> dict[str, Any]:
        """`WanTransformer3DModel` config at the published size."""
        return _diffusers_config(dim=self.dim, num_heads=self.num_heads, num_layers=self.num_layers,
                                 ffn_dim=self.ffn_dim, in_dim=self.in_dim, mode=self.mode)


_14B = dict(dim=5120, num_layers=40, ffn_dim=13824, num_heads=40)
WAN_TASKS: dict[str, WanTask] = {
    t.name: t
    for t in (
        WanTask("t2v-1.3B", 1536, 30, 8960, 12, "t2v", "wan2.1_t2v_1.3B_bf16.safetensors"),
        WanTask("t2v-14B", **_14B, mode="t2v", example_file="wan2.1_t2v_14B_bf16.safetensors"),
        WanTask("i2v-14B", **_14B, mode="i2v", example_file="wan2.1_i2v_480p_14B_bf16.safetensors"),
        WanTask("t2i-14B", **_14B, mode="t2v", example_file="wan2.1_t2v_14B_bf16.safetensors"),
        WanTask("flf2v-14B", **_14B, mode="flf2v", example_file="wan2.1_flf2v_720p_14B_fp16.safetensors"),
        # Wan2.2 A14B: two experts per task, each shaped as the Wan2.1 14B DiT; I2V has no CLIP image branch
        WanTask("t2v-A14B", **_14B, mode="t2v", example_file="wan2.2_t2v_low_noise_14B_fp16.safetensors"),
        WanTask("i2v-A14B", **_14B, mode="i2v_noclip", example_file="wan2.2_i2v_low_noise_14B_fp16.safetensors"),
        # Fun-Control (alibaba-pai Wan2.1-Fun-Control): one 14B file serves both of its 14B tasks
        WanTask("t2v-1.3B-FC", 1536, 30, 8960, 12, "fc", "Wan2.1-Fun-1.3B-Control diffusion_pytorch_model.safetensors"),
        WanTask("t2v-14B-FC", **_14B, mode="fc", example_file="Wan2.1-Fun-14B-Control diffusion_pytorch_model.safetensors"),
        WanTask("i2v-14B-FC", **_14B, mode="fc", example_file="Wan2.1-Fun-14B-Control diffusion_pytorch_model.safetensors"),
    )
}
MODE_IN_DIM = {"t2v": 16, "i2v": 36, "flf2v": 36, "i2v_noclip": 36, "fc": 48}
"""DiT input channels per mode: 16 noisy latents + 20 (I2V: 4 mask + 16 image) or 32 (FC: 16 control + 16 image)."""
UNSUPPORTED_TASKS = {
    "ti2v-5B": "Wan2.2 TI2V-5B",
}
CLIP_IMAGE_DIM = 1280
CLIP_IMAGE_TOKENS = 257
_PUBLISHED_WIDTHS = {1536, 5120}
IMAGE_BRANCH_MODES = ("i2v", "flf2v", "fc")
MODE_LABELS = {"t2v": "T2V", "i2v": "I2V", "flf2v": "FLF2V", "i2v_noclip": "I2V (no CLIP branch, Wan2.2)",
               "fc": "Fun-Control"}


def get_wan_task(name: str) -> WanTask:
    """The task table entry; unknown or unsupported names raise a UserError listing the choices."""
    if name in WAN_TASKS:
        return WAN_TASKS[name]
    choices = ", ".join(WAN_TASKS)
    if name in UNSUPPORTED_TASKS:
        raise UserError(f"--task {name} ({UNSUPPORTED_TASKS[name]}) is not supported by this version; "
                        f"choose one of: {choices}")
    raise UserError(f"unknown --task {name!r}; choose one of: {choices}")


def _diffusers_config(*, dim: int, num_heads: int, num_layers: int, ffn_dim: int, in_dim: int, mode: str,
                      out_dim: int = 16, text_dim: int = 4096, freq_dim: int = 256,
                      image_dim: int = CLIP_IMAGE_DIM, image_tokens: int = CLIP_IMAGE_TOKENS,
                      patch_size: tuple[int, ...] = (1, 2, 2), qk_norm: bool = True,
                      cross_attn_norm: bool = True) -> dict[str, Any]:
    image = mode in IMAGE_BRANCH_MODES
    return {
        "patch_size": list(patch_size),
        "num_attention_heads": num_heads,
        "attention_head_dim": dim // num_heads,
        "in_channels": in_dim,
        "out_channels": out_dim,
        "text_dim": text_dim,
        "freq_dim": freq_dim,
        "ffn_dim": ffn_dim,
        "num_layers": num_layers,
        "cross_attn_norm": cross_attn_norm,
        "qk_norm": "rms_norm_across_heads" if qk_norm else None,
        "eps": 1e-6,
        "image_dim": image_dim if image else None,
        "added_kv_proj_dim": dim if image else None,
        "rope_max_seq_len": 1024,
        # FLF2V adds a learned position embedding over the first- and last-frame CLIP tokens.
        "pos_embed_seq_len": 2 * image_tokens if mode == "flf2v" else None,
    }


# ---- key layouts -------------------------------------------------------------------------------------
def dit_layout(keys: Mapping[str, Any] | set[str]) -> str | None:
    """`original`, `diffusers`, or None when the keys are not a Wan DiT (prefixes already stripped)."""
    if "patch_embedding.weight" not in keys:
        return None
    if "head.modulation" in keys:
        return "original"
    if "condition_embedder.time_proj.weight" in keys:
        return "diffusers"
    return None


def wan_dit_to_original(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Diffusers keys -> original (Wan-AI / ComfyUI) keys; values untouched. Exact inverse of diffusers' converter."""
    return {original_module_name(k): v for k, v in state_dict.items()}


def wan_dit_to_diffusers(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Original keys (with or without `model.diffusion_model.`) -> diffusers keys, via diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    converted = convert_wan_transformer_to_diffusers(dict(state_dict))  # it pops from its argument
    # diffusers' single-file converter has no entry for the FLF2V image position embedding.
    if "img_emb.emb_pos" in converted:
        converted["condition_embedder.image_embedder.pos_embed"] = converted.pop("img_emb.emb_pos")
    return converted


# ---- what a checkpoint is ------------------------------------------------------------------------------
def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def _to_original_shapes(shapes: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    shapes = strip_prefix(shapes)
    if not is_comfy_scaled_fp8(shapes) and any(k.endswith(".scale_weight") for k in shapes):
        raise CheckpointError("a scaled-fp8 checkpoint without ComfyUI's `scaled_fp8` marker cannot be loaded; use the "
                              "bf16/fp16 file or ComfyUI's *_fp8_scaled.safetensors (--fp8_base/--fp8_scaled store "
                              "it in fp8)")
    shapes = {k: _shape(v) for k, v in without_scale_keys(shapes).items()}
    if dit_layout(shapes) == "diffusers":
        renamed = {}
        for key, shape in shapes.items():
            try:
                renamed[original_module_name(key)] = shape
            except ValueError:
                renamed[key] = shape  # left as is; reported as unexpected when loading
        return renamed
    return shapes


def _reject_variants(keys: set[str], in_dim: int, dim: int, has_image: bool, where: str) -> None:
    """Wan families that share the key names but are out of scope get a message naming them."""
    hint = "use a Wan2.1 T2V/I2V/FLF2V DiT, e.g. wan2.1_t2v_1.3B_bf16.safetensors"
    if any(k.startswith(("vace_blocks.", "vace_patch_embedding")) for k in keys):
        raise CheckpointError(f"{where} is a Wan VACE DiT, which is not supported; {hint}")
    if any(k.startswith(("motion_encoder.", "face_adapter.")) for k in keys):
        raise CheckpointError(f"{where} is a Wan2.2 Animate DiT, which is not supported; {hint}")
    if in_dim == 48 and (dim == 3072 or not has_image):  # Fun-Control DiTs have 48 channels and the image branch
        raise CheckpointError(f"{where} is a Wan2.2 TI2V-5B DiT, which is not supported; {hint}")
    if in_dim not in (16, 36, 48):
        raise CheckpointError(f"{where} has {in_dim} input channels; Wan DiTs have 16 (T2V), 36 (I2V) or 48 "
                              f"(Fun-Control); {hint}")


def _not_a_dit_error(keys: set[str], where: str, flag: str) -> CheckpointError:
    kind = describe_checkpoint(keys)
    what = f"looks like {kind}" if kind else f"is not a Wan DiT (first keys: {sample_keys(keys)})"
    return CheckpointError(f"{where} {what}; {flag} expects a Wan2.1 DiT such as wan2.1_t2v_1.3B_bf16.safetensors, "
                           "wan2.1_t2v_14B_bf16.safetensors or wan2.1_i2v_480p_14B_bf16.safetensors")


def _head_count(dim: int, num_heads: int | None, where: str) -> int:
    if num_heads is not None:
        if dim % num_heads:
            raise CheckpointError(f"{where}: width {dim} is not divisible by num_heads={num_heads}")
        return num_heads
    if dim % HEAD_DIM:
        raise CheckpointError(f"{where}: cannot tell the head count of a Wan DiT {dim} wide "
                              f"(published models use {HEAD_DIM}-wide heads); pass num_heads")
    return dim // HEAD_DIM


def infer_wan_config(shapes: Mapping[str, Any], *, num_heads: int | None = None,
                     source: str = "the checkpoint", flag: str = "--dit") -> tuple[str, dict[str, Any]]:
    """(task, `WanTransformer3DModel` config) from keys -> shapes (tensors or shape tuples, any layout).

    `task` is the `WAN_TASKS` name for published sizes (`t2v-14B` for both T2V-14B and T2I-14B files,
    which are the same weights); for other sizes (test presets) it is only the mode: `t2v`/`i2v`/`flf2v`.
    """
    shapes = _to_original_shapes(shapes)
    keys = set(shapes)
    if dit_layout(keys) != "original" or "blocks.0.self_attn.q.weight" not in keys:
        raise _not_a_dit_error(keys, source, flag)
    dim, in_dim, *patch = shapes["patch_embedding.weight"]
    has_image = "img_emb.proj.1.weight" in keys
    _reject_variants(keys, in_dim, dim, has_image, source)
    mode = ("flf2v" if "img_emb.emb_pos" in keys else "fc" if in_dim == 48 else "i2v" if has_image
            else "i2v_noclip" if in_dim == 36 else "t2v")
    num_layers = 1 + max(int(m[1]) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k)))
    ffn_dim = shapes["blocks.0.ffn.0.weight"][0]
    published = next((t for t in WAN_TASKS.values()
                      if (t.dim, t.num_layers, t.ffn_dim, t.mode) == (dim, num_layers, ffn_dim, mode)), None)
    heads = published.num_heads if published and num_heads is None else _head_count(dim, num_heads, source)
    config = _diffusers_config(
        dim=dim, num_heads=heads, num_layers=num_layers, ffn_dim=ffn_dim, in_dim=in_dim, mode=mode,
        out_dim=shapes["head.head.weight"][0] // math.prod(patch),
        text_dim=shapes["text_embedding.0.weight"][1], freq_dim=shapes["time_embedding.0.weight"][1],
        image_dim=shapes["img_emb.proj.0.weight"][0] if has_image else CLIP_IMAGE_DIM,
        image_tokens=shapes["img_emb.emb_pos"][1] // 2 if mode == "flf2v" else CLIP_IMAGE_TOKENS,
        patch_size=tuple(patch), qk_norm="blocks.0.self_attn.norm_q.weight" in keys,
        cross_attn_norm="blocks.0.norm3.weight" in keys,
    )
    return (published.name if published else mode), config


def _describe_detected(detected: str, config: dict[str, Any]) -> str:
    if detected in WAN_TASKS:
        return f"{detected} DiT"
    width = config["num_attention_heads"] * config["attention_head_dim"]
    return f"{MODE_LABELS.get(detected, detected.upper())} DiT {width} wide with {config['num_layers']} layers"


def check_task_matches(task: str, detected: str, config: dict[str, Any], source: str, flag: str = "--dit") -> None:
    """Raise a CheckpointError when the file's weights do not fit `--task`.

    The mode (T2V / I2V / FLF2V) must always match. The size must match for published widths (1.3B vs
    14B); files of other widths (tiny test presets) are accepted for any task of their mode.
    """
    wanted = get_wan_task(task)
    mode = WAN_TASKS[detected].mode if detected in WAN_TASKS else detected
    width = config["num_attention_heads"] * config["attention_head_dim"]
    size_ok = width not in _PUBLISHED_WIDTHS or (width, config["num_layers"]) == (wanted.dim, wanted.num_layers)
    if mode == wanted.mode and size_ok:
        return
    fix = f"pass --task {detected}" if detected in WAN_TASKS else "pass the --task that matches the file"
    raise CheckpointError(
        f"{flag} {source} is a {_describe_detected(detected, config)}, but --task {task} needs a "
        f"{wanted.size} {MODE_LABELS[wanted.mode]} DiT such as {wanted.example_file}; {fix}, "
        f"or the {flag} file for --task {task}")


# ---- loading -------------------------------------------------------------------------------------------
def _read_shapes_or_state(path: Path, device: str | torch.device, flag: str):
    """Safetensors: header only (nothing loaded before the checks). Pickles: the (memory-mapped) state dict."""
    if path.suffix.lower() == ".safetensors":
        return read_safetensors_keys(path, flag), None
    state = load_state_dict(path, device=device, flag=flag)
    return {k: tuple(v.shape) for k, v in state.items()}, state


def dit_block_count(path: str | os.PathLike, flag: str = "--dit") -> int:
    """How many transformer blocks a DiT file holds (any layout), from its header when it is a safetensors."""
    return count_numbered(strip_prefix(read_keys_and_shapes(path, flag)), r"blocks\.(\d+)\.")


def build_empty_wan_dit(config: dict[str, Any]):
    """`WanTransformer3DModel` with parameters on the meta device (buffers such as RoPE tables are real)."""
    from accelerate import init_empty_weights
    from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

    with init_empty_weights():
        return WanTransformer3DModel.from_config(config)


def load_wan_dit(path: str | os.PathLike, *, task: str | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, num_heads: int | None = None, flag: str = "--dit"):
    """Load a Wan2.1 DiT file (original, ComfyUI or diffusers layout) into `WanTransformer3DModel`.

    `task` (a `--task` value) is checked against the weights before anything is loaded. `dtype` casts the
    weights except diffusers' `_keep_in_fp32_modules`, which stay fp32 as in `from_pretrained`; None keeps
    the file's dtype. The model is returned in eval mode with gradients off.
    """
    path = Path(path)
    shapes, state = _read_shapes_or_state(path, "cpu", flag)  # memory-mapped; tensors move one by one below
    detected, config = infer_wan_config(shapes, num_heads=num_heads, source=str(path), flag=flag)
    if task is not None:
        check_task_matches(task, detected, config, str(path), flag)
    if state is None:
        state = load_state_dict(path, device="cpu", flag=flag)
    state = strip_prefix(state)
    if is_comfy_scaled_fp8(state):  # e.g. wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors
        state = dequantize_comfy_scaled_fp8(state, dtype, f"{flag} {path}")
    if dit_layout(state) == "original":
        state = wan_dit_to_diffusers(state)
    model = build_empty_wan_dit(config)
    assign_weights(model, state, dtype=dtype, source=str(path), flag=flag, device=device, what="Wan DiT")
    model.to(device)  # RoPE buffers were built on the CPU
    model.requires_grad_(False)
    return model.eval()


# ---- saving --------------------------------------------------------------------------------------------
def save_wan_dit_original(model_or_state: torch.nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike, *,
                          dtype: torch.dtype | None = None, prefix: str = "",
                          metadata: dict[str, str] | None = None) -> None:
    """Write a diffusers Wan DiT in the original single-file layout (what ComfyUI and the reference load).

    `prefix="model.diffusion_model."` gives the ComfyUI full-checkpoint form. `dtype` casts floating
    tensors (None keeps them). `.safetensors` or `.pt/.pth`; written atomically.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    out = {}
    for key, tensor in wan_dit_to_original(state).items():
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[prefix + key] = tensor.cpu()
    save_state_dict(out, path, metadata=metadata)
