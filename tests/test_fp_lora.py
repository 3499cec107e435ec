"""FramePack LoRA: the reference's target set and key names, a reference-named LoRA applied exactly, HunyuanVideo
(musubi and diffusion-pipe) and dotted FramePack LoRAs converted to the same weight deltas, and diffusers loading."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from musubi_tuner.architectures import get_architecture
from musubi_tuner.architectures.framepack.lora_conversion import (
    LORA_DEFAULT_EXCLUDES,
    framepack_lora_candidates,
    framepack_lora_from_any,
    framepack_lora_targets_for_conversion,
)
from musubi_tuner.architectures.framepack.packed_forward import embedded_guidance, packed_forward
from musubi_tuner.architectures.framepack.tiny import TINY_FRAMEPACK_CONFIG, tiny_framepack_dit
from musubi_tuner.architectures.hunyuan_video.tiny import tiny_hv_dit
from musubi_tuner.networks.lora import create_network_from_weights
from musubi_tuner.networks.lora_formats import NameIndex, convert_state_dict, parse_lora_state_dict, to_other
from musubi_tuner.networks.modules import resolve_network_module

from fused_lora_helpers import deltas, reference_lora

DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
          "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")


class _FramePackLoraSeams:
    """The two architecture seams the LoRA code asks for (the FramePack architecture class provides the same)."""

    name = "framepack"
    lora_default_excludes = LORA_DEFAULT_EXCLUDES

    def lora_candidates(self, dit):
        return framepack_lora_candidates(dit)


@pytest.fixture(scope="module")
def dit():
    return tiny_framepack_dit(seed=0)


def _default_targets(dit):
    return [t for t in framepack_lora_candidates(dit)
            if not any(re.fullmatch(p, t.original_name) for p in LORA_DEFAULT_EXCLUDES)]


def test_reference_target_set_and_key_names(dit):
    names = {t.original_name for t in _default_targets(dit)}
    expected = {f"transformer_blocks.{i}.{n}" for i in range(2) for n in DOUBLE}
    expected |= {f"single_transformer_blocks.{i}.{n}" for i in range(2) for n in SINGLE}
    assert names == expected  # norm1.linear / norm1_context.linear / norm.linear excluded, as the reference
    every = {t.original_name for t in framepack_lora_candidates(dit)}
    assert {"transformer_blocks.0.norm1.linear", "single_transformer_blocks.1.norm.linear"} <= every
    lora_names = {t.lora_name for t in _default_targets(dit)}
    assert {"lora_unet_transformer_blocks_0_attn_to_q", "lora_unet_transformer_blocks_1_attn_to_out_0",
            "lora_unet_single_transformer_blocks_0_proj_mlp", "lora_unet_transformer_blocks_0_ff_context_net_2"} \
        <= lora_names
    assert all(len(t.parts) == 1 and t.parts[0].module_path == t.original_name for t in _default_targets(dit))


def test_network_module_name_resolves():
    module = resolve_network_module("networks.lora_framepack")
    assert module.ARCHITECTURE == "framepack"


def _inputs():
    g = torch.Generator().manual_seed(5)
    c = TINY_FRAMEPACK_CONFIG
    return {"hidden_states": torch.randn(1, 16, 2, 8, 8, generator=g), "timestep": torch.tensor([400.0]),
            "encoder_hidden_states": torch.randn(1, 3, c["text_embed_dim"], generator=g),
            "encoder_attention_mask": torch.ones(1, 3, dtype=torch.long),
            "pooled_projections": torch.randn(1, c["pooled_projection_dim"], generator=g),
            "image_embeddings": torch.randn(1, 2, c["image_proj_dim"], generator=g),
            "latent_indices": torch.tensor([1, 2]), "guidance": embedded_guidance(10.0, 1)}


def _merged(dit, sd, multiplier=1.0):
    """`dit` with W += multiplier * alpha/rank * up @ down for every module of `sd` (the reference's merge)."""
    merged = copy.deepcopy(dit)
    canonical, unmatched = parse_lora_state_dict(sd, NameIndex(targets=framepack_lora_candidates(merged)))
    assert not unmatched
    with torch.no_grad():
        for name, w in canonical.items():
            merged.get_submodule(name).weight += multiplier * w.delta()
    return merged


@torch.no_grad()
def test_reference_named_lora_applies_exactly(dit):
    sd = reference_lora(_default_targets(dit), rank=4, alpha=2.0)
    assert "lora_unet_single_transformer_blocks_1_proj_out.lora_down.weight" in sd
    model = copy.deepcopy(dit)
    network = create_network_from_weights(_FramePackLoraSeams(), model, sd, multiplier=0.5)
    network.load_weights(sd)
    network.apply_to()
    got = packed_forward(model, **_inputs())
    want = packed_forward(_merged(dit, sd, 0.5), **_inputs())
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_save_lora_format_other_loads_in_the_diffusers_pipeline_unconverted(dit):
    """`--save_lora_format other` writes FramePack LoRAs with the architecture's prefix; diffusers' FramePack pipeline
    reads that file as it is (no rename) and predicts as the merged weights; our own loader reads it back."""
    from diffusers import HunyuanVideoFramepackPipeline

    from musubi_tuner.architectures import get_architecture

    sd = reference_lora(_default_targets(dit), rank=4, alpha=2.0)
    prefix = get_architecture("framepack").other_lora_prefix
    other = convert_state_dict(sd, "other", NameIndex(targets=framepack_lora_candidates(dit)), prefix=prefix)
    loaded = HunyuanVideoFramepackPipeline.lora_state_dict(dict(other))
    loaded = loaded[0] if isinstance(loaded, tuple) else loaded
    model = copy.deepcopy(dit)
    model.load_lora_adapter(loaded, prefix="transformer")
    with torch.no_grad():
        got = packed_forward(model, **_inputs())
        want = packed_forward(_merged(dit, sd), **_inputs())
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    back = convert_state_dict(other, "default", NameIndex(targets=framepack_lora_candidates(dit)))
    with torch.no_grad():
        assert torch.allclose(packed_forward(_merged(dit, back), **_inputs()), want, atol=1e-5)
    assert not torch.allclose(got, packed_forward(dit, **_inputs()), atol=1e-3)


# ---- conversion from HunyuanVideo LoRAs --------------------------------------------------------------------
@pytest.fixture(scope="module")
def hv_lora():
    """A musubi HunyuanVideo LoRA on every HV block Linear (modulation too) at the tiny width both share."""
    targets = get_architecture("hunyuan_video").lora_candidates(tiny_hv_dit())
    return targets, reference_lora(targets, rank=4, alpha=2.0, seed=3)


def test_hunyuan_video_lora_converts_to_the_same_deltas_fused_layers_split(dit, hv_lora):
    hv_targets, hv_sd = hv_lora
    converted = framepack_lora_from_any(hv_sd)
    assert all(k.startswith("lora_unet_transformer_blocks_") or k.startswith("lora_unet_single_transformer_blocks_")
               for k in converted)
    # linear1 = q, k, v, MLP in: one shared down matrix, up rows split in order, alpha kept
    assert torch.equal(converted["lora_unet_single_transformer_blocks_1_proj_mlp.lora_down.weight"],
                       hv_sd["lora_unet_single_blocks_1_linear1.lora_down.weight"])
    assert torch.equal(converted["lora_unet_single_transformer_blocks_1_attn_to_v.lora_up.weight"],
                       hv_sd["lora_unet_single_blocks_1_linear1.lora_up.weight"][64:96])
    assert torch.equal(converted["lora_unet_transformer_blocks_0_attn_add_k_proj.alpha"], torch.tensor(2.0))
    fp_deltas = deltas(converted, framepack_lora_candidates(dit))
    hv_deltas = deltas(hv_sd, hv_targets)
    assert len(fp_deltas) == sum(len(t.parts) for t in hv_targets)
    for t in hv_targets:
        stacked = torch.cat([fp_deltas[p.module_path] for p in t.parts])
        assert torch.allclose(stacked, hv_deltas[t.original_name], atol=1e-6), t.original_name


def test_diffusion_pipe_hunyuan_lora_converts_like_the_musubi_one(dit, hv_lora):
    hv_targets, hv_sd = hv_lora
    canonical, _ = parse_lora_state_dict(hv_sd, NameIndex(targets=hv_targets))
    # diffusion-pipe: dotted official names, lora_A/B, no alpha (scale 1): bake alpha/rank into the matrices
    dotted = to_other(canonical, "diffusion_model")
    assert "diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight" in dotted
    from_pipe = deltas(framepack_lora_from_any(dotted), framepack_lora_candidates(dit))
    from_musubi = deltas(framepack_lora_from_any(hv_sd), framepack_lora_candidates(dit))
    assert from_pipe.keys() == from_musubi.keys()
    for name in from_pipe:
        assert torch.allclose(from_pipe[name], from_musubi[name], atol=1e-6), name


def test_released_width_linear1_splits_into_three_heads_widths_and_the_mlp():
    hidden, rank = 3072, 2
    sd = {"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.randn(rank, hidden),
          "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.randn(3 * hidden + 4 * hidden, rank),
          "lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight": torch.randn(rank, hidden),
          "lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight": torch.randn(3 * hidden, rank)}
    out = framepack_lora_from_any(sd)
    rows = {k.split(".")[0]: v.shape[0] for k, v in out.items() if k.endswith("lora_up.weight")}
    assert rows == {"lora_unet_single_transformer_blocks_0_attn_to_q": hidden,
                    "lora_unet_single_transformer_blocks_0_attn_to_k": hidden,
                    "lora_unet_single_transformer_blocks_0_attn_to_v": hidden,
                    "lora_unet_single_transformer_blocks_0_proj_mlp": 4 * hidden,
                    "lora_unet_transformer_blocks_0_attn_add_q_proj": hidden,
                    "lora_unet_transformer_blocks_0_attn_add_k_proj": hidden,
                    "lora_unet_transformer_blocks_0_attn_add_v_proj": hidden}
    assert float(out["lora_unet_transformer_blocks_0_attn_add_q_proj.alpha"]) == rank  # no alpha: alpha = rank


def test_framepack_layouts_musubi_as_is_and_dotted_renamed(dit):
    sd = reference_lora(_default_targets(dit), rank=4, alpha=1.0)
    assert framepack_lora_from_any(sd) == sd
    canonical, _ = parse_lora_state_dict(sd, NameIndex(targets=framepack_lora_candidates(dit)))
    dotted = to_other(canonical, "transformer")
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in dotted
    renamed = framepack_lora_from_any(dotted)
    assert set(renamed) == set(sd)
    want, got = deltas(sd, framepack_lora_candidates(dit)), deltas(renamed, framepack_lora_candidates(dit))
    assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in want)


def test_targets_for_conversion_are_sized_from_the_lora_alone(dit):
    sd = reference_lora(_default_targets(dit), rank=4)
    targets = framepack_lora_targets_for_conversion(sd)
    by_name = {t.original_name: t for t in targets}
    for t in _default_targets(dit):
        assert (by_name[t.original_name].in_features, by_name[t.original_name].out_features) == \
            (t.in_features, t.out_features)


# ---- diffusers -------------------------------------------------------------------------------------------------
def test_diffusers_loads_our_lora_after_a_rename_only(dit):
    """diffusers' FramePack pipeline leaves the reference layout untranslated (its loader knows HunyuanVideo's
    `img_attn_qkv` only), so users convert to the diffusers layout; that loads with the same prediction."""
    from diffusers import HunyuanVideoFramepackPipeline

    sd = reference_lora(_default_targets(dit), rank=4, alpha=2.0)
    untranslated = HunyuanVideoFramepackPipeline.lora_state_dict(dict(sd))
    untranslated = untranslated[0] if isinstance(untranslated, tuple) else untranslated
    assert any(k.startswith("lora_unet_transformer_blocks_") for k in untranslated)
    as_diffusers = convert_state_dict(sd, "diffusers", NameIndex(targets=framepack_lora_candidates(dit)))
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in as_diffusers
    model = copy.deepcopy(dit)
    model.load_lora_adapter(as_diffusers, prefix="transformer")
    with torch.no_grad():
        got = packed_forward(model, **_inputs())
        want = packed_forward(_merged(dit, sd), **_inputs())
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
