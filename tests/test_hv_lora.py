"""HunyuanVideo LoRA: official names, fused layers, the reference's layout both ways, ComfyUI and diffusers
readers, convert_lora / merge_lora, and the architecture's model-side seams."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

from musubi_tuner import convert_lora, merge_lora
from musubi_tuner.architectures import get_architecture
from musubi_tuner.architectures.hunyuan_video.dit_files import build_empty_hv_dit, hv_diffusers_to_original, load_hv_dit
from musubi_tuner.architectures.hunyuan_video.tiny import tiny_hv_dit, write_tiny_hv_dit
from musubi_tuner.errors import UserError
from musubi_tuner.networks.lora import create_network, create_network_from_weights
from musubi_tuner.networks.lora_files import load_lora_file, save_lora_file
from musubi_tuner.networks.modules import resolve_network_module

from fused_lora_helpers import assert_fused_lora_matches_original_layer, deltas, probes, reference_lora

ARCH = get_architecture("hunyuan_video")
RANK = 4
DOUBLE = ("img_attn_qkv", "img_attn_proj", "img_mlp.fc1", "img_mlp.fc2",
          "txt_attn_qkv", "txt_attn_proj", "txt_mlp.fc1", "txt_mlp.fc2")
SINGLE = ("linear1", "linear2")


@pytest.fixture(scope="module")
def dit():
    return tiny_hv_dit(seed=0)


def default_targets(dit_model):
    return create_network(ARCH, dit_model, RANK, 1.0).targets


# ---- names ----------------------------------------------------------------------------------------------------------
def test_reference_target_set_and_names(dit):
    targets = default_targets(dit)
    expected = {f"double_blocks.{i}.{n}" for i in range(2) for n in DOUBLE}
    expected |= {f"single_blocks.{i}.{n}" for i in range(2) for n in SINGLE}
    assert {t.original_name for t in targets} == expected  # modulation excluded, as the reference does
    names = {t.lora_name for t in targets}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_img_mlp_fc1",
            "lora_unet_single_blocks_0_linear1", "lora_unet_double_blocks_1_txt_attn_proj"} <= names
    all_names = {t.original_name for t in ARCH.lora_candidates(dit)}
    assert "double_blocks.0.img_mod.linear" in all_names and "single_blocks.1.modulation.linear" in all_names


def test_every_name_is_an_official_layer_and_parts_stack_to_it(dit):
    original = hv_diffusers_to_original(dit.state_dict())
    covered = []
    for t in ARCH.lora_candidates(dit):
        stacked = torch.cat([p.module.weight for p in t.parts])
        assert torch.equal(stacked, original[t.original_name + ".weight"]), t.original_name
        covered += [p.module_path for p in t.parts]
    block_linears = [n for n, m in dit.named_modules() if isinstance(m, nn.Linear)
                     and n.startswith(("transformer_blocks.", "single_transformer_blocks."))]
    assert sorted(covered) == sorted(block_linears)  # every block Linear once; refiner / txt_in are not targets
    linear1 = next(t for t in ARCH.lora_candidates(dit) if t.original_name == "single_blocks.0.linear1")
    assert [p.module_path.rsplit(".", 1)[-1] for p in linear1.parts] == ["to_q", "to_k", "to_v", "proj_mlp"]


def test_released_size_target_count_on_meta():
    meta = build_empty_hv_dit({"num_layers": 20, "num_single_layers": 40})
    targets = default_targets(meta)
    assert len(targets) == 20 * 8 + 40 * 2
    qkv = next(t for t in targets if t.original_name == "double_blocks.3.txt_attn_qkv")
    assert (qkv.out_features, qkv.in_features) == (9216, 3072)
    linear1 = next(t for t in targets if t.original_name == "single_blocks.39.linear1")
    assert (linear1.out_features, linear1.split_sizes) == (21504, [3072, 3072, 3072, 12288])


# ---- the reference's layout -----------------------------------------------------------------------------------------
def test_reference_fused_lora_round_trips_bit_exact(dit):
    sd = reference_lora(default_targets(dit))
    network = create_network_from_weights(ARCH, dit, sd)
    network.load_weights(sd)
    back = network.state_dict_reference()
    assert set(back) == set(sd) and all(torch.equal(back[k], v) for k, v in sd.items())


def test_fused_lora_forward_equals_the_fused_official_layer(dit):
    assert_fused_lora_matches_original_layer(ARCH, dit, "single_blocks.1.linear1",
                                             hv_diffusers_to_original(dit.state_dict()), RANK)


def test_network_module_networks_lora_is_hunyuan_video():
    module = resolve_network_module("networks.lora")
    assert module.ARCHITECTURE == "hunyuan_video" and ARCH.network_module == "networks.lora"


# ---- ComfyUI --------------------------------------------------------------------------------------------------------
_COMFY_NATIVE = ((".img_attn_qkv", ".img_attn.qkv"), (".txt_attn_qkv", ".txt_attn.qkv"),
                 (".img_attn_proj", ".img_attn.proj"), (".txt_attn_proj", ".txt_attn.proj"),
                 ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.2"), ("_mod.linear", "_mod.lin"),
                 (".modulation.linear", ".modulation.lin"))


def comfy_resolvable(official_modules: list[str]) -> set[str]:
    """ComfyUI's HunyuanVideo rules: generic `lora_unet_<native path, . -> _>` / `diffusion_model.<native path>`
    for its native module names, plus `transformer.` / `diffusion_model.` + the official name (diffusion-pipe)."""
    out = set()
    for name in official_modules:
        native = name
        for official, comfy in _COMFY_NATIVE:
            native = native.replace(official, comfy)
        out |= {"lora_unet_" + native.replace(".", "_"), "diffusion_model." + native,
                "transformer." + name, "diffusion_model." + name}
    return out


def _stems(sd) -> set[str]:
    return {k.split(".lora_")[0].removesuffix(".alpha") for k in sd}


def test_comfyui_loads_the_other_layout_fully_and_the_default_layout_as_the_reference_does(tmp_path, dit):
    network = create_network(ARCH, dit, RANK, 1.0)
    default_path, other_path = tmp_path / "lora.safetensors", tmp_path / "other.safetensors"
    save_lora_file(network.state_dict_reference(), default_path, None)
    convert_lora.main(["--input", str(default_path), "--output", str(other_path), "--target", "other",
                       "--arch", "hunyuan_video"])
    modules = [k[: -len(".weight")] for k in hv_diffusers_to_original(dit.state_dict()) if k.endswith(".weight")]
    resolvable = comfy_resolvable(modules)
    other = load_lora_file(other_path)[0]
    assert "diffusion_model.double_blocks.0.img_mlp.fc1.lora_A.weight" in other
    assert _stems(other) <= resolvable
    # The reference layout itself: qkv/proj/linear1/linear2 resolve, the MLPs do not (reference issue #26);
    # docs/hunyuan_video.md says to convert with --target other for ComfyUI.
    unresolved = _stems(load_lora_file(default_path)[0]) - resolvable
    assert unresolved == {f"lora_unet_double_blocks_{i}_{s}_mlp_{f}" for i in range(2) for s in ("img", "txt")
                          for f in ("fc1", "fc2")}


# ---- diffusers ------------------------------------------------------------------------------------------------------
def test_diffusers_reads_the_other_layout_at_released_width(tmp_path):
    """diffusers' HunyuanVideo LoRA converter takes official dotted names (what --target other writes) and hard-codes
    width 3072: check the weights it produces on a width-3072, 1+1-block LoRA."""
    from diffusers import HunyuanVideoPipeline

    meta = build_empty_hv_dit({"num_layers": 1, "num_single_layers": 1, "num_refiner_layers": 0})
    targets = default_targets(meta)
    sd = reference_lora(targets, rank=2, alpha=1.0)
    src, other = tmp_path / "lora.safetensors", tmp_path / "other.safetensors"
    save_lora_file(sd, src, None)
    convert_lora.main(["--input", str(src), "--output", str(other), "--target", "other", "--arch", "hunyuan_video"])
    converted = HunyuanVideoPipeline.lora_state_dict(str(other))
    got, want = probes(converted, targets), probes(sd, targets)
    assert set(got) == set(want)
    for name, value in want.items():  # fp32 rounding of the baked sqrt(alpha/rank), relative to the magnitude
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5 * float(value.abs().max()))


def test_diffusers_layout_loads_into_diffusers_model_with_the_same_output(tmp_path, dit):
    network = create_network(ARCH, dit, RANK, 2.0)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if "lora_up" in name:
                p.copy_(torch.randn(p.shape) * 0.1)
    default_path, dif_path = tmp_path / "lora.safetensors", tmp_path / "diffusers.safetensors"
    save_lora_file(network.state_dict_reference(), default_path, None)
    convert_lora.main(["--input", str(default_path), "--output", str(dif_path), "--target", "diffusers",
                       "--arch", "hunyuan_video"])
    gen = torch.Generator().manual_seed(3)
    inputs = dict(hidden_states=torch.randn(1, 16, 1, 4, 4, generator=gen), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 4, 32, generator=gen),
                  encoder_attention_mask=torch.ones(1, 4, dtype=torch.long),
                  pooled_projections=torch.randn(1, 32, generator=gen), guidance=torch.tensor([6000.0]),
                  return_dict=False)
    network.apply_to()
    with torch.no_grad():
        live = dit(**inputs)[0]
    network.remove()
    with torch.no_grad():
        base = dit(**inputs)[0]
    assert (live - base).abs().max() > 1e-3
    fresh = tiny_hv_dit(seed=0)
    fresh.load_lora_adapter(load_lora_file(dif_path)[0], prefix="transformer")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs)[0], live, rtol=0, atol=1e-5)


# ---- convert_lora / diffusion-pipe ------------------------------------------------------------------------------------
def test_convert_other_writes_what_the_reference_writes_and_back(tmp_path, dit):
    targets = default_targets(dit)
    sd = reference_lora(targets, alpha=2.0)
    src, other, back = (tmp_path / f"{n}.safetensors" for n in ("src", "other", "back"))
    save_lora_file(sd, src, None)
    convert_lora.main(["--input", str(src), "--output", str(other), "--target", "other"])  # no --arch, as the reference
    written = load_lora_file(other)[0]
    root = (2.0 / RANK) ** 0.5  # the reference bakes alpha into A and B, sqrt(alpha/rank) each, and drops alpha
    stem = "diffusion_model.single_blocks.1.linear1"
    torch.testing.assert_close(written[f"{stem}.lora_A.weight"],
                               sd["lora_unet_single_blocks_1_linear1.lora_down.weight"] * root)
    assert not any(k.endswith(".alpha") for k in written)
    assert {k.split(".lora_")[0] for k in written} == {"diffusion_model." + t.original_name for t in targets}
    convert_lora.main(["--input", str(other), "--output", str(back), "--target", "default"])
    got = deltas(load_lora_file(back)[0], targets)
    for name, delta in deltas(sd, targets).items():
        torch.testing.assert_close(got[name], delta, rtol=1e-5, atol=1e-5)


def test_diffusion_pipe_lora_loads(dit):
    """diffusion-pipe writes `transformer.<official name>.lora_A/B.weight` with alpha = rank (no alpha key)."""
    targets = default_targets(dit)
    gen = torch.Generator().manual_seed(4)
    sd = {}
    for t in targets:
        sd[f"transformer.{t.original_name}.lora_A.weight"] = torch.randn(RANK, t.in_features, generator=gen)
        sd[f"transformer.{t.original_name}.lora_B.weight"] = torch.randn(t.out_features, RANK, generator=gen)
    network = create_network_from_weights(ARCH, dit, sd)
    network.load_weights(sd)
    for module in network.loras:
        assert torch.equal(module.lora_down.weight, sd[f"transformer.{module.original_name}.lora_A.weight"])
        assert module.scale == 1.0


# ---- merge_lora -----------------------------------------------------------------------------------------------------
def test_merge_lora_on_the_official_pt_is_exact(tmp_path, dit):
    base_path = write_tiny_hv_dit(tmp_path, "official_pt")
    targets = default_targets(dit)
    sd = reference_lora(targets, alpha=2.0)  # scale 0.5
    lora_path, out = tmp_path / "lora.safetensors", tmp_path / "merged.safetensors"
    save_lora_file(sd, lora_path, None)
    merge_lora.main(["--dit", str(base_path), "--lora_weight", str(lora_path), "--lora_multiplier", "0.5",
                     "--save_merged_model", str(out)])
    base = torch.load(base_path, weights_only=True)["module"]
    with safe_open(str(out), "pt") as f:
        merged = {k: f.get_tensor(k) for k in f.keys()}
    assert set(merged) == set(base)
    touched = {t.original_name + ".weight" for t in targets}
    for key, weight in base.items():
        if key in touched:
            stem = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
            expected = weight + (sd[f"{stem}.lora_up.weight"] @ sd[f"{stem}.lora_down.weight"]) * (0.5 * 0.5)
            assert torch.equal(merged[key], expected), key
        else:
            assert torch.equal(merged[key], weight), key
    loaded = load_hv_dit(out)  # the merged file is a DiT file again
    assert loaded.config.num_layers == 2


# ---- the architecture's model side ---------------------------------------------------------------------------------
def test_traits_scripts_and_shapes():
    assert (ARCH.traits.cache_code, ARCH.traits.frame_stride, ARCH.traits.target_fps) == ("hv", 4, 24.0)
    assert ARCH.script_name("cache_text_encoder_outputs") == "cache_text_encoder_outputs.py"
    assert ARCH.script_name("train_network") == "hv_train_network.py"
    assert get_architecture("wan").script_name("cache_text_encoder_outputs") == "wan_cache_text_encoder_outputs.py"
    assert ARCH.latent_shape(960, 544, 129) == (16, 33, 68, 120)
    with pytest.raises(UserError, match="4N\\+1"):
        ARCH.latent_shape(256, 256, 10)
    latents = torch.ones(16, 2, 2, 2)
    assert torch.equal(ARCH.latents_from_cache(latents), latents * 0.476986)
    assert ARCH.latents_from_cache(latents) is not latents
    wan_latents = torch.ones(2)
    assert get_architecture("wan").latents_from_cache(wan_latents) is wan_latents  # other families unchanged


def test_lora_targets_for_conversion_from_the_lora_alone(dit):
    sd = reference_lora(default_targets(dit))
    targets = ARCH.lora_targets_for_conversion(sd)
    names = {t.original_name: t for t in targets}
    for t in default_targets(dit):
        assert (names[t.original_name].out_features, names[t.original_name].split_sizes) == (t.out_features,
                                                                                          t.split_sizes)


def test_save_lora_format_other_writes_a_file_comfyui_and_we_load_unconverted(tmp_path, dit):
    """`--save_lora_format other`: the trainer's own file loads in ComfyUI without convert_lora (every module
    resolves, the MLPs too) and back into our network with the same weight deltas."""
    import argparse

    from musubi_tuner.training.network_setup import save_network

    network = create_network(ARCH, dit, RANK, 2.0)
    for p in network.parameters():  # up matrices start at zero: give every module a delta to compare
        torch.nn.init.normal_(p, std=0.05)
    args = argparse.Namespace(save_precision="fp32", no_metadata=True, save_lora_format="other")
    path = tmp_path / "trained.safetensors"
    save_network(network, ARCH, args, path, progress=None)
    saved = load_lora_file(path)[0]
    modules = [k[: -len(".weight")] for k in hv_diffusers_to_original(dit.state_dict()) if k.endswith(".weight")]
    assert all(k.startswith("diffusion_model.") for k in saved)
    assert _stems(saved) <= comfy_resolvable(modules)
    reloaded = create_network_from_weights(ARCH, dit, saved)
    reloaded.load_weights(saved)
    want = probes(network.state_dict_reference(), network.targets)
    got = probes(reloaded.state_dict_reference(), reloaded.targets)
    assert set(got) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-7)
