"""FramePack LoRA names, and other LoRAs converted to them.

The reference's FramePack model uses diffusers' module names, and its `networks.lora_framepack` targets every
Linear inside `HunyuanVideoTransformerBlock` / `HunyuanVideoSingleTransformerBlock`, excluding `.*(norm).*`
(the modulation Linears `norm1.linear`, `norm1_context.linear`, `norm.linear`). So a target's "original" name IS
its diffusers path and keys read `lora_unet_transformer_blocks_0_attn_to_q`; no layer is fused.

`framepack_lora_from_any` accepts what the reference's generation accepts (its `convert_lora_for_framepack`):
musubi FramePack LoRAs as they are; dotted `diffusion_model.` / `transformer.` + `lora_A/B` files (diffusion-pipe)
renamed to that layout with alpha = rank; HunyuanVideo LoRAs (musubi or diffusion-pipe, official HV names)
mapped onto the diffusers names through HunyuanVideo's own name table, fused q/k/v (and single-block `linear1` =
q, k, v, MLP in) split into row slices of the up matrix with the down matrix and alpha shared, which is exact.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch
from torch import nn

from musubi_tuner.architectures.framepack.dit_files import BLOCK_CLASSES, build_empty_framepack_dit
from musubi_tuner.architectures.hunyuan_video.dit_names import linear_parts_for
from musubi_tuner.architectures.key_plan import block_layout_from_lora
from musubi_tuner.errors import CheckpointError
from musubi_tuner.networks.lora_formats import LoraWeights, NameIndex, parse_lora_state_dict, to_default
from musubi_tuner.networks.targets import LoraPart, LoraTarget

__all__ = ["LORA_TARGET_BLOCKS", "LORA_DEFAULT_EXCLUDES", "framepack_lora_candidates",
           "framepack_lora_targets_for_conversion", "framepack_lora_from_any", "is_hunyuan_video_lora"]

logger = logging.getLogger(__name__)

LORA_TARGET_BLOCKS = BLOCK_CLASSES
"""The reference's FRAMEPACK_TARGET_REPLACE_MODULES: every Linear inside these blocks may get a LoRA."""
LORA_DEFAULT_EXCLUDES = (r".*(norm).*",)
"""The reference's default exclude (regex fullmatch on the module path): the modulation Linears."""

_FP_BLOCK_RE = re.compile(r"(?:^|[._])(single_)?transformer_blocks[._](\d+)[._]")


def framepack_lora_candidates(dit: nn.Module) -> list[LoraTarget]:
    """Every Linear of the target blocks, named by its diffusers path (which is the reference's name)."""
    targets = []
    for block_path, block in dit.named_modules():
        if type(block).__name__ not in LORA_TARGET_BLOCKS:
            continue
        for child_path, child in block.named_modules():
            if isinstance(child, nn.Linear):
                path = f"{block_path}.{child_path}"
                targets.append(LoraTarget(path, (LoraPart(path, child),)))
    return targets


def framepack_lora_targets_for_conversion(lora_sd: Mapping[str, torch.Tensor]) -> list[LoraTarget]:
    """`framepack_lora_candidates` of a shapes-only (meta) DiT sized from a FramePack LoRA's own keys."""
    from musubi_tuner.architectures.key_plan import default_axes_dims_rope, heads_for_width

    counts = {"": 0, "single_": 0}
    for key in lora_sd:
        if m := _FP_BLOCK_RE.search(key):
            counts[m.group(1) or ""] = max(counts[m.group(1) or ""], int(m.group(2)) + 1)
    _, _, hidden = block_layout_from_lora(lora_sd)
    head_dim, heads = heads_for_width(hidden)
    config = {"num_layers": counts[""], "num_single_layers": counts["single_"], "num_refiner_layers": 0,
              "attention_head_dim": head_dim, "num_attention_heads": heads,
              "rope_axes_dim": default_axes_dims_rope(head_dim), "has_clean_x_embedder": True}
    return framepack_lora_candidates(build_empty_framepack_dit(config))


def is_hunyuan_video_lora(lora_sd: Mapping[str, torch.Tensor]) -> bool:
    """HunyuanVideo's official block names in any key (the reference's test)."""
    return any("double_blocks" in k or "single_blocks" in k for k in lora_sd)


def _split_rows(name: str, weights: LoraWeights, parts: list[str]) -> list[int]:
    """Row counts of the diffusers parts of fused HV layer `name`: equal thirds for q/k/v; `linear1` is
    q, k, v (hidden rows each, hidden = the layer's input width) then the MLP input."""
    rows = weights.up.shape[0]
    if len(parts) == 1:
        return [rows]
    if len(parts) == 3 and rows % 3 == 0:
        return [rows // 3] * 3
    hidden = weights.down.shape[1]
    if len(parts) == 4 and rows > 3 * hidden:
        return [hidden, hidden, hidden, rows - 3 * hidden]
    raise CheckpointError(f"HunyuanVideo LoRA module {name!r}: {rows} output rows cannot be split into {parts}")


def _hunyuan_to_framepack(lora_sd: Mapping[str, torch.Tensor]) -> dict[str, LoraWeights]:
    num_double, num_single, _ = block_layout_from_lora(lora_sd)
    layout = dict(linear_parts_for(num_double, num_single))
    canonical, unmatched = parse_lora_state_dict(dict(lora_sd), NameIndex(original_names=layout))
    if unmatched:
        logger.warning("HunyuanVideo LoRA: %d keys name no double/single block layer and are ignored, e.g. %s",
                       len(unmatched), unmatched[:3])
    out: dict[str, LoraWeights] = {}
    for name, weights in canonical.items():
        parts = layout[name]
        for part, up in zip(parts, weights.up.split(_split_rows(name, weights, parts), dim=0)):
            # own copies: safetensors refuses to save tensors that share memory
            alpha = None if weights.alpha is None else weights.alpha.clone()
            out[part] = LoraWeights(weights.down.clone(), up.clone(), alpha)
    return out


def framepack_lora_from_any(lora_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA state dict in the reference's FramePack layout (`lora_unet_<diffusers path>`), from a musubi
    FramePack LoRA (returned as is), a dotted `diffusion_model.`/`transformer.` lora_A/B file, or a HunyuanVideo
    LoRA in either form. The weight deltas are unchanged (fused layers split exactly)."""
    if is_hunyuan_video_lora(lora_sd):
        logger.info("HunyuanVideo LoRA: converting its names to FramePack's (q/k/v and linear1 split)")
        return to_default(_hunyuan_to_framepack(lora_sd))
    if any(k.startswith("lora_unet_") for k in lora_sd):
        return dict(lora_sd)
    canonical, unmatched = parse_lora_state_dict(dict(lora_sd))  # strips diffusion_model./transformer.
    if unmatched:
        logger.warning("LoRA: %d keys are not diffusion_model./transformer. LoRA matrices and are ignored, e.g. %s",
                       len(unmatched), unmatched[:3])
    return to_default(canonical)
