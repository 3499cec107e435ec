"""ComfyUI's scaled-fp8 checkpoints (`*_fp8_scaled.safetensors`, e.g. Comfy-Org's Wan2.2 repackaged experts).

Layout (ComfyUI's "legacy" scaled fp8, prefixes already stripped): a marker tensor `scaled_fp8`; every quantized
Linear stores `<layer>.weight` in float8 and a per-tensor float32 `<layer>.scale_weight`, optionally
`<layer>.scale_input` (the activation scale for fp8 matmuls, unused when the weight is dequantized). The real weight
is `weight.float() * scale_weight`. Other layers are stored as usual.

We dequantize on load (one tensor at a time, so the peak is one layer in float32): the model is then the one the
fp16/bf16 file gives up to fp8 rounding, and `--fp8`/`--fp8_base`/`--fp8_scaled` store it in fp8 again if asked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from musubi_tuner.errors import CheckpointError

MARKER = "scaled_fp8"
WEIGHT_SCALE = ".scale_weight"
INPUT_SCALE = ".scale_input"
NEWER_FORMAT_SUFFIXES = (".comfy_quant", ".weight_scale", ".input_scale")
"""ComfyUI's newer per-layer quantization metadata, which this loader does not read."""


def is_comfy_scaled_fp8(keys: Mapping[str, Any] | set[str]) -> bool:
    return MARKER in keys


def without_scale_keys(shapes: Mapping[str, Any]) -> dict[str, Any]:
    """The keys a dequantized state dict will have (for config inference from a header)."""
    return {k: v for k, v in shapes.items() if k != MARKER and not k.endswith((WEIGHT_SCALE, INPUT_SCALE))}


def dequantize_comfy_scaled_fp8(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None,
                                where: str) -> dict[str, torch.Tensor]:
    """The state dict with every scaled fp8 weight turned into `weight * scale_weight` in `dtype` (None: bfloat16)
    and the scale keys and marker removed."""
    newer = sorted(k for k in state if k.endswith(NEWER_FORMAT_SUFFIXES))
    if newer:
        raise CheckpointError(f"{where} uses ComfyUI's newer quantization metadata ({newer[0]}), which is not "
                              "supported; use the fp16/bf16 or the *_fp8_scaled.safetensors file")
    target = dtype or torch.bfloat16
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key == MARKER or key.endswith((WEIGHT_SCALE, INPUT_SCALE)):
            continue
        scale_key = key.removesuffix(".weight") + WEIGHT_SCALE if key.endswith(".weight") else None
        if scale_key in state:
            tensor = (tensor.to(torch.float32) * state[scale_key].to(torch.float32)).to(target)
        elif tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise CheckpointError(f"{where}: {key} is stored in fp8 without a {WEIGHT_SCALE}; the file is incomplete "
                                  "or of another format")
        out[key] = tensor
    return out
