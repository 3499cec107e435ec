"""HunyuanVideo's text encoder 1 (the LLaMA-3-8B text tower of LLaVA-LLaMA-3) as a transformers `LlamaModel`.

Files users have (all reduced to `LlamaModel` keys `embed_tokens.weight`, `layers.N.*`, `norm.weight`):
- ComfyUI `llava_llama3_fp16.safetensors`: `LlamaForCausalLM` keys (`model.layers.N...`, `lm_head.weight`),
  sometimes a `tokenizer` entry; 128320 embedding rows (the tokenizer has 128259 ids);
- whole LLaVA checkpoints (`model.language_model.*` or `language_model.model.*` beside a vision tower);
- the official `text_encoder` folder (config.json + safetensors shards, `LlamaForCausalLM` keys) or a
  diffusers one (`LlamaModel` keys).
Only the text tower is kept: `lm_head`, the vision tower and the projector are dropped.

The sizes come from the weights; what they cannot say (heads, RoPE base) comes from the folder's
config.json or, for a single file, LLaMA-3-8B's values (128-wide heads, RoPE base 500000).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from musubi_tuner.errors import CheckpointError
from musubi_tuner.models.checkpoint_io import count_numbered, load_state_dict, model_from_state_dict

LLM_FLAG = "--text_encoder1"
_EMBED_KEY = "embed_tokens.weight"
_NOT_TEXT = ("lm_head.", "vision_tower.", "vision_model.", "multi_modal_projector.", "image_newline")
_LLAMA3_DEFAULTS = {
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192,
    "hidden_act": "silu",
}
"""LLaMA-3-8B values a single file does not carry (the reference embeds the same config)."""
_CONFIG_KEYS = ("num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta", "rope_scaling",
                "rope_parameters", "rms_norm_eps", "max_position_embeddings", "hidden_act", "attention_bias",
                "mlp_bias")


def llama_text_weights(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Any of the layouts above -> `LlamaModel` keys; non-text parts dropped."""
    embed = [k for k in sd if k.endswith(_EMBED_KEY) and not any(p in k for p in _NOT_TEXT)]
    if len(embed) != 1:
        shown = ", ".join(list(sd)[:3]) or "no keys"
        raise CheckpointError(f"{source}: not a LLaMA text encoder (no single `embed_tokens.weight`; first keys: "
                              f"{shown}); expected llava_llama3_fp16.safetensors or the text_encoder folder")
    prefix = embed[0][: -len(_EMBED_KEY)]
    return {k[len(prefix):]: v for k, v in sd.items()
            if k.startswith(prefix) and not any(p in k for p in _NOT_TEXT)}


def _head_dim(q_out: int, kv_out: int) -> int:
    """Not in the weights. LLaMA-3 uses 128-wide heads; widths that are not multiples of 128 (the tiny
    preset) use 16-wide heads."""
    return 128 if q_out % 128 == 0 and kv_out % 128 == 0 else 16


def infer_llama_config(sd: dict[str, torch.Tensor], source: str = LLM_FLAG, config: dict | None = None) -> dict:
    """`LlamaConfig` kwargs: shapes from the weights (`LlamaModel` keys), the rest from `config` (a folder's
    config.json) or LLaMA-3-8B's values. Real: hidden 4096, 32 layers, 32 heads (8 KV) of 128, MLP 14336."""
    if _EMBED_KEY not in sd or "layers.0.self_attn.q_proj.weight" not in sd:
        raise CheckpointError(f"{source}: not a LLaMA text encoder (missing embed_tokens / layers.0 weights)")
    vocab, hidden = sd[_EMBED_KEY].shape
    q_out = int(sd["layers.0.self_attn.q_proj.weight"].shape[0])
    kv_out = int(sd["layers.0.self_attn.k_proj.weight"].shape[0])
    head_dim = _head_dim(q_out, kv_out)
    inferred = {
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(sd["layers.0.mlp.gate_proj.weight"].shape[0]),
        "num_hidden_layers": count_numbered(sd, r"layers\.(\d+)\."),
        "num_attention_heads": q_out // head_dim,
        "num_key_value_heads": kv_out // head_dim,
        "head_dim": head_dim,
        "attention_bias": "layers.0.self_attn.q_proj.bias" in sd,
        "mlp_bias": "layers.0.mlp.gate_proj.bias" in sd,
        "tie_word_embeddings": False,
        "use_cache": False,
        **_LLAMA3_DEFAULTS,
    }
    config = (config or {}).get("text_config", config or {})  # a LLaVA config nests the LLaMA one
    inferred.update({k: config[k] for k in _CONFIG_KEYS if config.get(k) is not None})
    if inferred["num_attention_heads"] * inferred.get("head_dim", head_dim) != q_out:
        raise CheckpointError(f"{source}: config.json's heads do not fit the q_proj weight ({q_out} rows)")
    return inferred


def build_llama(sd: dict[str, torch.Tensor], source: str = LLM_FLAG, config: dict | None = None):
    """`LlamaModel` from `LlamaModel`-key weights (meta init: no random weights are made)."""
    from transformers import LlamaConfig, LlamaModel

    llama_config = LlamaConfig(**infer_llama_config(sd, source, config))
    model = model_from_state_dict(lambda: LlamaModel(llama_config), sd,
                                  f"{source}: the weights do not fit a LLaMA model")
    # Non-persistent RoPE buffers are not in the file; rebuild them off the meta device.
    with torch.device(sd[_EMBED_KEY].device):
        model.rotary_emb = type(model.rotary_emb)(config=llama_config)
    return model


def read_llm_weights(path: str | os.PathLike, dtype: torch.dtype | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json or {}, `LlamaModel`-key weights on the CPU) from a single file or a model folder."""
    from musubi_tuner.models.hf_folder import read_model_folder

    source = f"{LLM_FLAG} {path}"
    if Path(path).is_dir():
        config, sd = read_model_folder(path, LLM_FLAG, dtype=dtype)
    else:
        config, sd = {}, load_state_dict(path, dtype=dtype, flag=LLM_FLAG)
    return config, llama_text_weights(sd, source)


def load_llava_llama3(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float16,
    fp8: bool = False,
):
    """Text encoder 1 as a frozen, eval `LlamaModel` in `dtype`.

    fp8 (`--fp8_llm`): every Linear weight of the decoder layers stored as float8_e4m3fn and upcast to
    `dtype` per call (`musubi_tuner.memory.fp8`); embeddings and norms stay `dtype`. The cast happens on
    the CPU, so full-precision weights never reach `device`.
    """
    config, sd = read_llm_weights(path, dtype)
    model = build_llama(sd, f"{LLM_FLAG} {path}", config).eval().requires_grad_(False)
    if fp8:
        from musubi_tuner.memory.fp8 import cast_linear_weights_to_fp8

        cast_linear_weights_to_fp8(model)
    return model.to(device=device)
