"""Recognise what a checkpoint is from its keys, so a wrong file gets a message that names it.

Used by the DiT and VAE loaders (Wan, HunyuanVideo) when a file is not what the flag expects ("--dit got a VAE").
Only marker keys are checked; this is a hint for the error message, not a validator.
"""

from __future__ import annotations

from collections.abc import Iterable

# (marker keys that must all be present, human description); first match wins, most specific first.
_KINDS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("patch_embedding.weight", "head.modulation"), "a Wan DiT (original layout)"),
    (("patch_embedding.weight", "condition_embedder.time_proj.weight"), "a Wan DiT (diffusers layout)"),
    (("decoder.middle.0.residual.0.gamma",), "a Wan VAE (original layout)"),
    (("decoder.mid_block.resnets.0.norm1.gamma",), "a Wan VAE (diffusers layout)"),
    (("double_blocks.0.img_attn_qkv.weight",), "a HunyuanVideo DiT"),
    (("double_blocks.0.img_attn.qkv.weight",), "a FLUX.1 DiT"),
    (("single_transformer_blocks.0.attn.to_q.weight", "x_embedder.weight"), "a FLUX.1 DiT (diffusers layout)"),
    (("clean_x_embedder.proj.weight",), "a FramePack DiT"),
    (("transformer_blocks.0.attn.to_q.weight", "context_embedder.weight"),
     "a HunyuanVideo/FramePack DiT (diffusers layout)"),
    (("decoder.up_blocks.0.resnets.0.conv1.conv.weight",), "a HunyuanVideo VAE"),
    (("decoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight"), "a FLUX/SD image VAE (ae.safetensors)"),
    (("token_embedding.weight", "blocks.0.attn.q.weight"), "a Wan umT5 text encoder"),
    (("encoder.block.0.layer.0.SelfAttention.q.weight",), "a T5/umT5 text encoder"),
    (("text_model.embeddings.token_embedding.weight",), "a CLIP text encoder"),
    (("log_scale",), "a CLIP model (open-clip)"),
)


WRAPPER_PREFIXES = ("vae.", "first_stage_model.")
"""Prefixes some files put before every key of a VAE; stripped before the markers are checked."""


def describe_checkpoint(keys: Iterable[str]) -> str | None:
    """A short description of what the keys look like ("a Wan VAE (original layout)"), or None if unknown."""
    keys = set(keys)
    for wrapper in WRAPPER_PREFIXES:  # e.g. HunyuanVideo's official VAE .pt holds `vae.decoder...`
        if keys and all(k.startswith(wrapper) for k in keys):
            keys = {k[len(wrapper):] for k in keys}
    if any(".lora_down." in k or ".lora_A." in k or k.endswith(".alpha") for k in keys):
        return "a LoRA file (pass it with --network_weights / --lora_weight instead)"
    for markers, description in _KINDS:
        if all(m in keys for m in markers):
            return description
    if any(k.startswith("visual.") for k in keys):
        return "a CLIP image encoder"
    return None


def sample_keys(keys: Iterable[str], n: int = 3) -> str:
    """A few keys, for messages about files nothing else recognises."""
    return ", ".join(sorted(keys)[:n]) or "(no tensors)"
