"""FLUX autoencoder files: BFL ae.safetensors layout <-> diffusers AutoencoderKL, latent scaling."""

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from musubi_tuner.architectures.flux_kontext.ae_files import (
    bfl_ae_to_diffusers,
    decode_flux_latents,
    encode_flux_latents,
    flux_ae_to_bfl,
    infer_flux_ae_config,
    load_flux_ae,
)
from musubi_tuner.architectures.flux_kontext.tiny import TINY_AE_CONFIG, tiny_flux_ae
from musubi_tuner.errors import CheckpointError

REAL_AE = {
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


def test_real_size_layout_round_trips_through_diffusers_converter():
    with torch.device("meta"):
        sd = AutoencoderKL.from_config(REAL_AE).state_dict()
    bfl = flux_ae_to_bfl(sd)
    assert len(bfl) == len(sd) == 244
    # Names of the original BFL autoencoder, including the 1x1-conv attention and reversed decoder levels.
    assert bfl["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert bfl["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert "encoder.down.3.downsample.conv.weight" not in bfl and "decoder.up.3.upsample.conv.weight" in bfl
    config = infer_flux_ae_config(bfl)
    assert config["block_out_channels"] == (128, 256, 512, 512) and config["layers_per_block"] == 2
    assert config["latent_channels"] == 16 and not config["use_quant_conv"]
    assert (config["scaling_factor"], config["shift_factor"]) == (0.3611, 0.1159)
    back = bfl_ae_to_diffusers(bfl)
    assert set(back) == set(sd) and all(back[k].shape == sd[k].shape for k in sd)


def test_tiny_round_trip_is_exact_and_config_is_inferred():
    sd = tiny_flux_ae().state_dict()
    bfl = flux_ae_to_bfl(sd)
    assert infer_flux_ae_config(bfl) == TINY_AE_CONFIG
    back = bfl_ae_to_diffusers(bfl)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    assert all(torch.equal(flux_ae_to_bfl(back)[k], bfl[k]) for k in bfl)


def test_loaded_ae_matches_source_and_applies_flux_scaling(tmp_path):
    source = tiny_flux_ae()
    path = tmp_path / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in flux_ae_to_bfl(source.state_dict()).items()}, str(path))
    ae = load_flux_ae(path, dtype=torch.float32)
    assert not ae.training and not any(p.requires_grad for p in ae.parameters())
    pixels = torch.rand(1, 3, 64, 48) * 2 - 1
    latents = encode_flux_latents(ae, pixels, sample=False)
    assert latents.shape == (1, 16, 8, 6)
    with torch.no_grad():
        mean = source.encode(pixels).latent_dist.mode()
        assert torch.equal(latents, (mean - 0.1159) * 0.3611)
        assert torch.equal(decode_flux_latents(ae, latents), source.decode(latents / 0.3611 + 0.1159).sample)


def test_sampling_uses_the_generator():
    ae = tiny_flux_ae()
    pixels = torch.zeros(1, 3, 32, 32)
    a = encode_flux_latents(ae, pixels, generator=torch.Generator().manual_seed(3))
    b = encode_flux_latents(ae, pixels, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, encode_flux_latents(ae, pixels, sample=False))


def test_non_ae_file_is_refused(tmp_path):
    path = tmp_path / "dit.safetensors"
    save_file({"img_in.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(CheckpointError, match="--vae"):
        load_flux_ae(path)
