"""Merging LoRAs into an original-layout checkpoint: exact math, several LoRAs, any layout, errors, the CLI."""

import pytest
import torch
from _lora_toy import DIM, ToyArch, ToyDiT, forward_with_lora, randomize_lora
from safetensors.torch import load_file

from musubi_tuner import merge_lora
from musubi_tuner.errors import CheckpointError
from musubi_tuner.networks import lora
from musubi_tuner.networks.lora_files import NameIndex, convert_state_dict, save_lora_file
from musubi_tuner.networks.merge import merge_lora_into_original_state_dict
from musubi_tuner.utils.atomic import save_safetensors_atomic


def _setup(dim=4, alpha=3.0, seed=1):
    dit = ToyDiT(depth=2)
    net = lora.create_network(ToyArch(), dit, dim, alpha)
    randomize_lora(net, seed)
    original = ToyArch().dit_state_dict_to_original(dit.state_dict())
    return dit, net, original


def _expected(original, lora_sd, multiplier):
    out = dict(original)
    for key in lora_sd:
        if key.endswith(".lora_down.weight"):
            stem = key[: -len(".lora_down.weight")]
            name = {"lora_unet_" + k[:-7].replace(".", "_"): k for k in original if k.endswith(".weight")}[stem]
            down, up = lora_sd[key].float(), lora_sd[f"{stem}.lora_up.weight"].float()
            scale = float(lora_sd[f"{stem}.alpha"]) / down.shape[0]
            out[name] = (out[name].float() + (up @ down) * (multiplier * scale)).to(out[name].dtype)
    return out


def test_merge_is_exact_in_fp32_and_bf16():
    _, net, original = _setup()
    sd = net.state_dict_reference()
    for dtype in (torch.float32, torch.bfloat16):
        base = {k: v.to(dtype) for k, v in original.items()}
        expected = _expected(base, sd, 0.8)
        merged = merge_lora_into_original_state_dict(dict(base), sd, 0.8)
        assert merged.keys() == base.keys()
        assert all(torch.equal(merged[k], expected[k]) and merged[k].dtype == dtype for k in base)
        untouched = "double_blocks.0.img_mod.lin.weight"  # excluded by default: no LoRA, unchanged
        assert torch.equal(merged[untouched], base[untouched])


def test_merged_checkpoint_reproduces_the_lora_forward():
    dit, net, original = _setup()
    x = torch.randn(2, 5, DIM)
    live = forward_with_lora(dit, net, x, 0.6)
    merged = merge_lora_into_original_state_dict(dict(original), net.state_dict_reference(), 0.6)
    fresh = ToyDiT(depth=2)
    fresh.load_state_dict(ToyArch().original_to_dit(merged))
    with torch.no_grad():
        assert torch.allclose(fresh(x), live, atol=1e-6, rtol=0)


def test_several_loras_with_their_multipliers():
    _, net_a, original = _setup(seed=1)
    _, net_b, _ = _setup(dim=2, alpha=1.0, seed=2)
    a, b = net_a.state_dict_reference(), net_b.state_dict_reference()
    expected = _expected(_expected(original, a, 0.5), b, -1.25)
    merged = merge_lora_into_original_state_dict(dict(original), [a, b], [0.5, -1.25])
    assert all(torch.equal(merged[k], expected[k]) for k in original)


def test_any_layout_merges_the_same():
    dit, net, original = _setup(dim=4, alpha=1.0)  # alpha = rank/4: baked formats are bit-identical
    sd = net.state_dict_reference()
    targets = ToyArch().lora_candidates(dit)
    reference = merge_lora_into_original_state_dict(dict(original), sd, 1.0)
    for fmt in ("other", "diffusers"):
        converted = convert_state_dict(sd, fmt, NameIndex(targets=targets))
        merged = merge_lora_into_original_state_dict(dict(original), converted, 1.0, targets=targets)
        assert all(torch.equal(merged[k], reference[k]) for k in original), fmt


def test_comfy_prefixed_base_checkpoint():
    _, net, original = _setup()
    sd = net.state_dict_reference()
    prefixed = {f"model.diffusion_model.{k}": v for k, v in original.items()}
    merged = merge_lora_into_original_state_dict(prefixed, sd, 1.0)
    expected = _expected(original, sd, 1.0)
    assert all(torch.equal(merged[f"model.diffusion_model.{k}"], expected[k]) for k in original)


def test_lora_modules_absent_from_base_are_named():
    _, net, original = _setup()
    sd = net.state_dict_reference()
    del original["double_blocks.1.img_mlp.2.weight"]
    with pytest.raises(CheckpointError, match=r"double_blocks\.1\.img_mlp\.2|lora_unet_double_blocks_1_img_mlp_2"):
        merge_lora_into_original_state_dict(original, sd, 1.0)
    small = {
        k: v[: v.shape[0] // 2] if k == "double_blocks.0.img_attn.proj.weight" else v for k, v in _setup()[2].items()
    }
    with pytest.raises(CheckpointError, match="model size"):
        merge_lora_into_original_state_dict(small, sd, 1.0)


def test_merge_lora_cli(tmp_path):
    _, net_a, original = _setup(seed=1)
    _, net_b, _ = _setup(seed=2)
    dit_path, a_path, b_path, out = (
        tmp_path / n for n in ("dit.safetensors", "a.safetensors", "b.safetensors", "m.safetensors")
    )
    save_safetensors_atomic(original, dit_path)
    save_lora_file(net_a.state_dict_reference(), a_path)
    save_lora_file(net_b.state_dict_reference(), b_path)
    merge_lora.main(["--dit", str(dit_path), "--lora_weight", str(a_path), str(b_path),
                     "--lora_multiplier", "0.5", "--save_merged_model", str(out), "--device", "cpu"])  # fmt: skip
    expected = _expected(_expected(original, net_a.state_dict_reference(), 0.5), net_b.state_dict_reference(), 1.0)
    merged = load_file(str(out))
    assert all(torch.equal(merged[k], expected[k]) for k in original)
