"""Wan's umT5-XXL text encoder from the files users have, as transformers' `UMT5EncoderModel`.

Accepted files (layout detected from the keys):
- official Wan: `models_t5_umt5-xxl-enc-bf16.pth` (`token_embedding.weight`, `blocks.N.attn.q.weight`,
  `blocks.N.ffn.gate.0.weight`, per-layer `blocks.N.pos_embedding.embedding.weight`, `norm.weight`);
- Hugging Face layout safetensors/.pth (`shared.weight`, `encoder.block.N.layer.0.SelfAttention.q.weight`, ...),
  e.g. ComfyUI's `umt5_xxl_fp16.safetensors`.

Official -> transformers: Wan's FFN is `fc2(fc1(x) * gelu_tanh(gate(x)))`, transformers' gated FFN is
`wo(act(wi_0(x)) * wi_1(x))` with act `gelu_new` (the same tanh GELU), so gate.0 -> wi_0, fc1 -> wi_1,
fc2 -> wo. Both use unscaled attention, RMS norms with eps 1e-6 and bidirectional relative-position buckets
(32 buckets, max distance 128) in every layer.

Prompts are cleaned as the reference does (ftfy, HTML unescape, whitespace collapse), padded to 512
tokens, and each output is trimmed to its real token count (eos included).
"""

from __future__ import annotations

import html
import os
import re

import torch
from transformers import PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from musubi_tuner.errors import CheckpointError
from musubi_tuner.memory.fp8 import cast_linear_weights_to_fp8
from musubi_tuner.models.checkpoint_io import load_state_dict

T5_FLAG = "--t5"
EXPECTED_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth (Wan-AI/Wan2.1-T2V-14B) or umt5_xxl_fp16.safetensors"
RELATIVE_MAX_DISTANCE = 128
"""Not stored in the weights; umT5 (and Wan's copy) use 128."""

UMT5_FP8_SKIP = (r"DenseReluDense\.wo$",)
"""transformers casts the FFN input to `wo.weight.dtype` before `wo` (its fp32-`wo` rule), which would
quantise the activation itself to fp8; so `wo` stays in the load dtype under --fp8_t5."""

_BLOCK_KEYS = {  # official suffix -> transformers suffix, inside block N
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_TOP_KEYS = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
_OFFICIAL_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(.+)")


# ---- key layouts ----------------------------------------------------------------------------------


def official_to_umt5(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official Wan T5 encoder keys -> `UMT5EncoderModel` keys (embedding tied to `encoder.embed_tokens`)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in _TOP_KEYS:
            out[_TOP_KEYS[key]] = value
            continue
        match = _OFFICIAL_BLOCK.fullmatch(key)
        if not match or match.group(2) not in _BLOCK_KEYS:
            raise KeyError(key)
        out[f"encoder.block.{match.group(1)}.{_BLOCK_KEYS[match.group(2)]}"] = value
    out["encoder.embed_tokens.weight"] = out["shared.weight"]
    return out


def umt5_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`UMT5EncoderModel` state dict -> official Wan layout (as in `models_t5_umt5-xxl-enc-bf16.pth`)."""
    top = {v: k for k, v in _TOP_KEYS.items()}
    block = {v: k for k, v in _BLOCK_KEYS.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight
        if key in top:
            out[top[key]] = value
            continue
        match = _HF_BLOCK.fullmatch(key)
        if not match or match.group(2) not in block:
            raise KeyError(key)
        out[f"blocks.{match.group(1)}.{block[match.group(2)]}"] = value
    return out


def _hf_encoder_only(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Full T5 files also hold decoder.* / lm_head.*; the encoder needs only these.
    out = {k: v for k, v in sd.items() if k.startswith("encoder.") and k != "encoder.embed_tokens.weight"}
    out["shared.weight"] = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))
    out["encoder.embed_tokens.weight"] = out["shared.weight"]
    return out


def to_umt5_layout(sd: dict[str, torch.Tensor], path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Detect the layout of a T5 file's state dict and return it in `UMT5EncoderModel` keys."""
    if "scaled_fp8" in sd or any(k.endswith(".scale_weight") for k in sd):
        raise CheckpointError(
            f"{T5_FLAG} {path}: pre-quantised fp8-scaled T5 files are not supported; use {EXPECTED_T5_FILE} "
            f"(add --fp8_t5 to store it in fp8)"
        )
    if "encoder.token_embedding.weight" in sd:  # some repacks prefix the official keys
        sd = {k.removeprefix("encoder."): v for k, v in sd.items()}
    try:
        if "token_embedding.weight" in sd and "blocks.0.attn.q.weight" in sd:
            return official_to_umt5(sd)
        if "encoder.block.0.layer.0.SelfAttention.q.weight" in sd and (
            "shared.weight" in sd or "encoder.embed_tokens.weight" in sd
        ):
            return _hf_encoder_only(sd)
    except KeyError as err:
        raise CheckpointError(
            f"{T5_FLAG} {path}: unexpected key {err} for a umT5 encoder; expected {EXPECTED_T5_FILE}"
        ) from err
    hint = " (this looks like a Wan DiT; pass it as --dit)" if "patch_embedding.weight" in sd else ""
    sample = ", ".join(sorted(sd)[:3])
    raise CheckpointError(
        f"{T5_FLAG} {path}: not a umT5 text encoder{hint}; expected {EXPECTED_T5_FILE} (found keys like {sample})"
    )


def umt5_config_from_state_dict(sd: dict[str, torch.Tensor]) -> UMT5Config:
    """Encoder config inferred from `UMT5EncoderModel` keys (heads from the relative-bias table)."""
    vocab, d_model = sd["shared.weight"].shape
    num_layers = 1 + max(int(_HF_BLOCK.fullmatch(k).group(1)) for k in sd if _HF_BLOCK.fullmatch(k))
    buckets, heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    inner = sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    d_ff = sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0]
    return UMT5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=RELATIVE_MAX_DISTANCE,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


# ---- loading --------------------------------------------------------------------------------------


def load_umt5(
    path: str | os.PathLike, device: torch.device | str, dtype: torch.dtype, fp8: bool = False
) -> UMT5EncoderModel:
    """Load the umT5 encoder (frozen, eval) from an official `.pth` or HF-layout file.

    fp8: store the Linear weights as float8_e4m3fn (`--fp8_t5`); embeddings, norms, the relative
    position tables and `wo` stay in `dtype`, and compute runs in `dtype`.
    """
    sd = to_umt5_layout(load_state_dict(path, flag=T5_FLAG), path)
    config = umt5_config_from_state_dict(sd)
    model = _instantiate_empty(config)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"{T5_FLAG} {path}: weights do not fit a umT5 encoder: {err}") from err
    model.encoder.embed_tokens.weight = model.shared.weight  # assign=True untied them; keep one copy
    if not fp8:
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    # Cast on the CPU, then move: full-precision weights never reach `device` (--fp8_t5 lowers peak VRAM).
    model = model.to(dtype=dtype).eval().requires_grad_(False)
    cast_linear_weights_to_fp8(model, skip_patterns=UMT5_FP8_SKIP)
    return model.to(device=device)


def _instantiate_empty(config: UMT5Config) -> UMT5EncoderModel:
    # Parameters on `meta` (no 23 GB random init for the real model); buffers stay real.
    from accelerate import init_empty_weights

    with init_empty_weights():
        return UMT5EncoderModel(config)


# ---- encoding -------------------------------------------------------------------------------------


def clean_prompt(text: str) -> str:
    """The reference's 'whitespace' cleaning: fix mojibake (ftfy), unescape HTML twice, collapse whitespace."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def encode_prompts_umt5(
    model: UMT5EncoderModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int = 512
) -> list[torch.Tensor]:
    """Encode prompts; one (L_i, d_model) tensor per prompt, L_i = its token count incl. eos (<= max_length)."""
    tokens = tokenizer(
        [clean_prompt(p) for p in prompts],
        padding="max_length",
        truncation=True,
        max_length=max_length,
        add_special_tokens=True,
        return_tensors="pt",
    )
    device = model.shared.weight.device
    ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    lengths = mask.sum(dim=1).tolist()
    return [h[:n] for h, n in zip(hidden, lengths)]
