"""FramePack DiT files -> diffusers' `HunyuanVideoFramepackTransformer3DModel`.

Users have lllyasviel's release (`FramePackI2V_HY`, F1: `FramePack_F1_I2V_HY_20250503`) as 3 shards
`diffusion_pytorch_model-0000N-of-00003.safetensors` (the reference asks for the first one), single-file bf16
repacks (Kijai's `FramePackI2V_HY_bf16.safetensors`, possibly ComfyUI-prefixed) and the diffusers folder itself.
All of them hold diffusers' own key names (the reference's packed model uses them too), so loading is: find the
files, read the config from the weights (diffusers has no single-file loader for this class), assign on the meta
device. `--fp8_base` / `--fp8_scaled` go through `memory/fp8.py` on the block Linears, as the reference.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from musubi_tuner.errors import CheckpointError
from musubi_tuner.models.checkpoint_io import load_state_dict, strip_prefix
from musubi_tuner.models.file_kinds import describe_checkpoint, sample_keys
from musubi_tuner.models.hf_folder import read_model_folder
from musubi_tuner.models.meta_loading import assign_weights

__all__ = ["load_framepack_dit", "infer_framepack_config", "FRAMEPACK_FP8_TARGETS", "DIT_FLAG_HINT", "BLOCK_CLASSES"]

DIT_FLAG_HINT = ("--dit expects a FramePack DiT: the first of lllyasviel/FramePackI2V_HY's (or F1's) 3 shards "
                 "diffusion_pytorch_model-00001-of-00003.safetensors, FramePackI2V_HY_bf16.safetensors, or their folder")
FRAMEPACK_FP8_TARGETS = (r"^transformer_blocks\.", r"^single_transformer_blocks\.")
"""The Linears --fp8_base/--fp8_scaled store in fp8 (the reference's targets; norms stay, by the class's own
`_skip_layerwise_casting_patterns`)."""

BLOCK_CLASSES = ("HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock")
"""The repeated transformer blocks (the reference's FramePack LoRA targets and swapped blocks). diffusers'
FramePack class declares `_repeated_blocks = []`, so the loader sets these on the instance, for --blocks_to_swap
and regional compilation."""

_MARKER = "clean_x_embedder.proj.weight"
_FRAMEPACK_ONLY = ("clean_x_embedder.", "image_projection.")


def _shapes(sd: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in sd.items()}


def _not_framepack(shape: Mapping[str, Any]) -> str:
    """What the file is instead, for the error message."""
    if "x_embedder.proj.weight" in shape and "context_embedder.proj_in.weight" in shape:
        return "a HunyuanVideo DiT in diffusers layout (it has no FramePack history embedder clean_x_embedder)"
    kind = describe_checkpoint(shape)
    return kind if kind else f"not a FramePack DiT (first keys: {sample_keys(shape)})"


def infer_framepack_config(shapes: Mapping[str, Any], *, source: str = "the checkpoint",
                           flag: str = "--dit") -> dict[str, Any]:
    """`HunyuanVideoFramepackTransformer3DModel` config from a state dict (tensors or shape tuples).

    The HunyuanVideo part is read by HunyuanVideo's own rules (`infer_hv_config`; released: 20 double + 40 single
    blocks, 24 heads x 128, RoPE (16, 56, 56)); FramePack adds the SigLIP projection (1152 wide as released) and
    the history embedder.
    """
    from musubi_tuner.architectures.hunyuan_video.dit_files import hv_diffusers_to_original, infer_hv_config

    shape = _shapes(shapes)
    if _MARKER not in shape or "x_embedder.proj.weight" not in shape:
        raise CheckpointError(f"{flag} {source} is {_not_framepack(shape)}; {DIT_FLAG_HINT}")
    hunyuan_part = {k: torch.empty(v, device="meta") for k, v in shape.items() if not k.startswith(_FRAMEPACK_ONLY)}
    try:
        config = infer_hv_config(hv_diffusers_to_original(hunyuan_part), source=source, flag=flag)
    except CheckpointError as exc:
        raise CheckpointError(f"{flag} {source}: an incomplete FramePack DiT ({exc}); {DIT_FLAG_HINT}") from exc
    image_proj = shape.get("image_projection.up.weight")
    return {**config, "image_condition_type": None, "has_image_proj": image_proj is not None,
            "image_proj_dim": int(image_proj[1]) if image_proj is not None else 1152, "has_clean_x_embedder": True}


def _read_state(path: Path, flag: str) -> dict[str, torch.Tensor]:
    """The whole state dict of a file (any shard brings in its siblings) or a folder (config.json optional)."""
    if path.is_dir():
        return read_model_folder(path, flag)[1]
    if path.name.endswith(".safetensors.index.json"):  # the index itself: load the shards it names
        return read_model_folder(path.parent, flag)[1]
    return load_state_dict(path, device="cpu", flag=flag)


def _reject_prequantized(sd: Mapping[str, torch.Tensor], where: str) -> None:
    if any(k.endswith((".scale_weight", "_scale")) for k in sd):
        raise CheckpointError(f"{where} is a pre-quantized scaled-fp8 checkpoint, which the reference rejects too; "
                              "use the bf16 shards or FramePackI2V_HY_bf16.safetensors with --fp8_scaled")


def mark_repeated_blocks(model: nn.Module) -> nn.Module:
    """Set `BLOCK_CLASSES` as `model`'s `_repeated_blocks`, on the instance only (no process-wide change)."""
    model._repeated_blocks = list(BLOCK_CLASSES)
    return model


def build_empty_framepack_dit(config: dict[str, Any]) -> nn.Module:
    """`HunyuanVideoFramepackTransformer3DModel` with parameters on the meta device (shapes only)."""
    from accelerate import init_empty_weights
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    with init_empty_weights():
        return mark_repeated_blocks(HunyuanVideoFramepackTransformer3DModel.from_config(config))


def load_framepack_dit(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                       dtype: torch.dtype | None = None, fp8_base: bool = False, fp8_scaled: bool = False,
                       flag: str = "--dit") -> nn.Module:
    """Load a FramePack DiT (shard, single file, index json or folder) into a frozen, eval-mode
    `HunyuanVideoFramepackTransformer3DModel`.

    Tensors are read memory-mapped on the CPU and cast on their way to `device` (`dtype` None keeps the file's).
    `fp8_base` stores the block Linear weights in float8_e4m3fn, `fp8_scaled` quantizes them with scales
    (`memory/fp8.py`); both leave embedders, norms and the output layers as loaded.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{flag} {path}: no such file or folder; {DIT_FLAG_HINT}")
    state = strip_prefix(_read_state(path, flag))
    _reject_prequantized(state, f"{flag} {path}")
    config = infer_framepack_config(state, source=str(path), flag=flag)
    model = build_empty_framepack_dit(config)
    assign_weights(model, state, dtype=dtype, device=device, source=str(path), flag=flag, what="FramePack DiT")
    model.to(device)  # non-persistent buffers were built on the CPU
    if fp8_base or fp8_scaled:
        from musubi_tuner.memory.fp8 import store_dit_in_fp8

        store_dit_in_fp8(model, FRAMEPACK_FP8_TARGETS, scaled=fp8_scaled)
    return model.eval().requires_grad_(False)
