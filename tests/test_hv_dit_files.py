"""HunyuanVideo DiT files: official <-> diffusers conversion (against diffusers' converter at width 3072), config
inference, the official `.pt` / ComfyUI / fp8 / SkyReels / diffusers files, wrong files."""

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel
from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers
from safetensors.torch import save_file

from musubi_tuner.architectures.hunyuan_video.dit_files import (
    hv_diffusers_to_original,
    hv_original_to_diffusers,
    infer_hv_config,
    load_hv_dit,
    save_hv_dit_original,
)
from musubi_tuner.architectures.hunyuan_video.tiny import TINY_DIT_CONFIG, tiny_hv_config, tiny_hv_dit, write_tiny_hv_dit
from musubi_tuner.errors import CheckpointError

from fused_lora_helpers import row_coded

RELEASED = {"num_layers": 20, "num_single_layers": 40, "num_refiner_layers": 2, "guidance_embeds": True}


def _meta_sd(**config) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return HunyuanVideoTransformer3DModel.from_config(config).state_dict()


def test_released_key_set_and_shapes_match_diffusers_converter():
    model_sd = _meta_sd(**RELEASED)
    original = hv_diffusers_to_original(model_sd)
    assert "double_blocks.19.img_attn_qkv.weight" in original and "single_blocks.39.linear1.weight" in original
    assert original["single_blocks.0.linear1.weight"].shape == (3 * 3072 + 4 * 3072, 3072)
    theirs = convert_hunyuan_video_transformer_to_diffusers(dict(original))
    ours = hv_original_to_diffusers(original)
    assert set(ours) == set(theirs) == set(model_sd)
    assert all(ours[k].shape == theirs[k].shape == model_sd[k].shape for k in ours)


def test_released_config_is_inferred_from_the_weights():
    original = hv_diffusers_to_original(_meta_sd(**RELEASED))
    config = infer_hv_config(original)
    with torch.device("meta"):  # never build the released size for real: 13 B parameters
        built = HunyuanVideoTransformer3DModel.from_config(config)
    assert set(built.state_dict()) == set(_meta_sd(**RELEASED))
    assert (config["num_attention_heads"], config["attention_head_dim"]) == (24, 128)
    assert config["rope_axes_dim"] == (16, 56, 56) and config["in_channels"] == 16
    skyreels = hv_diffusers_to_original(_meta_sd(**RELEASED, in_channels=32, out_channels=16))
    assert infer_hv_config(skyreels)["in_channels"] == 32 and infer_hv_config(skyreels)["out_channels"] == 16



def test_width_3072_values_match_diffusers_converter_and_round_trip():
    meta = hv_diffusers_to_original(_meta_sd(num_layers=1, num_single_layers=1, num_refiner_layers=1))
    original = row_coded({k: v.shape for k, v in meta.items()})
    theirs = convert_hunyuan_video_transformer_to_diffusers(dict(original))
    ours = hv_original_to_diffusers(original)
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    back = hv_diffusers_to_original(ours)
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)


def test_tiny_round_trip_is_exact_and_config_inferred():
    sd = tiny_hv_dit().state_dict()
    original = hv_diffusers_to_original(sd)
    assert original["single_blocks.0.linear1.weight"].shape == (3 * 32 + 4 * 32, 32)
    again = hv_original_to_diffusers(original)
    assert set(again) == set(sd) and all(torch.equal(again[k], sd[k]) for k in sd)
    assert infer_hv_config(original) == TINY_DIT_CONFIG
    scale, shift = sd["norm_out.linear.weight"].chunk(2)
    assert torch.equal(original["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))


def assert_same_output(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same weights, same inputs. Loaded fused tensors are row views at other memory offsets, which can change
    the CPU BLAS summation order, so the outputs agree to float rounding rather than bit for bit."""
    torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


def _forward(model, in_channels=16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]], dtype=torch.long)
    with torch.no_grad():
        return model(hidden_states=torch.randn(1, in_channels, 2, 4, 4, generator=gen), timestep=torch.tensor([700.0]),
                     encoder_hidden_states=torch.randn(1, 6, 32, generator=gen), encoder_attention_mask=mask,
                     pooled_projections=torch.randn(1, 32, generator=gen), guidance=torch.tensor([6000.0]),
                     return_dict=False)[0]


@pytest.mark.parametrize("layout", ["official_pt", "comfy"])
def test_tiny_saved_in_user_layouts_loads_to_identical_outputs(tmp_path, layout):
    source = tiny_hv_dit()
    path = write_tiny_hv_dit(tmp_path, layout)
    if layout == "official_pt":  # the official file is a pickle with the weights under "module"
        assert set(torch.load(path, weights_only=True)) == {"module"}
    loaded = load_hv_dit(path, dtype=torch.float32)
    assert dict(loaded.config) == dict(source.config)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert_same_output(_forward(loaded), _forward(source))


def test_skyreels_i2v_file_and_dit_in_channels(tmp_path):
    source = tiny_hv_dit(in_channels=32)
    path = write_tiny_hv_dit(tmp_path, "comfy", in_channels=32)
    loaded = load_hv_dit(path, dtype=torch.float32, in_channels=32)
    assert loaded.config.in_channels == 32 and loaded.config.out_channels == 16
    assert_same_output(_forward(loaded, 32), _forward(source, 32))
    with pytest.raises(CheckpointError, match="SkyReels V1 I2V DiT with 32 input channels.*--dit_in_channels 32"):
        load_hv_dit(path, in_channels=16)


def test_fp8_single_file_loads_cast_per_tensor(tmp_path):
    """The unofficial mp_rank_00_model_states_fp8.safetensors: official names, fp8 Linear weights, no scales."""
    source = tiny_hv_dit()
    original = hv_diffusers_to_original(source.state_dict())
    fp8 = {k: v.to(torch.float8_e4m3fn) if k.endswith("weight") and v.ndim == 2 and "blocks" in k else v
           for k, v in original.items()}
    path = tmp_path / "mp_rank_00_model_states_fp8.safetensors"
    save_file({k: v.contiguous() for k, v in fp8.items()}, str(path))
    loaded = load_hv_dit(path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    key = "single_blocks.1.linear1.weight"
    expected = fp8[key].to(torch.bfloat16)
    got = torch.cat([loaded.get_submodule(f"single_transformer_blocks.1.{p}").weight
                     for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")])
    assert torch.equal(got, expected)  # fp8 -> bf16 is exact


def test_official_fp8_pickle_without_scales_is_refused(tmp_path):
    sd = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v
          for k, v in hv_diffusers_to_original(tiny_hv_dit().state_dict()).items()}
    path = tmp_path / "mp_rank_00_model_states_fp8.pt"
    torch.save({"module": sd}, path)
    with pytest.raises(CheckpointError, match=r"--dit .*fp8_map\.pt"):
        load_hv_dit(path)


def test_diffusers_layout_file_loads(tmp_path):
    source = tiny_hv_dit()
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = load_hv_dit(path, dtype=torch.float32)
    assert dict(loaded.config) == dict(source.config)
    assert_same_output(_forward(loaded), _forward(source))


def test_dtype_cast_on_load(tmp_path):
    path = write_tiny_hv_dit(tmp_path, "comfy")
    assert {p.dtype for p in load_hv_dit(path, dtype=torch.bfloat16).parameters()} == {torch.bfloat16}


@pytest.mark.parametrize(("keys", "what"), [
    ({"encoder.down_blocks.0.resnets.0.conv1.conv.weight": (4, 3, 3, 3, 3),
      "decoder.up_blocks.0.resnets.0.conv1.conv.weight": (4, 4, 3, 3, 3)}, "HunyuanVideo VAE"),
    ({"model.layers.0.self_attn.q_proj.weight": (4, 4), "text_model.embeddings.token_embedding.weight": (4, 4)},
     "CLIP text encoder"),
    ({"patch_embedding.weight": (4, 16, 1, 2, 2), "head.modulation": (1, 2, 4)}, "Wan DiT"),
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (4, 32)}, "LoRA"),
])
def test_wrong_files_are_named_in_one_line(tmp_path, keys, what):
    path = tmp_path / "wrong.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(path))
    with pytest.raises(CheckpointError, match=what) as info:
        load_hv_dit(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"--dit {path}")


def test_incomplete_file_names_the_missing_key(tmp_path):
    sd = hv_diffusers_to_original(tiny_hv_dit().state_dict())
    del sd["single_blocks.1.linear2.bias"]
    path = tmp_path / "broken.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(CheckpointError, match="single_blocks.1.linear2.bias"):
        load_hv_dit(path)


def test_saved_official_layout_has_official_names(tmp_path):
    path = tmp_path / "x.safetensors"
    save_hv_dit_original(tiny_hv_dit(), path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert {"img_in.proj.weight", "double_blocks.1.txt_attn_qkv.weight", "single_blocks.1.modulation.linear.bias",
            "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight", "guidance_in.mlp.2.weight"} <= keys
    assert tiny_hv_config(32)["in_channels"] == 32
