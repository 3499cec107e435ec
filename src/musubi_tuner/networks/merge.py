"""Merge LoRAs into a DiT state dict in the ORIGINAL key layout (any architecture, no model built).

W[<name>.weight] += multiplier * delta (LoRA: scale * up @ down; LoHa/LoKr: their products), computed in fp32 and cast back to W's dtype. Module names
are recovered from the base checkpoint's own keys (the same rule ComfyUI uses), so no name map is needed;
a diffusers-layout LoRA additionally needs the architecture's targets to re-fuse its parts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from musubi_tuner.errors import CheckpointError
from musubi_tuner.networks.lora_formats import NameIndex
from musubi_tuner.networks.lycoris_weights import parse_adapter_state_dict
from musubi_tuner.networks.targets import LoraTarget

logger = logging.getLogger(__name__)

# Prefixes under which original-layout checkpoints store the DiT (ComfyUI full checkpoints use the second).
_BASE_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")


def _base_prefix(base_sd: dict[str, torch.Tensor]) -> str:
    for prefix in _BASE_PREFIXES[1:]:
        if any(k.startswith(prefix) for k in base_sd):
            return prefix
    return ""


def merge_lora_into_original_state_dict(
    base_sd: dict[str, torch.Tensor],
    lora_sds: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]],
    multipliers: float | Sequence[float] = 1.0,
    targets: Sequence[LoraTarget] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Merge one or several LoRAs (any layout) into `base_sd` IN PLACE and return it.

    multipliers: one per LoRA (a single number applies to all). device: where the matmuls run (default: the
    weight's device). Raises a CheckpointError naming LoRA modules whose weight is not in the base.
    """
    if isinstance(lora_sds, dict):
        lora_sds = [lora_sds]
    if isinstance(multipliers, (int, float)):
        multipliers = [float(multipliers)] * len(lora_sds)
    if len(multipliers) != len(lora_sds):
        raise CheckpointError(f"{len(lora_sds)} LoRA(s) but {len(multipliers)} multiplier(s); give one per LoRA")
    prefix = _base_prefix(base_sd)
    names = [k[len(prefix) : -len(".weight")] for k in base_sd if k.startswith(prefix) and k.endswith(".weight")]
    index = NameIndex(names, targets or ())
    for number, (lora_sd, multiplier) in enumerate(zip(lora_sds, multipliers), start=1):
        canonical, unmatched = parse_adapter_state_dict(lora_sd, index)
        absent = [n for n in canonical if f"{prefix}{n}.weight" not in base_sd]
        if unmatched or absent:
            from musubi_tuner.networks.lora import _module_stems

            bad = absent + _module_stems(unmatched)
            raise CheckpointError(
                f"LoRA #{number}: {len(bad)} module(s) are not in the base model, e.g. {bad[:5]}; "
                "is the LoRA for another architecture?"
            )
        for name, weights in canonical.items():
            _merge_one(base_sd, f"{prefix}{name}.weight", weights, multiplier, device)
        logger.info("merged LoRA #%d (%d modules, multiplier %s)", number, len(canonical), multiplier)
    return base_sd


def _merge_one(base_sd: dict, key: str, weights, multiplier: float, device) -> None:
    """weights: LoraWeights / LohaWeights / LokrWeights (anything with `shape` and `scaled_delta`)."""
    weight = base_sd[key]
    if tuple(weight.shape) != tuple(weights.shape):
        raise CheckpointError(
            f"LoRA for {key} has shape {tuple(weights.shape)} but the base weight is "
            f"{tuple(weight.shape)}; the LoRA is for another model size"
        )
    device = weight.device if device is None else torch.device(device)
    merged = weight.to(device, torch.float32) + weights.scaled_delta(multiplier, device)
    base_sd[key] = merged.to(weight.device, weight.dtype)
