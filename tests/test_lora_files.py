"""LoRA file layouts: exact conversions both ways, fused-layer split/fuse, hashes, metadata, ComfyUI key coverage."""

import hashlib
import json

import pytest
import torch
from _lora_toy import ToyArch, ToyDiT, comfy_unconsumed_keys, randomize_lora
from safetensors import safe_open

from musubi_tuner import convert_lora
from musubi_tuner.networks import lora
from musubi_tuner.networks.lora_files import (
    NameIndex,
    build_training_metadata,
    convert_state_dict,
    detect_format,
    load_lora_file,
    parse_lora_state_dict,
    save_lora_file,
)
from musubi_tuner.networks.lora_formats import LoraWeights, fuse_parts
from musubi_tuner.utils.atomic import save_safetensors_atomic


@pytest.fixture
def toy():
    dit = ToyDiT(depth=2)
    # alpha = rank / 4: sqrt(scale) = 0.5 is exact in binary, so baking alpha in loses no bits
    net = lora.create_network(ToyArch(), dit, 4, 1.0)
    randomize_lora(net)
    targets = ToyArch().lora_candidates(dit)
    original = ToyArch().dit_state_dict_to_original(dit.state_dict())
    return net.state_dict_reference(), targets, original


def _deltas(sd, index):
    canonical, unmatched = parse_lora_state_dict(sd, index)
    assert not unmatched
    return {name: w.delta() for name, w in canonical.items()}


def test_default_to_other_bakes_alpha_exactly(toy):
    sd, targets, _ = toy
    index = NameIndex(targets=targets)
    other = convert_state_dict(sd, "other", index)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in other
    assert not any(k.endswith(".alpha") for k in other)
    down = sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    assert torch.equal(other["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"], down * 0.5)
    assert detect_format(other, index) == "other"
    ref, got = _deltas(sd, index), _deltas(other, index)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_fused_layer_splits_to_diffusers_and_fuses_back_exactly(toy):
    sd, targets, _ = toy
    index = NameIndex(targets=targets)
    diff = convert_state_dict(sd, "diffusers", index)
    a = [diff[f"transformer.blocks.0.{p}.lora_A.weight"] for p in ("to_q", "to_k", "to_v")]
    b = [diff[f"transformer.blocks.0.{p}.lora_B.weight"] for p in ("to_q", "to_k", "to_v")]
    assert torch.equal(a[0], a[1]) and torch.equal(a[1], a[2])
    up = sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert torch.equal(torch.cat(b), up * 0.5)
    assert detect_format(diff, index) == "diffusers"
    back = convert_state_dict(diff, "default", index)
    assert set(back) == set(sd)
    assert back["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (4, 8)  # same rank, not 3x
    ref, got = _deltas(sd, index), _deltas(back, index)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_round_trip_default_other_diffusers_default(toy):
    sd, targets, _ = toy
    index = NameIndex(targets=targets)
    step = sd
    for fmt in ("other", "diffusers", "other", "default", "diffusers", "default"):
        step = convert_state_dict(step, fmt, index)
    ref, got = _deltas(sd, index), _deltas(step, index)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_separately_trained_parts_are_rank_concatenated(toy):
    _, targets, _ = toy
    qkv = targets[0]
    gen = torch.Generator().manual_seed(0)
    parts = {
        i: LoraWeights(torch.randn(2 + i, 8, generator=gen), torch.randn(8, 2 + i, generator=gen)) for i in range(3)
    }
    parts[1].alpha = torch.tensor(1.5)  # one part with its own alpha: its scale goes into its up block
    fused = fuse_parts(qkv, parts)
    assert fused.rank == 2 + 3 + 4 and fused.alpha is None
    expected = torch.cat([parts[i].delta() for i in range(3)])
    assert torch.allclose(fused.delta(), expected, atol=1e-6, rtol=0)
    only_q = fuse_parts(qkv, {0: parts[0]})  # absent parts are zero rows
    assert torch.equal(only_q.delta()[8:], torch.zeros(16, 8))


def test_peft_adapter_names_and_prefixless_keys_parse(toy):
    sd, targets, _ = toy
    index = NameIndex(targets=targets)
    diff = convert_state_dict(sd, "diffusers", index, prefix="-", adapter_name="default")
    assert "blocks.0.to_q.lora_A.default.weight" in diff
    ref, got = _deltas(sd, index), _deltas(diff, index)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_our_files_leave_no_comfyui_key_unloaded(toy, tmp_path):
    sd, targets, original = toy
    index = NameIndex(targets=targets)
    for fmt in ("default", "other"):
        path = tmp_path / f"{fmt}.safetensors"
        save_lora_file(convert_state_dict(sd, fmt, index), path)
        written, _ = load_lora_file(path)
        assert comfy_unconsumed_keys(written, original) == [], fmt
    # the diffusers layout names diffusers modules: ComfyUI's generic rule does not resolve them (documented limit)
    assert comfy_unconsumed_keys(convert_state_dict(sd, "diffusers", index), original)


def test_name_recovery_uses_known_names_not_string_rules(toy):
    sd, _targets, original = toy
    by_keys = NameIndex([k[:-7] for k in original if k.endswith(".weight")])
    other = convert_state_dict(sd, "other", by_keys)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in other
    guessed = convert_state_dict(sd, "other")  # the reference's string rules: HunyuanVideo spelling
    assert "diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight" in guessed


def test_hashes_match_the_definition_and_the_file(toy, tmp_path):
    sd, _, _ = toy
    path = tmp_path / "lora.safetensors"
    save_lora_file(sd, path, {"ss_network_dim": "4", "modelspec.title": "t"}, dtype=torch.bfloat16)
    _, meta = load_lora_file(path)
    raw = path.read_bytes()
    data = raw[8 + int.from_bytes(raw[:8], "little") :]
    assert meta["sshs_model_hash"] == hashlib.sha256(data).hexdigest()  # header excluded, so title edits keep it
    assert meta["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]  # file smaller than 1 MiB
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16


def test_training_metadata_keys():
    args = {
        "network_module": "networks.lora_toy", "network_dim": 4, "network_alpha": 2.0, "seed": 42,
        "network_args": ["loraplus_lr_ratio=4", "exclude_patterns=['.*a=b.*']"], "training_comment": "hi",
        "output_name": "mylora", "learning_rate": 1e-4, "metadata_reso": "512,384", "dit": "/x/y/dit.safetensors",
    }  # fmt: skip
    meta = build_training_metadata(args, ToyArch(), steps=10, epoch=2, timestamp=1_700_000_000)
    for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_training_comment", "ss_output_name",
                "ss_seed", "ss_learning_rate", "ss_steps", "ss_epoch", "ss_base_model_version", "ss_sd_model_name",
                "modelspec.sai_model_spec", "modelspec.implementation", "modelspec.date"):  # fmt: skip
        assert key in meta, key
    assert json.loads(meta["ss_network_args"]) == {"loraplus_lr_ratio": "4", "exclude_patterns": "['.*a=b.*']"}
    assert (
        meta["ss_base_model_version"] == "toy"
        and meta["ss_steps"] == "10"
        and meta["ss_sd_model_name"] == "dit.safetensors"
    )
    assert meta["modelspec.architecture"] == "toy-1/lora" and meta["modelspec.title"] == "mylora"
    assert meta["modelspec.resolution"] == "512x384"
    minimal = build_training_metadata({**args, "no_metadata": True}, ToyArch(), timestamp=1_700_000_000)
    assert {k for k in minimal if k.startswith("ss_")} == {
        "ss_base_model_version",
        "ss_network_module",
        "ss_network_dim",
        "ss_network_alpha",
        "ss_network_args",
    }


def test_convert_cli(toy, tmp_path, monkeypatch, capsys):
    sd, targets, original = toy
    src = tmp_path / "in.safetensors"
    save_lora_file(sd, src, {"ss_network_dim": "4"})
    dit_file = tmp_path / "dit.safetensors"
    save_safetensors_atomic(original, dit_file)
    out = tmp_path / "other.safetensors"
    convert_lora.main(["--input", str(src), "--output", str(out), "--target", "other", "--dit", str(dit_file)])
    other, meta = load_lora_file(out)
    assert "diffusion_model.double_blocks.1.img_mlp.0.lora_B.weight" in other and meta["ss_network_dim"] == "4"
    with pytest.raises(SystemExit) as exit_info:  # the console entry prints the error as one line, exit 2
        convert_lora.main(["--input", str(src), "--output", str(out), "--target", "diffusers"])
    assert exit_info.value.code == 2 and "--arch" in capsys.readouterr().err
    monkeypatch.setattr(convert_lora, "targets_for_arch", lambda arch, lora_sd: targets)
    diff_path = tmp_path / "diff.safetensors"
    convert_lora.main(["--input", str(out), "--output", str(diff_path), "--target", "diffusers", "--arch", "toy"])
    back_path = tmp_path / "back.safetensors"
    convert_lora.main(["--input", str(diff_path), "--output", str(back_path), "--target", "default", "--arch", "toy"])
    back, meta = load_lora_file(back_path)
    index = NameIndex(targets=targets)
    ref, got = _deltas(sd, index), _deltas(back, index)
    assert all(torch.equal(ref[k], got[k]) for k in ref) and "sshs_model_hash" in meta
