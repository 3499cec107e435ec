"""Wan DiT module names: diffusers `WanTransformer3DModel` paths <-> the original (Wan-AI / ComfyUI) paths.

One table drives both directions. It works on module paths (`blocks.0.attn1.to_q`) and on state-dict
keys (`blocks.0.attn1.to_q.weight`, or `...to_q.lora_A.weight`): whatever follows the module path is
carried over unchanged. It is the exact inverse of diffusers' `convert_wan_transformer_to_diffusers`
(tested key by key at the published sizes), including its norm2/norm3 swap: the original block applies
norm1 -> self-attn, norm3 -> cross-attn, norm2 -> FFN; diffusers numbers them in call order.
"""

from __future__ import annotations

import re

# (diffusers path, original path); `{n}` is a block index.
DIT_NAME_PAIRS: tuple[tuple[str, str], ...] = (
    ("patch_embedding", "patch_embedding"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos"),
    ("blocks.{n}.scale_shift_table", "blocks.{n}.modulation"),
    ("blocks.{n}.norm1", "blocks.{n}.norm1"),
    ("blocks.{n}.attn1.to_q", "blocks.{n}.self_attn.q"),
    ("blocks.{n}.attn1.to_k", "blocks.{n}.self_attn.k"),
    ("blocks.{n}.attn1.to_v", "blocks.{n}.self_attn.v"),
    ("blocks.{n}.attn1.to_out.0", "blocks.{n}.self_attn.o"),
    ("blocks.{n}.attn1.norm_q", "blocks.{n}.self_attn.norm_q"),
    ("blocks.{n}.attn1.norm_k", "blocks.{n}.self_attn.norm_k"),
    ("blocks.{n}.norm2", "blocks.{n}.norm3"),
    ("blocks.{n}.attn2.to_q", "blocks.{n}.cross_attn.q"),
    ("blocks.{n}.attn2.to_k", "blocks.{n}.cross_attn.k"),
    ("blocks.{n}.attn2.to_v", "blocks.{n}.cross_attn.v"),
    ("blocks.{n}.attn2.to_out.0", "blocks.{n}.cross_attn.o"),
    ("blocks.{n}.attn2.norm_q", "blocks.{n}.cross_attn.norm_q"),
    ("blocks.{n}.attn2.norm_k", "blocks.{n}.cross_attn.norm_k"),
    ("blocks.{n}.attn2.add_k_proj", "blocks.{n}.cross_attn.k_img"),
    ("blocks.{n}.attn2.add_v_proj", "blocks.{n}.cross_attn.v_img"),
    ("blocks.{n}.attn2.norm_added_k", "blocks.{n}.cross_attn.norm_k_img"),
    ("blocks.{n}.norm3", "blocks.{n}.norm2"),
    ("blocks.{n}.ffn.net.0.proj", "blocks.{n}.ffn.0"),
    ("blocks.{n}.ffn.net.2", "blocks.{n}.ffn.2"),
    ("norm_out", "head.norm"),
    ("proj_out", "head.head"),
    ("scale_shift_table", "head.modulation"),
)


def _compile(from_index: int) -> list[tuple[re.Pattern[str], str]]:
    rules = []
    for pair in DIT_NAME_PAIRS:
        source, target = pair[from_index], pair[1 - from_index]
        pattern = re.escape(source).replace(re.escape("{n}"), r"(?P<n>\d+)")
        rules.append((re.compile(rf"{pattern}(?P<rest>\..+)?"), target))
    # Longest first, so a specific path is never taken by a shorter one that happens to prefix it.
    rules.sort(key=lambda rule: -len(rule[0].pattern))
    return rules


_TO_ORIGINAL = _compile(0)
_TO_DIFFUSERS = _compile(1)


def _rename(path: str, rules: list[tuple[re.Pattern[str], str]], direction: str) -> str:
    for pattern, target in rules:
        match = pattern.fullmatch(path)
        if match:
            name = target.replace("{n}", match.groupdict().get("n") or "")
            return name + (match["rest"] or "")
    raise ValueError(f"no {direction} Wan DiT name for {path!r}")


def original_module_name(diffusers_path: str) -> str:
    """`blocks.0.attn1.to_q` -> `blocks.0.self_attn.q` (keys with a suffix such as `.weight` work too)."""
    return _rename(diffusers_path, _TO_ORIGINAL, "original")


def diffusers_module_name(original_path: str) -> str:
    """`blocks.0.self_attn.q` -> `blocks.0.attn1.to_q`; the inverse of `original_module_name`."""
    return _rename(original_path, _TO_DIFFUSERS, "diffusers")
