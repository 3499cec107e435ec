"""The Wan DiT shape a LoRA file implies, so LoRA layouts convert without the model file.

Every block Linear of Wan takes the model width as input except the FFN's second layer (which takes the FFN
width), and only the FFN's first layer outputs the FFN width. The image branch (`k_img`/`v_img`,
`add_k_proj`/`add_v_proj`) marks an I2V/FLF2V LoRA. Works on every key spelling we read (reference
`lora_unet_blocks_0_ffn_2`, original `blocks.0.ffn.2`, diffusers `blocks.0.ffn.net.2`).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from musubi_tuner.errors import UserError
from musubi_tuner.networks.targets import LoraPart, LoraTarget

_BLOCK_RE = re.compile(r"(?:^|lora_unet_|\.)blocks[._](\d+)[._]")  # not FLUX double_blocks
_FFN_IN_RE = re.compile(r"ffn[._](?:net[._])?0(?:[._]proj)?[._]lora")
_FFN_OUT_RE = re.compile(r"ffn[._](?:net[._])?2[._]lora")
_IMAGE_RE = re.compile(r"k_img|v_img|add_k_proj|add_v_proj")
_DOWN = (".lora_down.", ".lora_A.")
_UP = (".lora_up.", ".lora_B.")


# The Linear layers of one DiT block (diffusers path after `blocks.{n}.`, output width), as `lora_candidates` finds
# them on the model; the image-branch ones only in I2V/FLF2V models. A test compares with the built model.
_BLOCK_LINEARS = (("attn1.to_q", "dim"), ("attn1.to_k", "dim"), ("attn1.to_v", "dim"), ("attn1.to_out.0", "dim"),
                  ("attn2.to_q", "dim"), ("attn2.to_k", "dim"), ("attn2.to_v", "dim"), ("attn2.to_out.0", "dim"),
                  ("attn2.add_k_proj", "dim"), ("attn2.add_v_proj", "dim"),
                  ("ffn.net.0.proj", "ffn"), ("ffn.net.2", "dim"))


def _matrices(lora_sd: dict[str, torch.Tensor], kinds: tuple[str, ...]) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in lora_sd.items() if v.dim() == 2 and any(kind in k for kind in kinds)]


def wan_config_from_lora(lora_sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A `WanTransformer3DModel` config whose block Linears have the shapes of the LoRA's modules."""
    from musubi_tuner.architectures.wan.dit_files import HEAD_DIM, _diffusers_config

    blocks = [int(m.group(1)) for k in lora_sd if (m := _BLOCK_RE.search(k))]
    downs = _matrices(lora_sd, _DOWN)
    widths = {v.shape[1] for k, v in downs if not _FFN_OUT_RE.search(k)}
    if not blocks or len(widths) != 1:
        raise UserError(f"the LoRA's keys do not describe Wan DiT blocks (block indices {sorted(set(blocks))[:3]}, "
                        f"input widths {sorted(widths)[:3]}); is it a Wan LoRA?")
    dim = widths.pop()
    ffn_widths = [v.shape[0] for k, v in _matrices(lora_sd, _UP) if _FFN_IN_RE.search(k)]
    ffn_widths += [v.shape[1] for k, v in downs if _FFN_OUT_RE.search(k)]
    ffn_dim = ffn_widths[0] if ffn_widths else 4 * dim  # no FFN module in the LoRA: its width is never used
    heads = dim // HEAD_DIM if dim % HEAD_DIM == 0 else 1
    image = any(_IMAGE_RE.search(k) for k in lora_sd)
    return _diffusers_config(dim=dim, num_heads=heads, num_layers=max(blocks) + 1, ffn_dim=ffn_dim,
                             in_dim=36 if image else 16, mode="i2v" if image else "t2v")


def wan_lora_targets_from_config(config: dict[str, Any]) -> list[LoraTarget]:
    """The block LoRA targets of a Wan DiT with this config, on meta Linears (no diffusers import, no memory)."""
    from torch import nn

    from musubi_tuner.architectures.wan.dit_names import original_module_name

    dim = config["num_attention_heads"] * config["attention_head_dim"]
    widths = {"dim": dim, "ffn": config["ffn_dim"]}
    image = config.get("added_kv_proj_dim") is not None
    targets = []
    for block in range(config["num_layers"]):
        for suffix, out_kind in _BLOCK_LINEARS:
            if "add_" in suffix and not image:
                continue
            path = f"blocks.{block}.{suffix}"
            in_features = widths["ffn"] if suffix == "ffn.net.2" else dim
            linear = nn.Linear(in_features, widths[out_kind], device="meta")
            targets.append(LoraTarget(original_module_name(path), (LoraPart(path, linear),)))
    return targets
