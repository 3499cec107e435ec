"""A toy architecture for the LoRA tests: diffusers-style split q/k/v whose ORIGINAL layer is one fused `qkv`.

Original names (BFL-like, underscores inside segments on purpose):
  double_blocks.N.img_attn.qkv  -> blocks.N.to_q / to_k / to_v   (fused: three parts)
  double_blocks.N.img_attn.proj -> blocks.N.to_out
  double_blocks.N.img_mlp.0 / .2 -> blocks.N.ff / ff_out
  double_blocks.N.img_mod.lin   -> blocks.N.mod                  (excluded unless the user gives exclude_patterns)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from musubi_tuner.networks.targets import LoraPart, LoraTarget

DIM = 8
_SINGLE = {"to_out": "img_attn.proj", "ff": "img_mlp.0", "ff_out": "img_mlp.2", "mod": "img_mod.lin"}


class ToyBlock(nn.Module):
    def __init__(self, dim: int = DIM):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.Linear(dim, dim)
        self.ff = nn.Linear(dim, 2 * dim)
        self.ff_out = nn.Linear(2 * dim, dim)
        self.mod = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
        x = x + self.to_out(attn)
        scale, shift = self.mod(x).chunk(2, dim=-1)
        return x + self.ff_out(F.gelu(self.ff(x * (1 + scale) + shift)))


class ToyDiT(nn.Module):
    def __init__(self, depth: int = 2, dim: int = DIM):
        super().__init__()
        self.blocks = nn.ModuleList(ToyBlock(dim) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm_out(x)


class ToyArch:
    name = "toy"
    network_module = "networks.lora_toy"
    modelspec_architecture = "toy-1"
    lora_default_excludes = (r".*norm.*",)
    lora_default_excludes_if_unset = (r".*img_mod\.lin.*",)

    def lora_candidates(self, dit: ToyDiT) -> list[LoraTarget]:
        targets = []
        for i, block in enumerate(dit.blocks):
            parts = tuple(LoraPart(f"blocks.{i}.{n}", getattr(block, n)) for n in ("to_q", "to_k", "to_v"))
            targets.append(LoraTarget(f"double_blocks.{i}.img_attn.qkv", parts))
            for attr, original in _SINGLE.items():
                targets.append(
                    LoraTarget(f"double_blocks.{i}.{original}", (LoraPart(f"blocks.{i}.{attr}", getattr(block, attr)),))
                )
        return targets

    def dit_state_dict_to_original(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {"final_norm.weight": sd["norm_out.weight"], "final_norm.bias": sd["norm_out.bias"]}
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        for i in range(depth):
            for kind in ("weight", "bias"):
                out[f"double_blocks.{i}.img_attn.qkv.{kind}"] = torch.cat(
                    [sd[f"blocks.{i}.{n}.{kind}"] for n in ("to_q", "to_k", "to_v")]
                )
                for attr, original in _SINGLE.items():
                    out[f"double_blocks.{i}.{original}.{kind}"] = sd[f"blocks.{i}.{attr}.{kind}"]
        return out

    def original_to_dit(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {"norm_out.weight": sd["final_norm.weight"], "norm_out.bias": sd["final_norm.bias"]}
        depth = len({k.split(".")[1] for k in sd if k.startswith("double_blocks.")})
        for i in range(depth):
            for kind in ("weight", "bias"):
                q, k, v = sd[f"double_blocks.{i}.img_attn.qkv.{kind}"].chunk(3)
                out.update({f"blocks.{i}.to_q.{kind}": q, f"blocks.{i}.to_k.{kind}": k, f"blocks.{i}.to_v.{kind}": v})
                for attr, original in _SINGLE.items():
                    out[f"blocks.{i}.{attr}.{kind}"] = sd[f"double_blocks.{i}.{original}.{kind}"]
        return out


def forward_with_lora(dit: nn.Module, network: nn.Module, x: torch.Tensor, multiplier: float | None = None) -> torch.Tensor:
    """`dit(x)` with `network` applied (at `multiplier` when given), the network removed again afterwards."""
    if multiplier is not None:
        network.set_multiplier(multiplier)
    network.apply_to()
    try:
        with torch.no_grad():
            return dit(x)
    finally:
        network.remove()


def randomize_lora(network: nn.Module, seed: int = 1) -> None:
    """Give every up matrix random values (init is zero, which would hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "lora_up" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def comfy_unconsumed_keys(lora_sd: dict, original_sd: dict) -> list[str]:
    """Emulate ComfyUI's generic key map: each `<path>.weight` makes `lora_unet_<path_>` and `diffusion_model.<path>`
    resolvable; a LoRA key is consumed when it is such a prefix plus a known suffix. Returns unconsumed keys."""
    prefixes = set()
    for key in original_sd:
        if key.endswith(".weight"):
            path = key[: -len(".weight")]
            prefixes.add("lora_unet_" + path.replace(".", "_"))
            prefixes.add("diffusion_model." + path)
    suffixes = (".lora_up.weight", ".lora_down.weight", ".alpha", ".lora_A.weight", ".lora_B.weight")
    consumed = {p + s for p in prefixes for s in suffixes}
    return [k for k in lora_sd if k not in consumed]
