"""CLIP-L text encoder from the files users have; shared by FLUX.1 Kontext, HunyuanVideo and FramePack.

Accepted: ComfyUI `clip_l.safetensors` (Hugging Face keys `text_model.*`, sometimes under a ComfyUI
checkpoint prefix, plus `text_projection.weight`), or a Hugging Face folder (`text_encoder_2` of
HunyuanVideo: a whole `openai/clip-vit-large-patch14` CLIPModel, or a CLIPTextModel). The shapes come from
the weights; a folder's config.json adds what the weights cannot say (head count, activation).

The pooled output is the final hidden state at the first end-of-text token (77 tokens, padded).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from musubi_tuner.errors import CheckpointError
from musubi_tuner.models.checkpoint_io import count_numbered, load_state_dict, model_from_state_dict, strip_prefix

CLIP_TOKENIZER_HUB_ID = "openai/clip-vit-large-patch14"
CLIP_TOKENIZER_FLAG = "--clip_tokenizer"
CLIP_MAX_LENGTH = 77

_CLIP_PREFIXES = ("text_encoders.clip_l.transformer.", "clip_l.transformer.", "cond_stage_model.transformer.")
_CLIP_IGNORED = ("text_projection.weight", "logit_scale", "embeddings.position_ids")
_CONFIG_KEYS_NOT_IN_WEIGHTS = ("num_attention_heads", "hidden_act", "layer_norm_eps")


def _clip_heads(hidden: int) -> int:
    """Head count is not in the weights. OpenAI CLIP text towers use 64-wide heads (CLIP-L: 12);
    widths that are not a multiple of 64 (the tiny presets) use 16-wide heads."""
    return hidden // 64 if hidden % 64 == 0 else hidden // 16


def infer_clip_config(sd: dict[str, torch.Tensor], source: str = "--text_encoder2") -> dict:
    """`CLIPTextConfig` kwargs from CLIP text weights (keys without the `text_model.` prefix).

    Real CLIP-L: hidden 768, 12 layers, 12 heads, MLP 3072, vocab 49408, 77 positions, quick_gelu.
    EOS is the last vocabulary id (49407), which is what the pooled output is read at.
    """
    if "embeddings.token_embedding.weight" not in sd:
        shown = ", ".join(list(sd)[:3]) or "no keys"
        raise CheckpointError(
            f"{source}: not a CLIP text encoder (first keys: {shown}); expected clip_l.safetensors"
        )
    vocab, hidden = sd["embeddings.token_embedding.weight"].shape
    return {
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(sd["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "num_hidden_layers": count_numbered(sd, r"encoder\.layers\.(\d+)\."),
        "num_attention_heads": _clip_heads(int(hidden)),
        "max_position_embeddings": int(sd["embeddings.position_embedding.weight"].shape[0]),
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": int(hidden),
        "bos_token_id": int(vocab) - 2,
        "eos_token_id": int(vocab) - 1,
        "pad_token_id": 1,
    }


def build_clip(sd: dict[str, torch.Tensor], source: str = "--text_encoder2", config_overrides: dict | None = None):
    """`CLIPTextModel` from CLIP text weights (`text_model.` prefix optional).

    config_overrides: values from a folder's config.json for what the weights do not fix (heads, activation).
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if k not in _CLIP_IGNORED}
    config = CLIPTextConfig(**{**infer_clip_config(sd, source), **(config_overrides or {})})
    model = model_from_state_dict(lambda: CLIPTextModel(config), sd,
                                  f"{source}: the CLIP weights do not fit a CLIP text model")
    # A non-persistent buffer is not in the file; rebuild it off the meta device.
    device = sd["embeddings.token_embedding.weight"].device
    positions = torch.arange(config.max_position_embeddings, device=device).expand(1, -1)
    model.embeddings.register_buffer("position_ids", positions, persistent=False)
    return model


def load_clip_l(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.bfloat16,
    flag: str = "--text_encoder2",
):
    """Load CLIP-L from `clip_l.safetensors` or a Hugging Face folder as a frozen, eval `CLIPTextModel`."""
    from musubi_tuner.models.hf_folder import read_model_folder

    source = f"{flag} {path}"
    overrides = None
    if Path(path).is_dir():
        config, sd = read_model_folder(path, flag, dtype=dtype, device=device)
        config = config.get("text_config", config)  # a whole CLIPModel keeps the text part nested
        overrides = {k: config[k] for k in _CONFIG_KEYS_NOT_IN_WEIGHTS if k in config}
        sd = {k: v for k, v in sd.items() if k.startswith("text_model.")}
    else:
        sd = strip_prefix(load_state_dict(path, dtype=dtype, device=device, flag=flag), _CLIP_PREFIXES)
    return build_clip(sd, source, overrides).eval().requires_grad_(False)


def clip_input_ids(tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` (B, 77): padded to 77, longer prompts truncated (as the reference)."""
    return tokenizer(prompts, max_length=CLIP_MAX_LENGTH, padding="max_length", truncation=True, return_tensors="pt")
