"""HunyuanVideo DiT names: the official (Tencent) checkpoint's tensors <-> diffusers'
`HunyuanVideoTransformer3DModel`, as one table used for the weights in both directions and the LoRA names.

The official names are what users' files (`mp_rank_00_model_states.pt`, ComfyUI's
`hunyuan_video_t2v_720p_bf16.safetensors`) and the reference's LoRA keys use (`double_blocks.0.img_attn_qkv`,
`single_blocks.0.linear1`). A fused original Linear lists its diffusers parts in output-row order.
"""

from __future__ import annotations

from musubi_tuner.architectures.key_plan import KeyEntry, block_count, linear_entries

# (original module inside a double block, diffusers Linear(s) inside the same block)
DOUBLE_LINEARS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("img_mod.linear", ("norm1.linear",)),
    ("img_attn_qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("img_attn_proj", ("attn.to_out.0",)),
    ("img_mlp.fc1", ("ff.net.0.proj",)),
    ("img_mlp.fc2", ("ff.net.2",)),
    ("txt_mod.linear", ("norm1_context.linear",)),
    ("txt_attn_qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("txt_attn_proj", ("attn.to_add_out",)),
    ("txt_mlp.fc1", ("ff_context.net.0.proj",)),
    ("txt_mlp.fc2", ("ff_context.net.2",)),
)
DOUBLE_NORMS = (
    ("img_attn_q_norm.weight", "attn.norm_q.weight"),
    ("img_attn_k_norm.weight", "attn.norm_k.weight"),
    ("txt_attn_q_norm.weight", "attn.norm_added_q.weight"),
    ("txt_attn_k_norm.weight", "attn.norm_added_k.weight"),
)
# `linear1` = q, k, v and the MLP input; `linear2` = attention output and MLP output together.
SINGLE_LINEARS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    ("linear2", ("proj_out",)),
    ("modulation.linear", ("norm.linear",)),
)
SINGLE_NORMS = (("q_norm.weight", "attn.norm_q.weight"), ("k_norm.weight", "attn.norm_k.weight"))

# The text refiner (`txt_in`): not a LoRA target in the reference, converted like the rest.
_REFINER_LINEARS = (
    ("self_attn_qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("self_attn_proj", ("attn.to_out.0",)),
    ("mlp.fc1", ("ff.net.0.proj",)),
    ("mlp.fc2", ("ff.net.2",)),
    ("adaLN_modulation.1", ("norm_out.linear",)),
    ("norm1", ("norm1",)),  # affine LayerNorms: weight and bias, like a Linear
    ("norm2", ("norm2",)),
)
_EMBEDDERS = (
    ("img_in.proj", "x_embedder.proj"),
    ("time_in.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("txt_in.input_embedder", "context_embedder.proj_in"),
    ("txt_in.t_embedder.mlp.0", "context_embedder.time_text_embed.timestep_embedder.linear_1"),
    ("txt_in.t_embedder.mlp.2", "context_embedder.time_text_embed.timestep_embedder.linear_2"),
    ("txt_in.c_embedder.linear_1", "context_embedder.time_text_embed.text_embedder.linear_1"),
    ("txt_in.c_embedder.linear_2", "context_embedder.time_text_embed.text_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
)
_GUIDANCE_EMBEDDERS = (
    ("guidance_in.mlp.0", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.mlp.2", "time_text_embed.guidance_embedder.linear_2"),
)
# The official final modulation is (shift, scale); diffusers' AdaLayerNormContinuous expects (scale, shift).
_FINAL_MOD = ("final_layer.adaLN_modulation.1", "norm_out.linear")

REFINER_PREFIX = "txt_in.individual_token_refiner.blocks."
DIFFUSERS_REFINER_PREFIX = "context_embedder.token_refiner.refiner_blocks."


def conversion_plan(num_double: int, num_single: int, num_refiner: int, guidance: bool) -> list[KeyEntry]:
    """Every tensor of a HunyuanVideo DiT with these block counts, original <-> diffusers."""
    plan: list[KeyEntry] = []
    for original, dif in _EMBEDDERS + (_GUIDANCE_EMBEDDERS if guidance else ()):
        plan += linear_entries(original, (dif,))
    plan += linear_entries(_FINAL_MOD[0], (_FINAL_MOD[1],), swap=True)
    for i in range(num_refiner):
        b, d = f"{REFINER_PREFIX}{i}.", f"{DIFFUSERS_REFINER_PREFIX}{i}."
        for original, parts in _REFINER_LINEARS:
            plan += linear_entries(b + original, tuple(d + p for p in parts))
    for i in range(num_double):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for original, parts in DOUBLE_LINEARS:
            plan += linear_entries(b + original, tuple(d + p for p in parts))
        plan += [KeyEntry(b + original, (d + dif,)) for original, dif in DOUBLE_NORMS]
    for i in range(num_single):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for original, parts in SINGLE_LINEARS:
            plan += linear_entries(b + original, tuple(d + p for p in parts))
        plan += [KeyEntry(b + original, (d + dif,)) for original, dif in SINGLE_NORMS]
    return plan


def original_plan(keys) -> list[KeyEntry]:
    """The plan for an original-layout state dict, block counts read from its keys."""
    return conversion_plan(block_count(keys, "double_blocks."), block_count(keys, "single_blocks."),
                           block_count(keys, REFINER_PREFIX), "guidance_in.mlp.0.weight" in keys)


def diffusers_plan(keys) -> list[KeyEntry]:
    """The plan for a diffusers-layout state dict, block counts read from its keys."""
    return conversion_plan(block_count(keys, "transformer_blocks."), block_count(keys, "single_transformer_blocks."),
                           block_count(keys, DIFFUSERS_REFINER_PREFIX),
                           "time_text_embed.guidance_embedder.linear_1.weight" in keys)


def linear_parts_for(num_double: int, num_single: int) -> list[tuple[str, list[str]]]:
    """Every double/single-block Linear as (original module path, [diffusers Linear paths] in row order).

    Modulation layers are included (the caller applies the reference's default excludes).
    """
    out: list[tuple[str, list[str]]] = []
    for i in range(num_double):
        out += [(f"double_blocks.{i}.{o}", [f"transformer_blocks.{i}.{p}" for p in parts]) for o, parts in DOUBLE_LINEARS]
    for i in range(num_single):
        out += [(f"single_blocks.{i}.{o}", [f"single_transformer_blocks.{i}.{p}" for p in parts])
                for o, parts in SINGLE_LINEARS]
    return out
