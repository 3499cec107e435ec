"""FramePack forward: equals diffusers' forward where diffusers accepts the inputs; absent history, per-sample
index layouts, RoPE scaling and the guidance convention as the reference's packed model."""

import inspect

import pytest
import torch

from musubi_tuner.architectures.framepack.packed_forward import (
    GUIDANCE_EMBED_SCALE,
    embedded_guidance,
    packed_forward,
    rope_table,
)
from musubi_tuner.architectures.framepack.tiny import TINY_FRAMEPACK_CONFIG, tiny_framepack_dit

H = W = 8  # latent pixels -> a 4x4 token grid; the 4x history pads to 8x8 -> one token per frame


@pytest.fixture(scope="module")
def dit():
    return tiny_framepack_dit(seed=1)


def _inputs(batch: int = 1, seed: int = 0, text_lengths=(5,)):
    g = torch.Generator().manual_seed(seed)
    c = TINY_FRAMEPACK_CONFIG
    text_len = 7
    mask = torch.zeros(batch, text_len, dtype=torch.long)
    for i in range(batch):
        mask[i, : text_lengths[i % len(text_lengths)]] = 1
    return {
        "hidden_states": torch.randn(batch, 16, 3, H, W, generator=g),
        "timestep": torch.tensor([700.0, 300.0, 500.0][:batch]),
        "encoder_hidden_states": torch.randn(batch, text_len, c["text_embed_dim"], generator=g),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(batch, c["pooled_projection_dim"], generator=g),
        "image_embeddings": torch.randn(batch, 4, c["image_proj_dim"], generator=g),
        "guidance": embedded_guidance(10.0, batch),
        "latents_clean": torch.randn(batch, 16, 2, H, W, generator=g),
        "latents_clean_2x": torch.randn(batch, 16, 2, H, W, generator=g),
        "latents_clean_4x": torch.randn(batch, 16, 4, H, W, generator=g),
    }


INDICES = {
    "latent_indices": torch.tensor([1, 2, 3]),
    "clean_latent_indices": torch.tensor([0, 4]),
    "clean_latent_2x_indices": torch.tensor([5, 6]),
    "clean_latent_4x_indices": torch.tensor([7, 8, 9, 10]),
}


def _diffusers(dit, x, idx):
    return dit(hidden_states=x["hidden_states"], timestep=x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
               encoder_attention_mask=x["encoder_attention_mask"], pooled_projections=x["pooled_projections"],
               image_embeds=x["image_embeddings"], indices_latents=idx["latent_indices"], guidance=x["guidance"],
               latents_clean=x["latents_clean"], indices_latents_clean=idx["clean_latent_indices"],
               latents_history_2x=x["latents_clean_2x"], indices_latents_history_2x=idx["clean_latent_2x_indices"],
               latents_history_4x=x["latents_clean_4x"], indices_latents_history_4x=idx["clean_latent_4x_indices"],
               return_dict=False)[0]


@torch.no_grad()
@pytest.mark.parametrize("batch", [1, 2])
def test_equals_diffusers_forward_exactly(dit, batch):
    x = _inputs(batch, text_lengths=(5, 3))
    ours = packed_forward(dit, **x, **INDICES)
    theirs = _diffusers(dit, x, INDICES)
    assert ours.dtype == torch.float32 and ours.shape == x["hidden_states"].shape
    assert torch.equal(ours, theirs)


@torch.no_grad()
def test_rope_table_is_diffusers_table_and_scaling_scales_height_width_positions(dit):
    frames = torch.tensor([0.0, 3.0, 7.0])
    cos, sin = rope_table(dit, frames, 4, 4)
    ref_cos, ref_sin = dit.rope(frame_indices=frames, height=8, width=8, device=torch.device("cpu"))
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    half_cos, _ = rope_table(dit, frames, 4, 4, hw_scale=0.5)
    grid = cos.reshape(3, 4, 4, -1)
    half = half_cos.reshape(3, 4, 4, -1)
    t_dim = TINY_FRAMEPACK_CONFIG["rope_axes_dim"][0]
    assert torch.equal(half[:, 2, 2], grid[:, 1, 1])  # positions (2, 2) x 0.5 = (1, 1)
    assert torch.equal(half[..., :t_dim], grid[..., :t_dim])  # the frame axis is not scaled
    assert not torch.equal(half, grid)


class _HideKeys:
    """Wraps an attention processor so that the first `n` image tokens are never attended to (keys masked)."""

    def __init__(self, inner, n):
        self.inner, self.n = inner, n

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        total = hidden_states.shape[1] + encoder_hidden_states.shape[1]
        mask = torch.ones(hidden_states.shape[0], 1, 1, total, dtype=torch.bool)
        mask[..., : self.n] = False
        return self.inner(attn, hidden_states, encoder_hidden_states, mask, image_rotary_emb)


@torch.no_grad()
def test_absent_2x_4x_history_is_those_tokens_absent(dit):
    """Oracle: diffusers' forward with the 2x/4x tokens present but hidden as attention keys gives the same
    prediction as running without them (the reference's one-frame / no_2x / no_4x input)."""
    x = _inputs(1)
    ours = packed_forward(dit, **{**x, "latents_clean_2x": None, "latents_clean_4x": None},
                          **{**INDICES, "clean_latent_2x_indices": None, "clean_latent_4x_indices": None})
    n_4x, n_2x = 4 // 4 * 1 * 1, 2 // 2 * 2 * 2  # 4x: 1 frame of 1x1 tokens; 2x: 1 frame of 2x2 tokens
    blocks = [*dit.transformer_blocks, *dit.single_transformer_blocks]
    saved = [b.attn.processor for b in blocks]
    try:
        for b in blocks:
            b.attn.processor = _HideKeys(b.attn.processor, n_4x + n_2x)
        theirs = _diffusers(dit, x, INDICES)
    finally:
        for b, p in zip(blocks, saved):
            b.attn.processor = p
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5), (ours - theirs).abs().max()
    full = packed_forward(dit, **x, **INDICES)
    assert not torch.allclose(ours, full, atol=1e-3)  # the history does matter when present


@torch.no_grad()
def test_no_history_at_all_runs_and_halves_must_come_together(dit):
    x = {k: v for k, v in _inputs(1).items() if not k.startswith("latents_clean")}
    out = packed_forward(dit, **x, latent_indices=INDICES["latent_indices"])
    assert out.shape == x["hidden_states"].shape
    with pytest.raises(ValueError, match="latents_clean and clean_latent_indices"):
        packed_forward(dit, **x, latent_indices=None, latents_clean=torch.zeros(1, 16, 1, H, W))


@torch.no_grad()
def test_per_sample_index_layouts_equal_single_sample_runs(dit):
    x = _inputs(3, text_lengths=(5, 3, 4))
    other = {"latent_indices": torch.tensor([0, 1, 2]), "clean_latent_indices": torch.tensor([3, 9]),
             "clean_latent_2x_indices": torch.tensor([4, 5]), "clean_latent_4x_indices": torch.tensor([6, 7, 8, 10])}
    layouts = (INDICES, other, INDICES)  # samples 0 and 2 share a forward; the result keeps the batch order
    stacked = {k: torch.stack([layout[k] for layout in layouts]) for k in INDICES}
    batched = packed_forward(dit, **x, **stacked)
    pair = packed_forward(dit, **{k: v[[0, 2]] for k, v in x.items()}, **INDICES)
    assert torch.equal(batched[[0, 2]], pair)
    assert torch.equal(batched[1:2], packed_forward(dit, **{k: v[1:2] for k, v in x.items()}, **other))
    # equal rows are one batched forward: the same as the 1-D indices
    same = {k: torch.stack([v, v, v]) for k, v in INDICES.items()}
    assert torch.equal(packed_forward(dit, **x, **same), packed_forward(dit, **x, **INDICES))


@torch.no_grad()
def test_rope_scaling_applies_from_the_threshold_per_sample(dit):
    x = _inputs(2, text_lengths=(5, 5))
    x["timestep"] = torch.tensor([900.0, 700.0])
    plain = packed_forward(dit, **x, **INDICES)
    scaled = packed_forward(dit, **x, **INDICES, rope_scaling=(0.5, 800))
    # the two samples now differ in RoPE, so each runs alone: compare with batch-1 runs
    first, second = ({k: v[i : i + 1] for k, v in x.items()} for i in (0, 1))
    assert torch.equal(scaled[1:], packed_forward(dit, **second, **INDICES))  # 700 < 800: unscaled
    assert torch.equal(scaled[:1], packed_forward(dit, **first, **INDICES, rope_scaling=(0.5, 800)))
    assert not torch.allclose(scaled[:1], packed_forward(dit, **first, **INDICES), atol=1e-4)
    assert torch.equal(packed_forward(dit, **x, **INDICES, rope_scaling=(0.5, None)), plain)  # disabled


def test_guidance_is_the_embedded_scale_times_1000_as_diffusers_pipeline():
    from diffusers import HunyuanVideoFramepackPipeline

    assert torch.equal(embedded_guidance(10.0, 2), torch.tensor([10000.0, 10000.0]))
    assert GUIDANCE_EMBED_SCALE == 1000.0
    assert "* 1000.0" in inspect.getsource(HunyuanVideoFramepackPipeline.__call__)


def test_gradient_checkpointing_gives_the_same_prediction_and_gradients(dit):
    x = _inputs(2, text_lengths=(5, 3))
    dit.train()
    try:
        out = packed_forward(dit, **x, **INDICES)
        out.square().mean().backward()
        grad = dit.proj_out.weight.grad.clone()
        dit.zero_grad()
        dit.enable_gradient_checkpointing()
        out_gc = packed_forward(dit, **x, **INDICES)
        out_gc.square().mean().backward()
        assert torch.allclose(out, out_gc, atol=1e-6)
        assert torch.allclose(grad, dit.proj_out.weight.grad, atol=1e-6)
    finally:
        dit.disable_gradient_checkpointing()
        dit.zero_grad(set_to_none=True)
        dit.eval().requires_grad_(True)
