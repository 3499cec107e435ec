"""FLUX text encoders from the files users have: ComfyUI `t5xxl_fp16.safetensors` and `clip_l.safetensors`.

Both files hold Hugging Face transformers keys (T5: `encoder.block.N...`, `shared.weight`; CLIP:
`text_model.*`), sometimes under a ComfyUI checkpoint prefix. The config is read from the weights,
so the tiny test files use the same loaders. CLIP-L lives in `musubi_tuner.models.clip_text` (shared
with HunyuanVideo and FramePack). Tokenizers are not in these files; they come from
`--t5_tokenizer` / `--clip_tokenizer` (a local folder) or the hub ids below via
`musubi_tuner.models.tokenizers.resolve_tokenizer`.

Prompt encoding follows the reference: T5 tokens padded to 512 and encoded WITHOUT an attention
mask (padding positions included, all 512 vectors kept); CLIP-L padded to 77, pooled output.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from musubi_tuner.architectures.flux_kontext.dit_files import _cast, _read_safetensors
from musubi_tuner.errors import CheckpointError, UserError
from musubi_tuner.models.checkpoint_io import count_numbered, model_from_state_dict, strip_prefix
from musubi_tuner.models.clip_text import CLIP_TOKENIZER_FLAG, CLIP_TOKENIZER_HUB_ID, clip_input_ids

T5_TOKENIZER_HUB_ID = "google/t5-v1_1-xxl"
T5_TOKENIZER_FLAG = "--t5_tokenizer"
T5_MAX_LENGTH = 512

_T5_PREFIXES = ("text_encoders.t5xxl.transformer.", "t5xxl.transformer.")


# ---- T5 ----------------------------------------------------------------------------------------
def infer_t5_config(sd: dict[str, torch.Tensor], source: str = "--text_encoder1") -> dict:
    """`T5Config` kwargs from HF-layout T5 encoder weights.

    Heads come from the relative-attention bias table (buckets x heads); real T5-XXL v1.1:
    d_model 4096, 24 layers, 64 heads of 64, d_ff 10240, gated-gelu, vocab 32128.
    """
    bias_key = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    emb = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))
    if emb is None or bias_key not in sd:
        shown = ", ".join(list(sd)[:3]) or "no keys"
        raise CheckpointError(
            f"{source}: not a T5 encoder in Hugging Face layout (first keys: {shown}); "
            "expected t5xxl_fp16.safetensors"
        )
    buckets, heads = sd[bias_key].shape
    inner = sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    ff_key = "encoder.block.0.layer.1.DenseReluDense." + ("wi_0.weight" if gated else "wi.weight")
    return t5_encoder_config(
        vocab_size=int(emb.shape[0]), d_model=int(emb.shape[1]), d_kv=int(inner // heads),
        d_ff=int(sd[ff_key].shape[0]), num_layers=count_numbered(sd, r"encoder\.block\.(\d+)\."), num_heads=int(heads),
        buckets=int(buckets), gated=gated,
    )


def t5_encoder_config(*, vocab_size: int, d_model: int, d_kv: int, d_ff: int, num_layers: int, num_heads: int,
                      buckets: int = 32, gated: bool = True) -> dict:
    """`T5Config` kwargs of an encoder-only T5 (what FLUX uses); the fixed values are T5 v1.1's."""
    return {
        "vocab_size": vocab_size,
        "d_model": d_model,
        "d_kv": d_kv,
        "d_ff": d_ff,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "relative_attention_num_buckets": buckets,
        "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu" if gated else "relu",
        "layer_norm_epsilon": 1e-6,
        "dropout_rate": 0.0,
        "is_encoder_decoder": False,
        "use_cache": False,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }


def build_t5(sd: dict[str, torch.Tensor], source: str = "--text_encoder1"):
    """`T5EncoderModel` from HF-layout weights (meta init, no random weights)."""
    from transformers import T5Config, T5EncoderModel

    sd = dict(sd)
    sd.setdefault("encoder.embed_tokens.weight", sd.get("shared.weight"))
    sd.setdefault("shared.weight", sd["encoder.embed_tokens.weight"])
    config = T5Config(**infer_t5_config(sd, source))
    model = model_from_state_dict(lambda: T5EncoderModel(config), sd,
                                  "--text_encoder1: the T5 weights do not fit a T5 encoder")
    model.tie_weights()
    return model


def load_t5xxl(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.bfloat16,
    fp8: bool = False,
):
    """Load T5-XXL from `t5xxl_fp16.safetensors` (ComfyUI layout) as a frozen, eval `T5EncoderModel`.

    fp8=True stores Linear weights as float8 via `musubi_tuner.memory.fp8` (embeddings, norms and the
    FFN output layers stay `dtype`).
    """
    sd = strip_prefix(_read_safetensors(path, "--text_encoder1"), _T5_PREFIXES)
    if "scaled_fp8" in sd:
        raise CheckpointError(
            "--text_encoder1: scaled-fp8 T5 files are not supported; "
            "use t5xxl_fp16.safetensors (add --fp8_t5 to save memory)"
        )
    if not fp8:
        return build_t5(_cast(sd, device, dtype), f"--text_encoder1 {path}").eval().requires_grad_(False)
    # Build and cast on the CPU, then move: full-precision weights never reach `device` (lower peak VRAM).
    model = build_t5(_cast(sd, "cpu", dtype), f"--text_encoder1 {path}").eval().requires_grad_(False)
    _cast_t5_to_fp8(model)
    return model.to(device=device)


def _cast_t5_to_fp8(model) -> None:
    from musubi_tuner.memory.fp8 import cast_linear_weights_to_fp8

    # `wo` stays in `dtype`: transformers' T5 FFN casts its activations to wo's weight dtype, which
    # would quantise them to fp8 (the reference patches that forward for the same reason).
    cast_linear_weights_to_fp8(model, skip_patterns=(r"DenseReluDense\.wo$",))


# ---- tokenizers and prompt encoding ------------------------------------------------------------
def load_flux_tokenizers(t5_tokenizer: str | None = None, clip_tokenizer: str | None = None) -> tuple[Any, Any]:
    """(T5 tokenizer, CLIP tokenizer) from local folders, or the hub ids when the flags are unset."""
    from musubi_tuner.models.tokenizers import resolve_tokenizer

    t5 = resolve_tokenizer(T5_TOKENIZER_FLAG, t5_tokenizer, T5_TOKENIZER_HUB_ID, None)
    clip = resolve_tokenizer(CLIP_TOKENIZER_FLAG, clip_tokenizer, CLIP_TOKENIZER_HUB_ID, None)
    return t5, clip


def _tokens(tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
    return tokenizer(prompts, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")[
        "input_ids"
    ]


@torch.no_grad()
def encode_prompts_flux(
    t5, t5_tokenizer, clip, clip_tokenizer, prompts: list[str], max_length: int = T5_MAX_LENGTH
) -> list[dict[str, torch.Tensor]]:
    """One dict per prompt: `t5_vec` (max_length, d_model) and `clip_l_pooler` (hidden,), on CPU."""
    t5_ids = _tokens(t5_tokenizer, prompts, max_length).to(t5.device)
    t5_vec = t5(input_ids=t5_ids, attention_mask=None).last_hidden_state
    if torch.isnan(t5_vec).any():
        raise UserError("T5 produced NaN values; run T5 in bf16/fp32 (without --fp8_t5) to check the weights")
    clip_ids = clip_input_ids(clip_tokenizer, prompts)["input_ids"].to(clip.device)
    pooled = clip(input_ids=clip_ids).pooler_output
    return [{"t5_vec": v.cpu(), "clip_l_pooler": p.cpu()} for v, p in zip(t5_vec, pooled)]
