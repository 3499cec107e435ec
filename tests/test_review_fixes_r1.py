"""Review round 1: output modes follow the umask, --fp8_t5 casts before the move, errors name file and flag."""

from __future__ import annotations

import argparse
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from musubi_tuner.architectures import get_architecture
from musubi_tuner.architectures.flux_kontext.tiny import tiny_flux_dit, write_tiny_flux_kontext_files
from musubi_tuner.errors import CheckpointError, UserError
from musubi_tuner.utils.atomic import atomic_directory, save_safetensors_atomic, write_text_atomic


# ---- 4: modes follow the umask ------------------------------------------------------------------------------------
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_files_and_folders_get_umask_modes(tmp_path, umask_022):
    write_text_atomic(tmp_path / "a.toml", "x")
    save_safetensors_atomic({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    with atomic_directory(tmp_path / "run-state") as tmp:
        (tmp / "inside.txt").write_text("y")
    assert _mode(tmp_path / "a.toml") == 0o644
    assert _mode(tmp_path / "w.safetensors") == 0o644
    assert _mode(tmp_path / "run-state") == 0o755
    assert os.umask(0o022) == 0o022  # the umask itself is left as it was


def test_a_stricter_umask_is_honoured(tmp_path):
    old = os.umask(0o077)
    try:
        write_text_atomic(tmp_path / "a.toml", "x")
        with atomic_directory(tmp_path / "s"):
            pass
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.toml") == 0o600
    assert _mode(tmp_path / "s") == 0o700


# ---- 5: --fp8_t5 casts on the CPU, then moves ---------------------------------------------------------------------
def _spy_cast(monkeypatch, target: str, devices: list):
    module_name, attr = target.rsplit(".", 1)
    import importlib

    real = getattr(importlib.import_module(module_name), attr)

    def spy(model, *args, **kwargs):
        devices.append({p.device.type for p in model.parameters()})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(target, spy)


def test_wan_fp8_t5_is_cast_before_it_is_moved(tmp_path, monkeypatch):
    from musubi_tuner.architectures.wan.text_encoder_files import load_umt5
    from musubi_tuner.architectures.wan.tiny_encoders import write_tiny_wan_encoder_files

    files = write_tiny_wan_encoder_files(tmp_path)
    devices: list = []
    _spy_cast(monkeypatch, "musubi_tuner.architectures.wan.text_encoder_files.cast_linear_weights_to_fp8", devices)
    # "meta" stands in for the GPU: weights there at cast time would mean full precision on the device.
    model = load_umt5(files["t5"], "meta", torch.bfloat16, fp8=True)
    assert devices == [{"cpu"}]
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn
    assert model.shared.weight.dtype == torch.bfloat16


def test_wan_t5_without_fp8_still_lands_on_device_in_dtype(tmp_path):
    from musubi_tuner.architectures.wan.text_encoder_files import load_umt5
    from musubi_tuner.architectures.wan.tiny_encoders import write_tiny_wan_encoder_files

    files = write_tiny_wan_encoder_files(tmp_path)
    model = load_umt5(files["t5"], "meta", torch.bfloat16, fp8=False)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.bfloat16)}


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    return write_tiny_flux_kontext_files(tmp_path_factory.mktemp("fk_r1"))


def test_flux_fp8_t5_is_cast_before_it_is_moved(flux_files, monkeypatch):
    from musubi_tuner.architectures.flux_kontext.text_encoder_files import load_t5xxl

    devices: list = []
    _spy_cast(monkeypatch, "musubi_tuner.memory.fp8.cast_linear_weights_to_fp8", devices)
    model = load_t5xxl(flux_files["t5"], device="meta", dtype=torch.bfloat16, fp8=True)
    assert devices == [{"cpu"}]
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn
    assert model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.bfloat16


# ---- 10: errors name the file and the flag ------------------------------------------------------------------------
def test_flux_dit_flag_given_another_file_names_path_and_flag(tmp_path, flux_files):
    from musubi_tuner.architectures.flux_kontext.dit_files import load_flux_dit

    wrong = tmp_path / "wan2.1_t2v.safetensors"
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, str(wrong))
    with pytest.raises(CheckpointError) as info:
        load_flux_dit(wrong)
    assert str(wrong) in str(info.value) and "--dit" in str(info.value)
    assert "not a FLUX DiT" in str(info.value)
    with pytest.raises(CheckpointError) as info:
        load_flux_dit(flux_files["ae"])  # the AE passed as --dit
    assert str(flux_files["ae"]) in str(info.value) and "--dit" in str(info.value)


def test_flux_vae_flag_given_another_file_names_path_and_flag(flux_files):
    from musubi_tuner.architectures.flux_kontext.ae_files import load_flux_ae

    with pytest.raises(CheckpointError) as info:
        load_flux_ae(flux_files["dit"])  # the DiT passed as --vae
    assert str(flux_files["dit"]) in str(info.value) and "--vae" in str(info.value)
    assert "not an autoencoder" in str(info.value)


def _wan_style_lora() -> dict[str, torch.Tensor]:
    stem = "lora_unet_blocks_0_self_attn_q"
    return {
        f"{stem}.lora_down.weight": torch.zeros(2, 8),
        f"{stem}.lora_up.weight": torch.zeros(8, 2),
        f"{stem}.alpha": torch.tensor(2.0),
    }


def test_wrong_architecture_lora_names_source_and_module_stems():
    from musubi_tuner.networks.lora import create_network_from_weights

    arch = get_architecture("flux_kontext")
    with pytest.raises(CheckpointError) as info:
        create_network_from_weights(arch, tiny_flux_dit(0), _wan_style_lora(), source="--network_weights wan.st")
    msg = str(info.value)
    assert "--network_weights wan.st" in msg
    assert "'lora_unet_blocks_0_self_attn_q'" in msg and "1 LoRA module(s)" in msg
    assert ".down'" not in msg and ".up'" not in msg and ".alpha'" not in msg


def test_load_weights_from_a_path_names_the_path_and_stems(tmp_path):
    from musubi_tuner.networks.lora import create_network

    dit = tiny_flux_dit(0)
    network = create_network(get_architecture("flux_kontext"), dit, 2, 1.0)
    path = tmp_path / "wan_lora.safetensors"
    save_file(_wan_style_lora(), str(path))
    with pytest.raises(CheckpointError) as info:
        network.load_weights(path)
    assert str(path) in str(info.value) and "'lora_unet_blocks_0_self_attn_q'" in str(info.value)
    with pytest.raises(CheckpointError, match="^--network_weights x: "):
        network.load_weights(_wan_style_lora(), source="--network_weights x")


@pytest.mark.parametrize("flag", ["--lora_weight", "--base_weights"])
def test_merging_a_wrong_architecture_lora_names_path_and_flag(tmp_path, flag):
    from musubi_tuner.inference.lora_merge import merge_loras_into_dit

    path = tmp_path / "wan_lora.safetensors"
    save_file(_wan_style_lora(), str(path))
    with pytest.raises(CheckpointError) as info:
        merge_loras_into_dit(get_architecture("flux_kontext"), tiny_flux_dit(0), [str(path)], [1.0], flag=flag)
    assert f"{flag} {path}" in str(info.value)


def test_save_merged_model_names_the_failing_lora_file(tmp_path, flux_files):
    from musubi_tuner.inference.lora_merge import save_merged_model

    path = tmp_path / "wan_lora.safetensors"
    save_file(_wan_style_lora(), str(path))
    args = argparse.Namespace(dit=str(flux_files["dit"]), lora_weight=[str(path)], lora_multiplier=[1.0],
                              include_patterns=None, exclude_patterns=None,
                              save_merged_model=str(tmp_path / "merged.safetensors"))
    with pytest.raises(CheckpointError) as info:
        save_merged_model(get_architecture("flux_kontext"), args)
    assert f"--lora_weight {path}" in str(info.value)
    assert not (tmp_path / "merged.safetensors").exists()


@pytest.mark.parametrize("flag", ["--image_path", "--end_image_path"])
def test_missing_or_broken_conditioning_image_names_path_and_flag(tmp_path, flag):
    from musubi_tuner.inference.images import load_image_resized

    with pytest.raises(UserError) as info:
        load_image_resized("nope.png", 16, 16, flag=flag)
    assert "nope.png" in str(info.value) and flag in str(info.value)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(UserError) as info:
        load_image_resized(broken, 16, 16, flag=flag)
    assert str(broken) in str(info.value) and flag in str(info.value)


def test_load_image_resized_defaults_to_image_path_and_still_loads(tmp_path):
    from musubi_tuner.inference.images import load_image_resized

    with pytest.raises(UserError, match="--image_path"):
        load_image_resized(tmp_path / "missing.png", 16, 16)
    good = tmp_path / "good.png"
    Image.fromarray(np.full((20, 24, 3), 7, dtype=np.uint8)).save(good)
    out = load_image_resized(good, 16, 16)
    assert out.shape == (16, 16, 3) and out.dtype == torch.uint8 and int(out[0, 0, 0]) == 7


def test_missing_control_image_names_path_and_flag(tmp_path):
    from musubi_tuner.architectures.flux_kontext.control import load_control_image

    with pytest.raises(UserError) as info:
        load_control_image("nope.png", resize_to_preferred=False)
    assert "nope.png" in str(info.value) and "--control_image_path" in str(info.value)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"junk")
    with pytest.raises(UserError, match="--ci .*broken.png"):
        load_control_image(broken, resize_to_preferred=False, flag="--ci")
