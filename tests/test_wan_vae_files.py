"""Wan VAE files: original <-> diffusers keys, tiny save/load giving identical encode/decode, config inference,
wrong files, and the latent normalisation used by diffusers' Wan pipelines."""

import pytest
import torch

from musubi_tuner.architectures.wan.tiny import make_tiny_dit, make_tiny_vae, tiny_vae_config
from musubi_tuner.architectures.wan.vae_files import (
    denormalize_latents,
    infer_wan_vae_config,
    load_wan_vae,
    normalize_latents,
    save_wan_vae_original,
    wan_vae_to_diffusers,
    wan_vae_to_original,
)
from musubi_tuner.errors import CheckpointError
from musubi_tuner.models.checkpoint_io import read_safetensors_keys, save_state_dict


def _meta_vae(**config):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan

    with init_empty_weights():
        return AutoencoderKLWan.from_config(config)


def test_key_map_round_trip_at_real_size():
    sd = _meta_vae().state_dict()  # published config: base_dim 96, z_dim 16
    assert len(sd) == 194
    original = wan_vae_to_original(sd)
    assert len(original) == 194
    for key in ("encoder.conv1.weight", "conv1.weight", "conv2.bias", "decoder.upsamples.4.shortcut.weight",
                "decoder.upsamples.3.resample.1.weight", "decoder.upsamples.14.residual.6.bias",
                "encoder.downsamples.5.time_conv.weight", "decoder.middle.1.to_qkv.weight", "decoder.head.2.weight"):
        assert key in original, key
    back = wan_vae_to_diffusers(original)
    assert set(back) == set(sd) and all(back[k] is sd[k] for k in sd)
    assert infer_wan_vae_config(original) == {"base_dim": 96, "z_dim": 16, "decoder_base_dim": None}


def test_unknown_keys_are_refused_on_save():
    with pytest.raises(ValueError, match="no original Wan VAE name for 'encoder.extra.weight'"):
        wan_vae_to_original({"encoder.extra.weight": torch.zeros(1)})


def _video(generator):
    return torch.rand(1, 3, 5, 16, 16, generator=generator) * 2 - 1


@pytest.mark.parametrize("name", ["wan_2.1_vae.safetensors", "Wan2.1_VAE.pth"])
def test_tiny_vae_round_trip_gives_identical_encode_and_decode(tmp_path, name):
    source = make_tiny_vae(seed=2)
    save_wan_vae_original(source, tmp_path / name)
    loaded = load_wan_vae(tmp_path / name)
    assert loaded.config.base_dim == tiny_vae_config()["base_dim"] and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    video = _video(torch.Generator().manual_seed(0))
    with torch.no_grad():
        z_src, z_new = source.encode(video).latent_dist.mode(), loaded.encode(video).latent_dist.mode()
        assert z_src.shape == (1, 16, 2, 2, 2)
        assert torch.equal(z_new, z_src)
        assert torch.equal(loaded.decode(z_new).sample, source.decode(z_src).sample)


def test_saved_vae_has_original_keys_and_dtype(tmp_path):
    save_wan_vae_original(make_tiny_vae(), tmp_path / "v.safetensors", dtype=torch.bfloat16)
    keys = read_safetensors_keys(tmp_path / "v.safetensors")
    assert "decoder.middle.0.residual.0.gamma" in keys and "post_quant_conv.weight" not in keys
    vae = load_wan_vae(tmp_path / "v.safetensors", dtype=torch.bfloat16)
    assert vae.dtype == torch.bfloat16


def test_diffusers_layout_vae_loads(tmp_path):
    source = make_tiny_vae()
    save_state_dict(source.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    loaded = load_wan_vae(tmp_path / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), source.state_dict().values()))


def test_wan22_vae_is_refused_with_the_expected_file():
    meta = {k: torch.empty(v.shape, device="meta") for k, v in wan_vae_to_original(_meta_vae().state_dict()).items()}
    meta["conv2.weight"] = torch.empty(48, 48, 1, 1, 1, device="meta")
    expected = r"48-channel VAE \(Wan2.2_VAE.pth.*Wan2.1_VAE.pth or wan_2.1_vae.safetensors"
    with pytest.raises(CheckpointError, match=expected):
        infer_wan_vae_config(meta, source="Wan2.2_VAE.pth")


def test_dit_passed_as_vae(tmp_path):
    from musubi_tuner.architectures.wan.dit_files import save_wan_dit_original

    save_wan_dit_original(make_tiny_dit(), tmp_path / "dit.safetensors")
    with pytest.raises(CheckpointError, match=r"--vae .*dit.safetensors looks like a Wan DiT.*Wan2.1_VAE.pth"):
        load_wan_vae(tmp_path / "dit.safetensors")


def test_latent_normalisation_matches_the_pipeline_math():
    vae = make_tiny_vae()
    z = torch.randn(2, 16, 3, 4, 4)
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    assert torch.equal(normalize_latents(vae, z), (z - mean) * inv_std)  # WanImageToVideoPipeline.prepare_latents
    assert torch.equal(denormalize_latents(vae, z), z / inv_std + mean)  # WanPipeline decode step
    assert torch.allclose(denormalize_latents(vae, normalize_latents(vae, z)), z, atol=1e-5)
    assert torch.equal(normalize_latents(vae, z[0]), normalize_latents(vae, z)[0])  # unbatched (C, F, H, W)
    assert normalize_latents(vae, z.to(torch.bfloat16)).dtype == torch.bfloat16
    # channel 7 has mean 1.5508 and std 2.0743 in the published config
    one = torch.zeros(1, 16, 1, 1, 1)
    one[0, 7] = 1.5508 + 2.0743
    assert torch.allclose(normalize_latents(vae, one)[0, 7], torch.ones(1, 1, 1))
