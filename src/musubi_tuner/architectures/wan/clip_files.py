"""Wan2.1 I2V's CLIP image encoder (open-clip xlm-roberta-large ViT-H/14) as transformers' `CLIPVisionModel`.

Accepted files (layout detected from the keys):
- official Wan: `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`. Its keys are Wan's own names for
  the open-clip model (`visual.patch_embedding.weight`, `visual.cls_embedding`, `visual.pos_embedding`,
  `visual.pre_norm`, `visual.transformer.N.{norm1,attn.to_qkv,attn.proj,norm2,mlp.0,mlp.2}`, `visual.post_norm`,
  `visual.head`), not open_clip's (`visual.conv1` ...). The text tower (`textual.*`), `log_scale` and the
  projection `visual.head` are ignored;
- Hugging Face layout (`vision_model.embeddings...` or without the prefix), e.g. ComfyUI's `clip_vision_h.safetensors`.

Architecture (Wan's `clip_xlm_roberta_vit_h_14`): width 1280, 32 layers, 16 heads, patch 14, 224 px,
pre-norm, exact (erf) GELU, LayerNorm eps 1e-5. Wan uses the output of the penultimate block
(`use_31_block`: 257 tokens x 1280, no post-norm) = transformers' `hidden_states[-2]`.
"""

from __future__ import annotations

import math
import os
import re

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

from musubi_tuner.errors import CheckpointError
from musubi_tuner.models.checkpoint_io import load_state_dict

CLIP_FLAG = "--clip"
EXPECTED_CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth (Wan-AI/Wan2.1-I2V-14B-720P)"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEADS_BY_WIDTH = {1280: 16}
"""Head count is not in the weights. ViT-H/14 has 16; other widths (tiny presets) use head size 16."""
TINY_HEAD_DIM = 16

_BLOCK_KEYS = {  # Wan suffix -> transformers suffix, inside layer N (to_qkv is split separately)
    "norm1.weight": "layer_norm1.weight",
    "norm1.bias": "layer_norm1.bias",
    "attn.proj.weight": "self_attn.out_proj.weight",
    "attn.proj.bias": "self_attn.out_proj.bias",
    "norm2.weight": "layer_norm2.weight",
    "norm2.bias": "layer_norm2.bias",
    "mlp.0.weight": "mlp.fc1.weight",
    "mlp.0.bias": "mlp.fc1.bias",
    "mlp.2.weight": "mlp.fc2.weight",
    "mlp.2.bias": "mlp.fc2.bias",
}
_TOP_KEYS = {
    "visual.patch_embedding.weight": "embeddings.patch_embedding.weight",
    "visual.pre_norm.weight": "pre_layrnorm.weight",
    "visual.pre_norm.bias": "pre_layrnorm.bias",
    "visual.post_norm.weight": "post_layernorm.weight",
    "visual.post_norm.bias": "post_layernorm.bias",
}
_WAN_BLOCK = re.compile(r"visual\.transformer\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_QKV = ("q_proj", "k_proj", "v_proj")


# ---- key layouts ----------------------------------------------------------------------------------


def official_to_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan CLIP keys (visual tower) -> `CLIPVisionModel` keys without prefix; other towers dropped."""
    positions = sd["visual.pos_embedding"]  # (1, tokens, width)
    out: dict[str, torch.Tensor] = {
        "embeddings.class_embedding": sd["visual.cls_embedding"].reshape(-1),
        "embeddings.position_embedding.weight": positions.reshape(positions.shape[-2:]),
    }
    for key, value in sd.items():
        if key in _TOP_KEYS:
            out[_TOP_KEYS[key]] = value
            continue
        match = _WAN_BLOCK.fullmatch(key)
        if not match:
            continue  # visual.cls/pos (done), visual.head, textual.*, log_scale
        prefix, suffix = f"encoder.layers.{match.group(1)}.self_attn.", match.group(2)
        if suffix.startswith("attn.to_qkv."):
            kind = suffix.rsplit(".", 1)[1]  # weight | bias: rows are [q; k; v]
            for name, part in zip(_QKV, value.chunk(3, dim=0)):
                out[f"{prefix}{name}.{kind}"] = part
        elif suffix in _BLOCK_KEYS:
            out[f"encoder.layers.{match.group(1)}.{_BLOCK_KEYS[suffix]}"] = value
        else:
            raise KeyError(key)
    return out


def clip_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`CLIPVisionModel` state dict (with or without `vision_model.`) -> Wan's `visual.*` keys (visual tower only)."""
    sd = {k.removeprefix("vision_model."): v for k, v in sd.items()}
    top = {v: k for k, v in _TOP_KEYS.items()}
    block = {v: k for k, v in _BLOCK_KEYS.items()}
    out = {
        "visual.cls_embedding": sd["embeddings.class_embedding"].reshape(1, 1, -1),
        "visual.pos_embedding": sd["embeddings.position_embedding.weight"].unsqueeze(0),
    }
    for key, value in sd.items():
        match = _HF_BLOCK.fullmatch(key)
        if key in top:
            out[top[key]] = value
        elif match and match.group(2) in block:
            out[f"visual.transformer.{match.group(1)}.{block[match.group(2)]}"] = value
    for index in sorted({int(m.group(1)) for m in map(_HF_BLOCK.fullmatch, sd) if m}):
        for kind in ("weight", "bias"):
            parts = [sd[f"encoder.layers.{index}.self_attn.{name}.{kind}"] for name in _QKV]
            out[f"visual.transformer.{index}.attn.to_qkv.{kind}"] = torch.cat(parts, dim=0)
    return out


def to_clip_layout(sd: dict[str, torch.Tensor], path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Detect the layout of a CLIP file's state dict; return `CLIPVisionModel` keys without prefix."""
    try:
        if "visual.patch_embedding.weight" in sd:
            return official_to_clip(sd)
    except KeyError as err:
        raise CheckpointError(f"{CLIP_FLAG} {path}: unexpected key {err}; expected {EXPECTED_CLIP_FILE}") from err
    stripped = {k.removeprefix("vision_model."): v for k, v in sd.items()}
    if "embeddings.patch_embedding.weight" in stripped:
        unused = ("visual_projection.", "embeddings.position_ids")
        return {k: v for k, v in stripped.items() if not k.startswith(unused)}
    hint = " (open_clip's own key names are not supported; use Wan's file)" if "visual.conv1.weight" in sd else ""
    sample = ", ".join(sorted(sd)[:3])
    raise CheckpointError(
        f"{CLIP_FLAG} {path}: not a Wan CLIP image encoder{hint}; expected {EXPECTED_CLIP_FILE} "
        f"(found keys like {sample})"
    )


def clip_config_from_state_dict(sd: dict[str, torch.Tensor]) -> CLIPVisionConfig:
    """Vision config inferred from `CLIPVisionModel` keys: width, patch, image size, depth, MLP width."""
    hidden, _, patch, _ = sd["embeddings.patch_embedding.weight"].shape
    positions = sd["embeddings.position_embedding.weight"].shape[0]
    grid = math.isqrt(positions - 1)
    layers = 1 + max(int(m.group(1)) for m in map(_HF_BLOCK.fullmatch, sd) if m)
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=HEADS_BY_WIDTH.get(hidden, hidden // TINY_HEAD_DIM),
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )


# ---- loading and encoding -------------------------------------------------------------------------


def load_wan_clip(path: str | os.PathLike, device: torch.device | str, dtype: torch.dtype) -> CLIPVisionModel:
    """Load the I2V CLIP vision tower (frozen, eval) from Wan's `.pth` or an HF-layout file."""
    sd = to_clip_layout(load_state_dict(path, flag=CLIP_FLAG), path)
    try:
        config = clip_config_from_state_dict(sd)
    except (KeyError, ValueError) as err:
        raise CheckpointError(
            f"{CLIP_FLAG} {path}: incomplete CLIP vision weights ({err}); expected {EXPECTED_CLIP_FILE}"
        ) from err
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on meta; buffers (position_ids) stay real
        model = CLIPVisionModel(config)
    if next(iter(model.state_dict())).startswith("vision_model."):  # transformers 4.x nests the tower
        sd = {f"vision_model.{k}": v for k, v in sd.items()}
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"{CLIP_FLAG} {path}: weights do not fit a CLIP vision tower: {err}") from err
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def preprocess_images_clip(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised float32 (B, 3, S, S), as Wan does: [-1, 1], bicubic resize, CLIP mean/std."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False)
    x = x * 0.5 + 0.5
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def encode_images_clip(model: CLIPVisionModel, images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> penultimate-block tokens (B, (S/patch)^2 + 1, hidden); (B, 257, 1280) for Wan."""
    weight = model.get_input_embeddings().weight
    pixels = preprocess_images_clip(images.to(weight.device), model.config.image_size).to(weight.dtype)
    return model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
