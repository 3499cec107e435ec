"""The FramePack DiT forward as the reference drives its packed model, on diffusers' own modules.

diffusers' `HunyuanVideoFramepackTransformer3DModel.forward` needs the 2x and 4x history (None fails) and takes only
1-D frame indices shared by the whole batch. The reference's packed model accepts None for the clean, 2x and 4x
history (those tokens are simply absent: one-frame training, `no_2x`/`no_4x`), per-sample (B, T) indices, and
its `--rope_scaling_factor`/`--rope_scaling_timestep_threshold` hook. `packed_forward` gives all of that while
calling diffusers' embedders, blocks and output layers unchanged, so weights, LoRA names, attention backends,
block swap and gradient checkpointing are the diffusers model's.

Token order is the reference's and diffusers': [4x history, 2x history, clean history, noisy latents], each with
its RoPE table; the 2x/4x tables are the full-resolution tables averaged over 2x2x2 / 4x4x4 cells. diffusers'
attention applies one RoPE table to every sample, so a batch whose samples have different index layouts (or
different RoPE scaling) runs one group of equal layouts at a time; each group is an ordinary batched forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["packed_forward", "embedded_guidance", "GUIDANCE_EMBED_SCALE", "rope_table"]

GUIDANCE_EMBED_SCALE = 1000.0
"""The guidance embedder's input is the distilled CFG scale x1000, in the reference's generation AND training
(`args.guidance_scale * 1000.0`) and in diffusers' FramePack pipeline; the embedder itself does not scale."""

_HISTORY = (("latents_clean", "clean_latent_indices", 1), ("latents_clean_2x", "clean_latent_2x_indices", 2),
            ("latents_clean_4x", "clean_latent_4x_indices", 4))


def embedded_guidance(scale: float, batch_size: int, *, device=None, dtype=None) -> torch.Tensor:
    """The `guidance` input for an embedded (distilled) CFG `scale`: (batch_size,) of scale x1000."""
    return torch.full((batch_size,), float(scale) * GUIDANCE_EMBED_SCALE, device=device, dtype=dtype)


def rope_table(dit: nn.Module, frame_indices: torch.Tensor, height: int, width: int, *, hw_scale: float = 1.0,
               device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (T*height*width, head_dim), for 1-D `frame_indices` on a `height` x `width` token grid.

    The same table as diffusers' `HunyuanVideoFramepackRotaryPosEmbed` (which takes pixel-latent sizes and has no
    scaling); `hw_scale` multiplies the height/width positions as the reference's `h_w_scaling_factor`.
    """
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    device = device or frame_indices.device
    grid = torch.meshgrid(frame_indices.to(device=device, dtype=torch.float32),
                          torch.arange(0, height, device=device, dtype=torch.float32) * hw_scale,
                          torch.arange(0, width, device=device, dtype=torch.float32) * hw_scale, indexing="ij")
    dims, theta = dit.config.rope_axes_dim, dit.config.rope_theta
    tables = [get_1d_rotary_pos_embed(dims[i], grid[i].reshape(-1), theta, use_real=True) for i in range(3)]
    return torch.cat([t[0] for t in tables], dim=1), torch.cat([t[1] for t in tables], dim=1)


@dataclass(frozen=True)
class _Layout:
    """What must be equal for samples to share one forward: their index rows and RoPE h/w scale."""

    rows: tuple[tuple[float, ...] | None, ...]
    hw_scale: float


def _index_rows(indices: torch.Tensor | None, batch: int, name: str) -> list[torch.Tensor | None]:
    """(T,), (1, T) or (B, T) indices -> one 1-D row per sample (None stays None)."""
    if indices is None:
        return [None] * batch
    if indices.ndim == 1:
        return [indices] * batch
    if indices.ndim != 2 or indices.shape[0] not in (1, batch):
        raise ValueError(f"{name}: expected (T,) or (B, T) frame indices for batch {batch}, got {tuple(indices.shape)}")
    return [indices[0]] * batch if indices.shape[0] == 1 else list(indices.unbind(0))


def _hw_scales(steps: torch.Tensor, rope_scaling: tuple[float, float] | None) -> list[float]:
    """Per-sample RoPE h/w scale: `factor` where the timestep (0..1000) is >= `threshold`, as the reference."""
    if rope_scaling is None:
        return [1.0] * len(steps)
    factor, threshold = rope_scaling
    if threshold is None or not factor > 0:  # the reference disables scaling in both cases
        return [1.0] * len(steps)
    return [float(factor) if float(t) >= threshold else 1.0 for t in steps.tolist()]


def _groups(layouts: Sequence[_Layout]) -> list[list[int]]:
    """Sample positions grouped by equal layout, in order of first appearance."""
    order: dict[_Layout, list[int]] = {}
    for i, layout in enumerate(layouts):
        order.setdefault(layout, []).append(i)
    return list(order.values())


def packed_forward(dit: nn.Module, *, hidden_states: torch.Tensor, timestep: torch.Tensor,
                   encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor,
                   pooled_projections: torch.Tensor, image_embeddings: torch.Tensor,
                   latent_indices: torch.Tensor | None,
                   latents_clean: torch.Tensor | None = None, clean_latent_indices: torch.Tensor | None = None,
                   latents_clean_2x: torch.Tensor | None = None, clean_latent_2x_indices: torch.Tensor | None = None,
                   latents_clean_4x: torch.Tensor | None = None, clean_latent_4x_indices: torch.Tensor | None = None,
                   guidance: torch.Tensor | None = None,
                   rope_scaling: tuple[float, float] | None = None) -> torch.Tensor:
    """The velocity prediction for `hidden_states` (B, C, T, H, W), in float32 (the reference computes the output
    projection in float32 for quality).

    `timestep` (B,) on the 0..1000 scale; `guidance` (B,) = embedded CFG x1000 (`embedded_guidance`), needed by
    guidance-distilled weights; `image_embeddings` (B, tokens, image_proj_dim) from SigLIP. Each history input
    and its indices come together or not at all (None = those tokens absent). Indices are (T,) for the whole batch
    or (B, T) per sample; `latent_indices=None` means 0..T-1. `rope_scaling=(factor, threshold)`: scale the RoPE
    height/width positions by `factor` for samples whose timestep >= `threshold` (the reference's
    `--rope_scaling_factor` / `--rope_scaling_timestep_threshold`).
    """
    batch, frames = hidden_states.shape[0], hidden_states.shape[2]
    history = {"latents_clean": latents_clean, "latents_clean_2x": latents_clean_2x,
               "latents_clean_4x": latents_clean_4x}
    indices = {"clean_latent_indices": clean_latent_indices, "clean_latent_2x_indices": clean_latent_2x_indices,
               "clean_latent_4x_indices": clean_latent_4x_indices}
    for latent_name, index_name, _ in _HISTORY:
        if (history[latent_name] is None) != (indices[index_name] is None):
            raise ValueError(f"packed_forward: {latent_name} and {index_name} go together (both or neither)")
    if guidance is None and dit.config.guidance_embeds:
        raise ValueError("packed_forward: this DiT embeds the distilled guidance; pass guidance=embedded_guidance(...)")
    if latent_indices is None:
        latent_indices = torch.arange(frames, device=hidden_states.device)
    rows = [_index_rows(latent_indices, batch, "latent_indices")]
    rows += [_index_rows(indices[index_name], batch, index_name) for _, index_name, _ in _HISTORY]
    steps = timestep.reshape(-1).expand(batch) if timestep.numel() == 1 else timestep.reshape(-1)
    scales = _hw_scales(steps, rope_scaling)
    layouts = [_Layout(tuple(None if r[i] is None else tuple(r[i].tolist()) for r in rows), scales[i])
               for i in range(batch)]

    per_sample_guidance = None if guidance is None else guidance.reshape(-1).expand(batch)

    def run(picked: list[int] | None) -> torch.Tensor:
        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None or picked is None else t[picked]

        first = 0 if picked is None else picked[0]
        return _shared_layout_forward(
            dit, hidden_states=take(hidden_states), timestep=take(steps),
            encoder_hidden_states=take(encoder_hidden_states), encoder_attention_mask=take(encoder_attention_mask),
            pooled_projections=take(pooled_projections), image_embeddings=take(image_embeddings),
            guidance=take(per_sample_guidance), latent_indices=rows[0][first],
            history=[(take(history[latent_name]), rows[k + 1][first], factor)
                     for k, (latent_name, _, factor) in enumerate(_HISTORY)],
            hw_scale=scales[first])

    groups = _groups(layouts)
    if len(groups) == 1:
        return run(None)
    parts = torch.cat([run(picked) for picked in groups])
    order = torch.tensor([i for picked in groups for i in picked], device=parts.device)
    return parts[torch.argsort(order)]  # back to the batch order


def _shared_layout_forward(dit: nn.Module, *, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                           pooled_projections, image_embeddings, guidance, latent_indices, history, hw_scale):
    """diffusers' FramePack forward for a batch sharing one index layout, with absent history allowed.

    `history` lists (latents or None, 1-D indices, downsampling factor) for clean, 2x, 4x.
    """
    batch, _, frames, height, width = hidden_states.shape
    p, p_t = dit.config.patch_size, dit.config.patch_size_t
    grid_t, grid_h, grid_w = frames // p_t, height // p, width // p
    device = hidden_states.device

    tokens = dit.x_embedder(hidden_states)
    cos, sin = rope_table(dit, latent_indices, grid_h, grid_w, hw_scale=hw_scale, device=device)
    # the history in the noisy latents' dtype, as the reference (`clean_latents.to(hidden_states)`)
    clean, clean_2x, clean_4x = dit.clean_x_embedder(
        *(None if latents is None else latents.to(hidden_states.dtype) for latents, _, _ in history))
    for embedded, (_, indices, factor) in zip((clean, clean_2x, clean_4x), history):
        if embedded is None:
            continue
        table = rope_table(dit, indices, grid_h, grid_w, hw_scale=hw_scale, device=device)
        if factor > 1:  # the table of the full-resolution grid, averaged over each factor^3 cell
            table = dit._pad_rotary_emb(table, grid_h, grid_w, (factor, factor, factor))
        tokens = torch.cat([embedded.to(tokens.dtype), tokens], dim=1)
        cos, sin = torch.cat([table[0], cos], dim=0), torch.cat([table[1], sin], dim=0)
    rotary = (cos, sin)

    temb, _ = dit.time_text_embed(timestep, pooled_projections, guidance)
    text = dit.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask)
    image = dit.image_projection(image_embeddings)
    # image tokens go before the text so that the text padding stays at the end (as both implementations)
    context = torch.cat([image.to(text.dtype), text], dim=1)
    context_mask = torch.cat([encoder_attention_mask.new_ones((batch, image.shape[1])), encoder_attention_mask], dim=1)

    if batch == 1:  # cropping the padding is the same as masking it, and cheaper
        context = context[:, : int(context_mask.sum())]
        attention_mask = None
    else:
        keep = torch.cat([context_mask.new_ones((batch, tokens.shape[1])), context_mask], dim=1).bool()
        attention_mask = keep[:, None, None, :]

    checkpointing = torch.is_grad_enabled() and dit.gradient_checkpointing
    for block in (*dit.transformer_blocks, *dit.single_transformer_blocks):
        if checkpointing:
            tokens, context = dit._gradient_checkpointing_func(block, tokens, context, temb, attention_mask, rotary)
        else:
            tokens, context = block(tokens, context, temb, attention_mask, rotary)

    tokens = dit.norm_out(tokens[:, -grid_t * grid_h * grid_w:], temb)
    out = _float32_projection(dit.proj_out, tokens)
    out = out.reshape(batch, grid_t, grid_h, grid_w, -1, p_t, p, p)
    return out.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def _float32_projection(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`linear(x)` computed in float32 (the reference's `high_quality_fp32_output_for_inference`); a wrapped layer
    (fp8 storage) runs as it is and its output is upcast."""
    if type(linear) is nn.Linear:
        bias = None if linear.bias is None else linear.bias.float()
        return F.linear(x.float(), linear.weight.float(), bias)
    return linear(x).float()
