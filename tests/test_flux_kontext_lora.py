"""FLUX.1 Kontext LoRA names and layouts: BFL names, fused layers, conversions, ComfyUI and diffusers readers."""

from __future__ import annotations

import pytest
import torch

from musubi_tuner import convert_lora
from musubi_tuner.architectures import get_architecture
from musubi_tuner.architectures.flux_kontext.dit_files import diffusers_to_bfl
from musubi_tuner.architectures.flux_kontext.tiny import tiny_flux_dit
from musubi_tuner.networks.lora import create_network, create_network_from_weights
from musubi_tuner.networks.lora_files import load_lora_file, save_lora_file
from musubi_tuner.networks.merge import merge_lora_into_original_state_dict

from fused_lora_helpers import assert_fused_lora_matches_original_layer, deltas, probes, reference_lora

ARCH = get_architecture("flux_kontext")
RANK = 4


@pytest.fixture(scope="module")
def dit():
    return tiny_flux_dit(seed=0)


def test_every_lora_name_is_a_bfl_layer_with_the_same_shape(dit):
    bfl = diffusers_to_bfl(dit.state_dict())
    targets = ARCH.lora_candidates(dit)
    assert len(targets) == 2 * 10 + 2 * 3  # 10 Linears per double block, 3 per single block
    for t in targets:
        weight = bfl[t.original_name + ".weight"]
        assert tuple(weight.shape) == (t.out_features, t.in_features), t.original_name
    names = {t.lora_name for t in targets}
    assert "lora_unet_double_blocks_0_img_attn_qkv" in names
    assert "lora_unet_single_blocks_1_linear1" in names
    qkv = next(t for t in targets if t.original_name == "double_blocks.0.img_attn.qkv")
    assert [p.module_path for p in qkv.parts] == [f"transformer_blocks.0.attn.to_{x}" for x in "qkv"]
    linear1 = next(t for t in targets if t.original_name == "single_blocks.0.linear1")
    assert [p.module_path.rsplit(".", 1)[-1] for p in linear1.parts] == ["to_q", "to_k", "to_v", "proj_mlp"]


def test_default_excludes_follow_the_reference(dit):
    default = {t.original_name for t in create_network(ARCH, dit, RANK, 1.0).targets}
    assert len(default) == 20
    assert not any("mod.lin" in n or "modulation" in n for n in default)
    # user patterns replace the modulation exclude (it applies only when none are given)
    custom = create_network(ARCH, dit, RANK, 1.0, network_args=["exclude_patterns=[r'.*mlp.*']"])
    names = {t.original_name for t in custom.targets}
    assert "double_blocks.0.img_mod.lin" in names and "single_blocks.0.modulation.lin" in names
    assert not any("mlp" in n for n in names)


def test_reference_fused_lora_round_trips_through_our_network_exactly(dit):
    sd = reference_lora(ARCH.lora_candidates(dit))
    network = create_network_from_weights(ARCH, dit, sd)
    network.load_weights(sd)
    back = network.state_dict_reference()
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert torch.equal(back[key], value), key


def test_fused_lora_forward_equals_the_fused_bfl_layer(dit):
    """The LoRA on to_q/to_k/to_v (shared down, split up) computes exactly what it does on BFL's fused qkv."""
    assert_fused_lora_matches_original_layer(ARCH, dit, "double_blocks.1.img_attn.qkv",
                                             diffusers_to_bfl(dit.state_dict()), RANK)


def test_merge_in_bfl_layout_equals_merge_in_diffusers_layout(dit):
    """merge_lora on the BFL file and the network's merge on the loaded model give the same weights."""
    sd = reference_lora(ARCH.lora_candidates(dit), alpha=None)
    base_bfl = diffusers_to_bfl({k: v.clone() for k, v in dit.state_dict().items()})
    merged_bfl = merge_lora_into_original_state_dict(dict(base_bfl), [sd], [1.0])
    model = tiny_flux_dit(seed=0)
    network = create_network_from_weights(ARCH, model, sd)
    network.load_weights(sd)
    network.merge_to_base(1.0)
    ours = ARCH.dit_state_dict_to_original(model.state_dict())
    for key, value in merged_bfl.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=1e-6, msg=key)
    assert not torch.equal(merged_bfl["single_blocks.0.linear1.weight"], base_bfl["single_blocks.0.linear1.weight"])


@pytest.mark.parametrize("alpha", [None, 2.0])
def test_default_to_diffusers_and_back_keeps_merged_weights(tmp_path, dit, alpha):
    targets = ARCH.lora_candidates(dit)
    sd = reference_lora(targets, alpha=alpha)
    src, dif, back = tmp_path / "default.safetensors", tmp_path / "diffusers.safetensors", tmp_path / "back.safetensors"
    save_lora_file(sd, src, None)
    # no --dit: the layer map comes from a meta model sized by the LoRA itself
    convert_lora.main(["--input", str(src), "--output", str(dif), "--target", "diffusers", "--arch", "flux_kontext"])
    convert_lora.main(["--input", str(dif), "--output", str(back), "--target", "default", "--arch", "flux_kontext"])
    dif_sd, back_sd = load_lora_file(dif)[0], load_lora_file(back)[0]
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in dif_sd
    assert "transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight" in dif_sd
    assert torch.equal(dif_sd["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"],
                       dif_sd["transformer.transformer_blocks.0.attn.to_v.lora_A.weight"])  # shared down
    want = deltas(sd, targets)
    for name, got in (("diffusers", deltas(dif_sd, targets)), ("back", deltas(back_sd, targets))):
        assert set(got) == set(want), name
        for layer, delta in want.items():
            if alpha is None:  # scale 1: nothing is rescaled, so the conversion is bit-exact
                assert torch.equal(got[layer], delta), (name, layer)
            else:
                torch.testing.assert_close(got[layer], delta, rtol=1e-6, atol=1e-6)
    if alpha is None:
        assert all(torch.equal(back_sd[k], v) for k, v in sd.items())


def test_every_key_of_our_files_resolves_with_comfyui_generic_rules(tmp_path, dit):
    """ComfyUI maps `lora_unet_<path with _>` and `diffusion_model.<path>` for every weight key of the model."""
    network = create_network(ARCH, dit, RANK, 1.0)
    default_path, other_path = tmp_path / "lora.safetensors", tmp_path / "other.safetensors"
    save_lora_file(network.state_dict_reference(), default_path, None)
    # --arch gives exact names; the reference's string rules would write HunyuanVideo's `img_attn_qkv`
    convert_lora.main(["--input", str(default_path), "--output", str(other_path), "--target", "other",
                       "--arch", "flux_kontext"])
    bfl_modules = [k[: -len(".weight")] for k in diffusers_to_bfl(dit.state_dict()) if k.endswith(".weight")]
    comfy_names = {"lora_unet_" + m.replace(".", "_") for m in bfl_modules}
    comfy_names |= {"diffusion_model." + m for m in bfl_modules}
    for path in (default_path, other_path):
        sd = load_lora_file(path)[0]
        stems = {k.split(".lora_")[0].removesuffix(".alpha") for k in sd}
        assert stems and stems <= comfy_names, sorted(stems - comfy_names)[:3]


def test_diffusers_reads_our_default_file_at_real_width(tmp_path):
    """diffusers' kohya-FLUX converter hard-codes width 3072: check it on a real-width 1+1 block LoRA."""
    pipeline_cls = pytest.importorskip("diffusers").FluxKontextPipeline
    fake = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 3072),
            "lora_unet_single_blocks_0_linear1.lora_down.weight": torch.zeros(2, 3072)}
    targets = ARCH.lora_targets_for_conversion(fake)
    chosen = [t for t in targets if not any(s in t.original_name for s in ("mod.lin", "modulation"))]
    sd = reference_lora(chosen, rank=2, alpha=1.0)
    path = tmp_path / "real_width.safetensors"
    save_lora_file(sd, path, None)
    converted = pipeline_cls.lora_state_dict(str(path))
    converted = converted[0] if isinstance(converted, tuple) else converted
    want, got = probes(sd, chosen), probes(converted, chosen)
    assert set(got) == set(want)
    for layer, value in want.items():
        torch.testing.assert_close(got[layer], value, rtol=1e-4, atol=1e-5)
