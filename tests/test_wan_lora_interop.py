"""Wan LoRA files in the places users load them: original names, ComfyUI's key rule, diffusers, the reference's
own layout (inference and continued training), and --save_merged_model."""

import argparse

import pytest
import torch
from safetensors import safe_open

from _numerics import assert_same_outputs
from musubi_tuner.architectures import get_architecture
from musubi_tuner.architectures.wan.dit_files import (
    build_empty_wan_dit,
    get_wan_task,
    load_wan_dit,
    save_wan_dit_original,
    wan_dit_to_original,
)
from musubi_tuner.architectures.wan.tiny import make_tiny_dit
from musubi_tuner.inference.lora_merge import merge_loras_into_dit, save_merged_model
from musubi_tuner.networks import lora
from musubi_tuner.networks.lora_files import load_lora_file
from musubi_tuner.training.cli import parse_training_args
from musubi_tuner.training.network_setup import build_network, save_network
from musubi_tuner.training.state import TrainProgress
from musubi_tuner.utils.atomic import save_safetensors_atomic

WAN = get_architecture("wan")
TASKS = ("t2v-1.3B", "i2v-14B", "flf2v-14B", "t2v-1.3B-FC")
PER_BLOCK_T2V = {"self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                 "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"}
PER_BLOCK_I2V = PER_BLOCK_T2V | {"cross_attn.k_img", "cross_attn.v_img"}


def _randomize_ups(network, seed=1):
    """lora_up starts at zero, which would make every LoRA a no-op and hide mistakes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "lora_up" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def _inputs(task, batch=1, seed=3):
    generator = torch.Generator().manual_seed(seed)
    image = task != "t2v-1.3B"
    channels = get_wan_task(task).in_dim
    out = {"hidden_states": torch.randn(batch, channels, 2, 4, 4, generator=generator),
           "timestep": torch.tensor([417.0] * batch),
           "encoder_hidden_states": torch.randn(batch, 512, 32, generator=generator)}
    if image:
        tokens = 34 if task == "flf2v-14B" else 17
        out["encoder_hidden_states_image"] = torch.randn(batch, tokens, 32, generator=generator)
    return out


def _forward(dit, inputs):
    with torch.no_grad():
        return dit(**inputs, return_dict=False)[0]


def _train_args(tmp_path, task="t2v-1.3B", *extra):
    argv = ["--task", task, "--output_dir", str(tmp_path / "out"), "--network_dim", "4", "--network_alpha", "2",
            *extra]
    return parse_training_args(WAN, argv)


def _trainer_lora_file(tmp_path, task, dit, *extra):
    """A LoRA made and saved exactly as the trainer does (build_network + save_network with metadata)."""
    args = _train_args(tmp_path, task, *extra)
    network = build_network(WAN, dit, args)
    _randomize_ups(network)
    path = tmp_path / f"lora_{task}.safetensors"
    save_network(network, WAN, args, path, TrainProgress(global_step=7, epoch=1))
    return network, path


# ---- names ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_every_tiny_target_carries_an_original_name_present_in_the_file_layout(task, tmp_path):
    dit = make_tiny_dit(task)
    targets = WAN.lora_candidates(dit)
    path = tmp_path / "dit.safetensors"
    save_wan_dit_original(dit, path)
    with safe_open(str(path), "pt") as f:
        file_keys = set(f.keys())
    modules = dict(dit.named_modules())
    expected = PER_BLOCK_T2V if task == "t2v-1.3B" else PER_BLOCK_I2V
    assert {t.original_name for t in targets} == {f"blocks.{i}.{n}" for i in range(2) for n in expected}
    for target in targets:
        assert f"{target.original_name}.weight" in file_keys
        assert target.lora_name == "lora_unet_" + target.original_name.replace(".", "_")
        (part,) = target.parts  # Wan has no fused layers: one diffusers Linear per original layer
        assert modules[part.module_path] is part.module
        with safe_open(str(path), "pt") as f:
            assert torch.equal(f.get_tensor(f"{target.original_name}.weight"), part.module.weight)


def test_real_i2v_14b_targets_names_and_count_on_meta():
    task = get_wan_task("i2v-14B")
    dit = build_empty_wan_dit(task.diffusers_config())
    assert next(dit.parameters()).is_meta
    targets = WAN.lora_candidates(dit)
    assert len(targets) == 40 * (4 + 6 + 2) == 480
    selected = lora.select_targets(WAN, targets, lora.parse_network_args(None))
    assert len(selected) == 480  # the reference's default excludes drop no block Linear
    original_shapes = {k: tuple(v.shape) for k, v in wan_dit_to_original(dit.state_dict()).items()}
    assert {t.original_name for t in targets} == {f"blocks.{i}.{n}" for i in range(40) for n in PER_BLOCK_I2V}
    for target in targets:
        assert original_shapes[f"{target.original_name}.weight"] == (target.out_features, target.in_features)
    assert original_shapes["blocks.39.cross_attn.k_img.weight"] == (5120, 5120)
    assert original_shapes["blocks.0.ffn.0.weight"] == (13824, 5120)


# ---- ComfyUI ----------------------------------------------------------------------------------------------------
def comfy_unconsumed_keys(lora_sd, original_weight_keys):
    """ComfyUI's generic rule: each `diffusion_model.<path>.weight` of the model makes `lora_unet_<path, . -> _>` and
    `diffusion_model.<path>` resolvable; a key is consumed when it is such a prefix plus a LoRA suffix."""
    prefixes = set()
    for key in original_weight_keys:
        if key.endswith(".weight"):
            path = key[: -len(".weight")]
            prefixes |= {"lora_unet_" + path.replace(".", "_"), "diffusion_model." + path}
    suffixes = (".lora_up.weight", ".lora_down.weight", ".alpha", ".lora_A.weight", ".lora_B.weight")
    return [k for k in lora_sd if not any(k.startswith(p) and k[len(p):] in suffixes for p in prefixes)]


@pytest.mark.parametrize("task", ("t2v-1.3B", "i2v-14B", "t2v-1.3B-FC"))
def test_trainer_saved_lora_is_fully_consumed_by_comfyui(task, tmp_path):
    dit = make_tiny_dit(task)
    network, path = _trainer_lora_file(tmp_path, task, dit, "--save_precision", "bf16")
    written, metadata = load_lora_file(path)
    assert len(written) == 3 * len(network.loras) and all(k.startswith("lora_unet_blocks_") for k in written)
    assert written["lora_unet_blocks_0_self_attn_q.lora_down.weight"].dtype == torch.bfloat16
    assert metadata["ss_network_module"] == "networks.lora_wan" and metadata["ss_network_dim"] == "4"
    assert comfy_unconsumed_keys(written, wan_dit_to_original(dit.state_dict())) == []
    if task != "t2v-1.3B":  # I2V and Fun-Control DiTs have the CLIP image branch
        assert "lora_unet_blocks_1_cross_attn_k_img.lora_up.weight" in written
    # the resolved weight has the shape the LoRA delta needs
    shapes = {k: tuple(v.shape) for k, v in wan_dit_to_original(dit.state_dict()).items()}
    for key, value in written.items():
        if key.endswith(".lora_up.weight"):
            name = next(k for k in shapes if "lora_unet_" + k[:-7].replace(".", "_") == key[: -len(".lora_up.weight")])
            down = written[key.replace("lora_up", "lora_down")]
            assert shapes[name] == (value.shape[0], down.shape[1])


# ---- diffusers --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ("t2v-1.3B", "i2v-14B"))
def test_diffusers_loads_our_default_layout_file_with_the_same_output(task, tmp_path):
    from diffusers import WanPipeline

    dit = make_tiny_dit(task)
    network, path = _trainer_lora_file(tmp_path, task, dit)
    inputs = _inputs(task)
    network.remove()  # build_network attached it, as for training
    base = _forward(dit, inputs)
    network.apply_to()
    live = _forward(dit, inputs)
    network.remove()
    network.merge_to_base()
    merged = _forward(dit, inputs)
    assert (live - base).abs().max() > 1e-3  # the LoRA changes the output, so the comparison means something

    sd = WanPipeline.lora_state_dict(str(path))
    assert len(sd) == 2 * len(network.loras)
    fresh = make_tiny_dit(task)
    fresh.load_lora_adapter(sd, prefix="transformer")
    peft_out = _forward(fresh, inputs)
    assert torch.allclose(peft_out, live, atol=1e-5, rtol=0)
    assert torch.allclose(peft_out, merged, atol=1e-5, rtol=0)

    pipe = WanPipeline(transformer=make_tiny_dit(task), vae=None, text_encoder=None, tokenizer=None, scheduler=None)
    pipe.load_lora_weights(str(path))
    assert torch.allclose(_forward(pipe.transformer, inputs), live, atol=1e-5, rtol=0)


def _peft_deltas(dit):
    """{diffusers module path: weight delta} of every LoRA layer diffusers/peft attached (active adapter)."""
    out = {}
    for path, module in dit.named_modules():
        if hasattr(module, "get_delta_weight") and getattr(module, "lora_A", None):
            out[path] = module.get_delta_weight(module.active_adapters[0]).detach()
    return out


@pytest.mark.parametrize(("task", "partial"), [("t2v-1.3B", False), ("i2v-14B", True)])
def test_converted_diffusers_layout_loads_in_diffusers_with_our_weight_deltas(task, partial, tmp_path):
    """`convert_lora.py --target diffusers --arch wan` writes what WanPipeline.load_lora_weights takes as it is
    (also for partial LoRAs, which diffusers' own musubi converter refuses), and `--target default` reads it back."""
    from diffusers import WanPipeline

    from musubi_tuner import convert_lora
    from musubi_tuner.networks.lora_files import save_lora_file

    dit = make_tiny_dit(task)
    network, path = _trainer_lora_file(tmp_path, task, dit)  # rank 4, alpha 2: scale 0.5, baked in on conversion
    network.remove()
    ours = {m._target.parts[0].module_path: m.weights().delta() for m in network.loras}
    if partial:  # only the attention of block 1, as with --network_args exclude_patterns
        sd, metadata = load_lora_file(path)
        sd = {k: v for k, v in sd.items() if k.startswith("lora_unet_blocks_1_cross_attn_")}
        save_lora_file(sd, path, metadata)
        ours = {k: v for k, v in ours.items() if k.startswith("blocks.1.attn2.")}
        assert len(ours) == 6  # q, k, v, o, k_img, v_img
    converted, back = tmp_path / "diffusers.safetensors", tmp_path / "back.safetensors"
    convert_lora.main(["--input", str(path), "--output", str(converted), "--target", "diffusers", "--arch", "wan"])
    converted_sd, converted_meta = load_lora_file(converted)
    assert set(converted_sd) == {f"transformer.{p}.lora_{m}.weight" for p in ours for m in "AB"}
    assert converted_meta["ss_network_dim"] == "4"  # training metadata travels with the file

    pipe = WanPipeline(transformer=make_tiny_dit(task), vae=None, text_encoder=None, tokenizer=None, scheduler=None)
    pipe.load_lora_weights(str(converted))
    theirs = _peft_deltas(pipe.transformer)
    assert set(theirs) == set(ours)
    for module_path, delta in ours.items():
        assert delta.abs().max() > 0  # lora_up was randomised, so each comparison means something
        # the scale 0.5 is split as sqrt(0.5) into both matrices: equal up to fp32 rounding
        torch.testing.assert_close(theirs[module_path], delta, rtol=1e-6, atol=1e-7, msg=module_path)

    convert_lora.main(["--input", str(converted), "--output", str(back), "--target", "default", "--arch", "wan"])
    back_sd, _ = load_lora_file(back)
    original_sd, _ = load_lora_file(path)
    assert set(back_sd) == set(original_sd)  # the reference's key names, alpha = rank (scale 1) as it converts
    for stem in {k.split(".")[0] for k in back_sd}:
        assert float(back_sd[f"{stem}.alpha"]) == 4.0
        got = back_sd[f"{stem}.lora_up.weight"] @ back_sd[f"{stem}.lora_down.weight"]
        want = (original_sd[f"{stem}.lora_up.weight"] @ original_sd[f"{stem}.lora_down.weight"]) * 0.5
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=stem)


def test_conversion_targets_sized_from_a_real_i2v_14b_lora_match_the_model():
    """Without a model file, the LoRA's own shapes size the meta DiT: names and shapes are those of i2v-14B."""
    fake = {"lora_unet_blocks_39_cross_attn_k_img.lora_down.weight": torch.zeros(2, 5120),
            "lora_unet_blocks_0_ffn_2.lora_down.weight": torch.zeros(2, 13824)}
    targets = WAN.lora_targets_for_conversion(fake)
    real = WAN.lora_candidates(build_empty_wan_dit(get_wan_task("i2v-14B").diffusers_config()))
    assert len(targets) == 480
    assert _described(targets) == _described(real)


def _described(targets):
    return sorted((t.original_name, t.parts[0].module_path, t.out_features, t.in_features) for t in targets)


@pytest.mark.parametrize("task", ("t2v-1.3B", "i2v-14B"))
def test_conversion_targets_from_a_tiny_lora_are_the_models_candidates(task, tmp_path):
    """The name table behind conversion (no diffusers model built) lists exactly the Linears the model has."""
    dit = make_tiny_dit(task)
    _, path = _trainer_lora_file(tmp_path, task, dit)
    assert _described(WAN.lora_targets_for_conversion(load_lora_file(path)[0])) == _described(
        WAN.lora_candidates(dit))


def test_converting_a_wan_lora_to_diffusers_does_not_import_diffusers(tmp_path):
    """Start-up: the layer map comes from the name table, so convert_lora pays no diffusers import (~15 s here)."""
    import subprocess
    import sys

    from musubi_tuner.networks.lora_files import save_lora_file

    sd = {"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.ones(2, 256),
          "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.ones(256, 2)}
    save_lora_file(sd, tmp_path / "in.safetensors", None)
    code = ("import sys; from musubi_tuner.convert_lora import main; "
            f"main(['--input', {str(tmp_path / 'in.safetensors')!r}, '--output', {str(tmp_path / 'out.safetensors')!r}, "
            "'--target', 'diffusers', '--arch', 'wan']); print(sorted(m for m in ('diffusers', 'accelerate') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in load_lora_file(tmp_path / "out.safetensors")[0]


def test_conversion_of_a_lora_without_wan_blocks_names_the_problem():
    from musubi_tuner.errors import UserError

    with pytest.raises(UserError, match="is it a Wan LoRA"):
        WAN.lora_targets_for_conversion({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 8)})


# ---- the reference's exact layout ---------------------------------------------------------------------------------
def _reference_layout_file(tmp_path, dit, names, rank=4, alpha=2.0, seed=5):
    """Keys as the reference writes them: lora_unet_<name>.lora_down.weight / .lora_up.weight / .alpha (bf16)."""
    generator = torch.Generator().manual_seed(seed)
    modules = {t.original_name: t.parts[0].module for t in WAN.lora_candidates(dit)}
    sd = {}
    for name in names:
        stem = "lora_unet_" + name.replace(".", "_")
        layer = modules[name]
        sd[f"{stem}.lora_down.weight"] = torch.randn(rank, layer.in_features, generator=generator).to(torch.bfloat16)
        sd[f"{stem}.lora_up.weight"] = (0.1 * torch.randn(layer.out_features, rank, generator=generator)).to(
            torch.bfloat16)
        sd[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.bfloat16)
    path = tmp_path / "reference_layout.safetensors"
    save_safetensors_atomic(sd, path)
    return path, sd


def _expected_weight(weight, sd, name, multiplier=1.0):
    stem = "lora_unet_" + name.replace(".", "_")
    down, up = sd[f"{stem}.lora_down.weight"].float(), sd[f"{stem}.lora_up.weight"].float()
    scale = float(sd[f"{stem}.alpha"]) / down.shape[0]
    return weight.float() + (up @ down) * (multiplier * scale)


NAMES = ("blocks.0.self_attn.q", "blocks.1.cross_attn.k_img", "blocks.1.ffn.0")


@pytest.mark.parametrize("task", ("i2v-14B", "t2v-1.3B-FC"))
def test_reference_layout_loads_for_inference_exactly(task, tmp_path):
    dit = make_tiny_dit(task)
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    path, sd = _reference_layout_file(tmp_path, dit, NAMES)
    merge_loras_into_dit(WAN, dit, [str(path)], [1.0])
    after = dit.state_dict()
    changed = set()
    for name in NAMES:
        diffusers_key = next(t.parts[0].module_path for t in WAN.lora_candidates(dit) if t.original_name == name)
        expected = _expected_weight(before[f"{diffusers_key}.weight"], sd, name)
        assert torch.equal(after[f"{diffusers_key}.weight"], expected)  # scale = alpha/dim = 0.5, fp32 math
        changed.add(f"{diffusers_key}.weight")
    assert all(torch.equal(after[k], before[k]) for k in before if k not in changed)


def test_reference_layout_loads_for_continued_training(tmp_path):
    dit = make_tiny_dit("i2v-14B")
    path, sd = _reference_layout_file(tmp_path, dit, NAMES)
    network = lora.create_network(WAN, dit, 4, 1.0)  # alpha 1 at creation; the file's alpha 2 wins
    network.load_weights(str(path))
    by_name = {m.original_name: m for m in network.loras}
    assert len(by_name) == 24  # every block Linear; the 21 not in the file keep their (zero-up) init
    for name in NAMES:
        module = by_name[name]
        stem = module.lora_name
        assert torch.equal(module.lora_down.weight, sd[f"{stem}.lora_down.weight"].float())
        assert torch.equal(module.lora_up.weight, sd[f"{stem}.lora_up.weight"].float())
        assert float(module.alpha) == 2.0 and module.scale == 0.5
        weight = module._target.parts[0].module.weight
        assert torch.equal(weight.float() + module.weights().delta(), _expected_weight(weight, sd, name))
    inputs = _inputs("i2v-14B")
    network.apply_to()
    live = _forward(dit, inputs)
    network.remove()
    merged_dit = make_tiny_dit("i2v-14B")
    merge_loras_into_dit(WAN, merged_dit, [str(path)], [1.0])
    assert torch.allclose(live, _forward(merged_dit, inputs), atol=1e-5, rtol=0)


# ---- --save_merged_model ------------------------------------------------------------------------------------------
def test_save_merged_model_is_exact_and_loads(tmp_path):
    dit = make_tiny_dit("t2v-1.3B")
    base_path = tmp_path / "wan2.1_t2v_tiny_fp32.safetensors"
    save_wan_dit_original(dit, base_path)
    network, lora_path = _trainer_lora_file(tmp_path, "t2v-1.3B", dit)  # rank 4, alpha 2: scale 0.5
    network.remove()
    merged_path = tmp_path / "merged.safetensors"
    multiplier = 0.5  # with scale 0.5, every factor is a power of two: the order of products cannot matter
    args = argparse.Namespace(dit=str(base_path), lora_weight=[str(lora_path)], lora_multiplier=[multiplier],
                              include_patterns=None, exclude_patterns=None, save_merged_model=str(merged_path))
    save_merged_model(WAN, args)

    with safe_open(str(base_path), "pt") as f:
        base = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(merged_path), "pt") as f:
        merged = {k: f.get_tensor(k) for k in f.keys()}
    assert merged.keys() == base.keys()
    lora_sd, _ = load_lora_file(lora_path)
    touched = {f"{m.original_name}.weight" for m in network.loras}
    for key in base:
        if key in touched:
            expected = _expected_weight(base[key], lora_sd, key[: -len(".weight")], multiplier)
            assert merged[key].dtype == torch.float32 and torch.equal(merged[key], expected), key
        else:
            assert torch.equal(merged[key], base[key]), key

    loaded = load_wan_dit(merged_path, task="t2v-1.3B")
    in_memory = make_tiny_dit("t2v-1.3B")
    merge_loras_into_dit(WAN, in_memory, [str(lora_path)], [multiplier])
    loaded_sd, memory_sd = loaded.state_dict(), in_memory.state_dict()
    assert all(torch.equal(loaded_sd[k], memory_sd[k]) for k in memory_sd)
    inputs = _inputs("t2v-1.3B")
    assert_same_outputs(_forward(loaded, inputs), _forward(in_memory, inputs))
