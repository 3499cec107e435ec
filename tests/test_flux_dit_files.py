"""FLUX.1 Kontext DiT files: BFL <-> diffusers conversion, config inference, loading, LoRA name map."""

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors.torch import save_file
from torch import nn

from _numerics import assert_same_outputs, assert_same_weights
from musubi_tuner.architectures.flux_kontext import dit_files
from musubi_tuner.architectures.flux_kontext.dit_files import (
    bfl_to_diffusers,
    diffusers_to_bfl,
    infer_flux_config,
    load_flux_dit,
    original_linear_parts,
    save_flux_dit_bfl,
)
from musubi_tuner.architectures.flux_kontext.packing import pack_latents, prepare_image_ids, prepare_text_ids
from musubi_tuner.architectures.flux_kontext.tiny import TINY_DIT_CONFIG, tiny_flux_dit
from musubi_tuner.errors import CheckpointError

from fused_lora_helpers import row_coded

REAL_KONTEXT = {"num_layers": 19, "num_single_layers": 38, "guidance_embeds": True, "in_channels": 64}


def _meta_model(**config) -> FluxTransformer2DModel:
    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(config)


def test_real_size_key_sets_and_shapes_match_diffusers_converter():
    model_sd = _meta_model(**REAL_KONTEXT).state_dict()
    bfl = diffusers_to_bfl(model_sd)
    assert len(model_sd) == 1160 and len(bfl) == 780
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    ours = bfl_to_diffusers(bfl)
    assert set(ours) == set(theirs) == set(model_sd)
    assert all(ours[k].shape == theirs[k].shape == model_sd[k].shape for k in ours)


def test_infer_config_real_kontext_dev():
    bfl = diffusers_to_bfl(_meta_model(**REAL_KONTEXT).state_dict())
    assert infer_flux_config(bfl) == {
        "patch_size": 1,
        "in_channels": 64,
        "out_channels": None,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": True,
        "axes_dims_rope": (16, 56, 56),
    }



def test_real_width_values_match_diffusers_converter():
    # Width 3072 (the converter's hard-coded size), one block of each kind.
    meta_bfl = diffusers_to_bfl(_meta_model(num_layers=1, num_single_layers=1, guidance_embeds=True).state_dict())
    bfl = row_coded({k: v.shape for k, v in meta_bfl.items()})
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    ours = bfl_to_diffusers(bfl)
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    back = diffusers_to_bfl(ours)
    assert all(torch.equal(back[k], bfl[k]) for k in bfl)


def test_round_trip_is_exact_on_tiny_model():
    sd = tiny_flux_dit().state_dict()
    bfl = diffusers_to_bfl(sd)
    assert "double_blocks.1.img_attn.qkv.weight" in bfl and "single_blocks.1.linear1.bias" in bfl
    assert bfl["single_blocks.0.linear1.weight"].shape == (3 * 32 + 4 * 32, 32)
    again = bfl_to_diffusers(bfl)
    assert set(again) == set(sd)
    assert all(torch.equal(again[k], sd[k]) for k in sd)


def test_final_layer_scale_shift_is_swapped():
    sd = tiny_flux_dit().state_dict()
    bfl = diffusers_to_bfl(sd)
    scale, shift = sd["norm_out.linear.weight"].chunk(2)
    assert torch.equal(bfl["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))


def test_infer_config_tiny():
    assert infer_flux_config(diffusers_to_bfl(tiny_flux_dit().state_dict())) == TINY_DIT_CONFIG


def _kontext_forward(model: nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    target = pack_latents(torch.randn(1, 16, 4, 6, generator=gen))
    control = pack_latents(torch.randn(1, 16, 4, 4, generator=gen))
    ids = torch.cat([prepare_image_ids(2, 3, index=0), prepare_image_ids(2, 2, index=1)])
    with torch.no_grad():
        return model(
            hidden_states=torch.cat([target, control], dim=1),
            encoder_hidden_states=torch.randn(1, 5, 32, generator=gen),
            pooled_projections=torch.randn(1, 32, generator=gen),
            timestep=torch.tensor([0.7]),
            img_ids=ids,
            txt_ids=prepare_text_ids(5),
            guidance=torch.tensor([2.5]),
            return_dict=False,
        )[0]


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_tiny_saved_in_bfl_layouts_loads_to_identical_outputs(tmp_path, prefix):
    source = tiny_flux_dit()
    path = tmp_path / "flux1-kontext-tiny.safetensors"
    save_flux_dit_bfl(source, path, prefix=prefix)
    loaded = load_flux_dit(path, device="cpu", dtype=torch.float32)
    assert dict(loaded.config) == dict(source.config)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    assert_same_weights(loaded, source)
    assert_same_outputs(_kontext_forward(loaded), _kontext_forward(source))


def test_load_casts_to_requested_dtype(tmp_path):
    path = tmp_path / "dit.safetensors"
    save_flux_dit_bfl(tiny_flux_dit(), path)
    loaded = load_flux_dit(path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_diffusers_layout_single_file_is_accepted(tmp_path):
    source = tiny_flux_dit()
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = load_flux_dit(path, dtype=torch.float32)
    assert_same_weights(loaded, source)
    assert_same_outputs(_kontext_forward(loaded), _kontext_forward(source))


def test_non_flux_file_is_refused_with_the_flag_hint(tmp_path):
    path = tmp_path / "wan.safetensors"
    save_file(
        {"blocks.0.self_attn.q.weight": torch.zeros(4, 4), "patch_embedding.weight": torch.zeros(4, 4)}, str(path)
    )
    with pytest.raises(CheckpointError, match="--dit expects flux1-kontext-dev.safetensors"):
        load_flux_dit(path)


def test_folder_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="folder"):
        load_flux_dit(tmp_path)


def test_unexpected_and_missing_keys_are_errors():
    bfl = diffusers_to_bfl(tiny_flux_dit().state_dict())
    with pytest.raises(CheckpointError, match="unexpected keys.*double_blocks.0.extra.weight"):
        bfl_to_diffusers({**bfl, "double_blocks.0.extra.weight": torch.zeros(1)})
    del bfl["single_blocks.1.linear2.bias"]
    with pytest.raises(CheckpointError, match="single_blocks.1.linear2.bias"):
        bfl_to_diffusers(bfl)


def test_lora_name_map_covers_every_block_linear_once_and_names_exist():
    model = tiny_flux_dit()
    layout = original_linear_parts(model)
    bfl = diffusers_to_bfl(model.state_dict())
    names = [name for name, _ in layout]
    assert len(names) == len(set(names))
    assert all(name + ".weight" in bfl for name in names)
    covered = [p for _, parts in layout for p in parts]
    block_linears = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.startswith(("transformer_blocks.", "single_transformer_blocks."))
    ]
    assert sorted(covered) == sorted(block_linears)  # every one, exactly once
    modules = dict(model.named_modules())
    for name, parts in layout:
        # Parts in output-row order: stacking them gives the original fused weight.
        stacked = torch.cat([modules[p].weight for p in parts])
        assert torch.equal(stacked, bfl[name + ".weight"]), name


def test_lora_name_map_fused_examples():
    layout = dict(dit_files.linear_parts_for(1, 1))
    assert layout["double_blocks.0.img_attn.qkv"] == [f"transformer_blocks.0.attn.to_{x}" for x in "qkv"]
    assert layout["double_blocks.0.txt_attn.proj"] == ["transformer_blocks.0.attn.to_add_out"]
    assert layout["single_blocks.0.linear1"] == [
        "single_transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.0.attn.to_k",
        "single_transformer_blocks.0.attn.to_v",
        "single_transformer_blocks.0.proj_mlp",
    ]
    assert layout["single_blocks.0.modulation.lin"] == ["single_transformer_blocks.0.norm.linear"]
    assert len(layout) == 10 + 3
