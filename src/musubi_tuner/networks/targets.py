"""How a LoRA module is attached: one ORIGINAL checkpoint layer, one or more diffusers Linear parts.

The architecture module builds these (it alone knows the name map). A fused original layer
(FLUX `img_attn.qkv`, `single_blocks.N.linear1`) has several parts: the LoRA down matrix is shared
and the up matrix's rows are split over the parts in order, which is exactly the reference
parameterisation, so files convert both ways without loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class LoraPart:
    module_path: str
    """Dotted path of the diffusers `nn.Linear` inside the DiT, e.g. `blocks.0.attn1.to_q`."""

    module: nn.Linear = field(compare=False, repr=False)


@dataclass(frozen=True)
class LoraTarget:
    original_name: str
    """Dotted module path in the ORIGINAL checkpoint, e.g. `blocks.0.self_attn.q`."""

    parts: tuple[LoraPart, ...]
    """Diffusers Linear layers that together form the original layer, in output-row order."""

    @property
    def lora_name(self) -> str:
        """Reference key stem: `lora_unet_` + original path with dots replaced by underscores."""
        return "lora_unet_" + self.original_name.replace(".", "_")

    @property
    def in_features(self) -> int:
        return self.parts[0].module.in_features

    @property
    def out_features(self) -> int:
        return sum(p.module.out_features for p in self.parts)

    @property
    def split_sizes(self) -> list[int]:
        return [p.module.out_features for p in self.parts]


def targets_from_layout(model: nn.Module, layout: list[tuple[str, list[str]]]) -> list[LoraTarget]:
    """LoraTargets from (original module path, [diffusers Linear paths of `model` in output-row order]) pairs."""
    return [LoraTarget(original, tuple(LoraPart(p, model.get_submodule(p)) for p in parts))
            for original, parts in layout]
