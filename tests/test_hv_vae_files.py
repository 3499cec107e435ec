"""HunyuanVideo VAE files (official .pt, ComfyUI), config from the weights, chunking/tiling against the plain
VAE, latent scaling, wrong files."""

import pytest
import torch
from safetensors.torch import save_file

from musubi_tuner.errors import CheckpointError, UserError
from musubi_tuner.models.hunyuan_video.tiny_vae import TINY_VAE_CONFIG, tiny_hv_vae, write_tiny_hv_vae
from musubi_tuner.models.hunyuan_video.vae_files import (
    HV_VAE_SCALING_FACTOR,
    configure_hv_vae_memory,
    decode_hv_latents,
    encode_hv_latents,
    infer_hv_vae_config,
    load_hv_vae,
    set_causal_conv_chunk_size,
)


def _video(frames=9, size=32, seed=2):
    gen = torch.Generator().manual_seed(seed)
    # smooth content, like real frames: tile seams stay small
    base = torch.randn(1, 3, 1, size // 8, size // 8, generator=gen)
    video = torch.nn.functional.interpolate(base, size=(frames, size, size), mode="trilinear")
    return video.clamp(-1, 1)


@pytest.mark.parametrize("layout", ["official_pt", "comfy"])
def test_tiny_vae_files_load_strictly_to_identical_outputs(tmp_path, layout):
    source = tiny_hv_vae()
    path = write_tiny_hv_vae(tmp_path, layout)
    vae = load_hv_vae(path, dtype=torch.float32)
    assert dict(vae.config) == dict(source.config)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    video = _video(frames=5, size=16)
    configure_hv_vae_memory(source)
    z = encode_hv_latents(vae, video, sample=False)
    assert z.shape == (1, 16, 2, 2, 2)
    torch.testing.assert_close(z, encode_hv_latents(source, video, sample=False), rtol=0, atol=1e-6)


def test_released_config_from_meta_weights():
    from diffusers import AutoencoderKLHunyuanVideo

    with torch.device("meta"):
        sd = AutoencoderKLHunyuanVideo.from_config({}).state_dict()
    config = infer_hv_vae_config(sd)
    assert config["block_out_channels"] == (128, 256, 512, 512) and config["layers_per_block"] == 2
    assert config["norm_num_groups"] == 32 and config["latent_channels"] == 16
    assert infer_hv_vae_config(tiny_hv_vae().state_dict()) == TINY_VAE_CONFIG


def test_chunked_causal_convs_are_exact():
    """Same arithmetic per output frame; only the conv kernels' blocking differs (float rounding, < 1e-4)."""
    vae = tiny_hv_vae()
    configure_hv_vae_memory(vae)
    video = _video(frames=13, size=16)
    plain = encode_hv_latents(vae, video, sample=False)
    decoded = decode_hv_latents(vae, plain)
    assert set_causal_conv_chunk_size(vae, 2) > 0
    torch.testing.assert_close(encode_hv_latents(vae, video, sample=False), plain, rtol=0, atol=1e-4)
    torch.testing.assert_close(decode_hv_latents(vae, plain), decoded, rtol=0, atol=1e-4)


def test_spatial_tiling_runs_with_the_reference_tiles():
    """Tiles of 32 px (stride 24) over a 64 px video run diffusers' tiled encoder with the reference's tile and
    overlap. Seams are blended and GroupNorm statistics are per tile, so tiled output is only close to the plain
    one for trained weights; on this random tiny VAE it is not (relative RMS ~0.9), so no closeness is claimed
    here: the exact checks are that a tile as large as the video leaves the output bit-identical and that
    temporal tiling stays off (the reference never tiles in time)."""
    vae = tiny_hv_vae()
    configure_hv_vae_memory(vae)
    video = _video(frames=1, size=64)
    plain = encode_hv_latents(vae, video, sample=False)
    calls = []
    original_tiled = vae.tiled_encode
    vae.tiled_encode = lambda x: calls.append(x.shape) or original_tiled(x)
    configure_hv_vae_memory(vae, spatial_tile_sample_min_size=32)
    assert vae.use_tiling and vae.tile_sample_stride_height == 24 and not vae.use_framewise_encoding
    tiled = encode_hv_latents(vae, video, sample=False)
    assert calls, "the tiled encoder did not run"
    assert tiled.shape == plain.shape and torch.isfinite(tiled).all()
    # a tile as large as the video: tiling does not trigger, the output is the plain one
    configure_hv_vae_memory(vae, spatial_tile_sample_min_size=64)
    torch.testing.assert_close(encode_hv_latents(vae, video, sample=False), plain, rtol=0, atol=0)
    configure_hv_vae_memory(vae, tiling=True)
    assert vae.tile_sample_min_height == 256 and vae.tile_sample_stride_height == 192


def test_scaling_is_applied_on_decode_only():
    vae = tiny_hv_vae()
    configure_hv_vae_memory(vae)
    z = torch.randn(1, 16, 2, 4, 4)
    direct = vae.decode(z).sample
    torch.testing.assert_close(decode_hv_latents(vae, z * HV_VAE_SCALING_FACTOR), direct, rtol=1e-5, atol=1e-5)


def test_bad_switch_values_are_user_errors():
    vae = tiny_hv_vae()
    with pytest.raises(UserError, match="--vae_chunk_size 0"):
        configure_hv_vae_memory(vae, chunk_size=0)
    with pytest.raises(UserError, match="--vae_spatial_tile_sample_min_size 30"):
        configure_hv_vae_memory(vae, spatial_tile_sample_min_size=30)


def test_wrong_file_is_named(tmp_path):
    path = tmp_path / "dit.safetensors"
    save_file({"double_blocks.0.img_attn_qkv.weight": torch.zeros(3, 1)}, str(path))
    with pytest.raises(CheckpointError, match=r"--vae .* is a HunyuanVideo DiT; --vae expects the HunyuanVideo VAE"):
        load_hv_vae(path)


@pytest.mark.parametrize("layout", ["official_pt", "comfy"])
def test_merge_lora_names_the_hv_vae_given_as_dit(tmp_path, layout, capsys):
    """The official VAE .pt wraps its keys in `vae.`: a VAE passed as --dit is still named, before any LoRA check."""
    from musubi_tuner import merge_lora
    from musubi_tuner.networks.lora_files import save_lora_file

    vae = write_tiny_hv_vae(tmp_path / "vae", layout)
    lora = tmp_path / "lora.safetensors"
    save_lora_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 8),
                    "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(24, 2)}, lora, None)
    with pytest.raises(SystemExit) as exit_info:
        merge_lora.main(["--dit", str(vae), "--lora_weight", str(lora), "--save_merged_model",
                         str(tmp_path / "merged.safetensors")])
    assert exit_info.value.code == 2
    assert "this looks like a HunyuanVideo VAE, not a DiT" in capsys.readouterr().err
