"""FramePack DiT files: the tiny model saved as lllyasviel's shards, a single file and a diffusers folder loads to
the same weights and predictions; config read from the weights at released size; fp8; wrong and incomplete files."""

import pytest
import torch
from diffusers import HunyuanVideoFramepackTransformer3DModel

from musubi_tuner.architectures.framepack.dit_files import infer_framepack_config, load_framepack_dit
from musubi_tuner.architectures.framepack.packed_forward import embedded_guidance, packed_forward
from musubi_tuner.architectures.framepack.tiny import (
    TINY_FRAMEPACK_CONFIG,
    save_tiny_framepack,
    tiny_framepack_dit,
)
from musubi_tuner.architectures.hunyuan_video.tiny import write_tiny_hv_dit
from musubi_tuner.errors import CheckpointError
from musubi_tuner.memory.fp8 import Fp8StorageLinear, ScaledFp8Linear
from musubi_tuner.models.checkpoint_io import save_state_dict

from _numerics import assert_same_outputs, assert_same_weights


def _predict(dit):
    g = torch.Generator().manual_seed(3)
    c = TINY_FRAMEPACK_CONFIG
    return packed_forward(
        dit, hidden_states=torch.randn(1, 16, 2, 8, 8, generator=g), timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 4, c["text_embed_dim"], generator=g),
        encoder_attention_mask=torch.ones(1, 4, dtype=torch.long),
        pooled_projections=torch.randn(1, c["pooled_projection_dim"], generator=g),
        image_embeddings=torch.randn(1, 3, c["image_proj_dim"], generator=g), latent_indices=torch.tensor([1, 2]),
        latents_clean=torch.randn(1, 16, 1, 8, 8, generator=g), clean_latent_indices=torch.tensor([0]),
        guidance=embedded_guidance(10.0, 1))


@pytest.fixture(scope="module")
def source():
    return tiny_framepack_dit(seed=0)


@torch.no_grad()
@pytest.mark.parametrize("layout", ["shards", "single", "diffusers"])
def test_every_layout_loads_identical_weights_and_predictions(tmp_path, source, layout):
    path = save_tiny_framepack(tmp_path, layout)
    loaded = load_framepack_dit(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert_same_weights(loaded, source)
    assert_same_outputs(_predict(loaded), _predict(source))


@torch.no_grad()
def test_shards_load_from_index_json_and_from_a_folder_without_config(tmp_path, source):
    first = save_tiny_framepack(tmp_path, "shards")
    assert_same_weights(load_framepack_dit(tmp_path / "diffusion_pytorch_model.safetensors.index.json"), source)
    assert_same_weights(load_framepack_dit(first.parent), source)  # the reference takes a folder of shards too


def test_missing_sibling_shard_names_the_file_and_the_fix(tmp_path):
    first = save_tiny_framepack(tmp_path, "shards")
    (tmp_path / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"--dit .*-00001-of-00003.*missing "
                                              r"diffusion_pytorch_model-00002-of-00003\.safetensors"):
        load_framepack_dit(first)


def test_hunyuan_video_dit_given_as_framepack_is_named(tmp_path):
    hv = write_tiny_hv_dit(tmp_path, "safetensors")
    with pytest.raises(CheckpointError, match=r"--dit .* is a HunyuanVideo DiT; --dit expects a FramePack DiT"):
        load_framepack_dit(hv)
    state = {k: v for k, v in tiny_framepack_dit().state_dict().items() if not k.startswith("clean_x_embedder")}
    save_state_dict(state, tmp_path / "hv_diffusers.safetensors")
    with pytest.raises(CheckpointError, match="HunyuanVideo DiT in diffusers layout.*no FramePack history"):
        load_framepack_dit(tmp_path / "hv_diffusers.safetensors")


def test_released_config_is_read_from_the_weights():
    defaults = {"has_image_proj": True, "has_clean_x_embedder": True, "image_proj_dim": 1152}
    with torch.device("meta"):
        released = HunyuanVideoFramepackTransformer3DModel(**defaults)
    config = infer_framepack_config(released.state_dict())
    expected = {k: v for k, v in released.config.items() if not k.startswith("_")}
    assert config == {**expected, "rope_axes_dim": (16, 56, 56)}
    assert infer_framepack_config(tiny_framepack_dit().state_dict()) == {
        **TINY_FRAMEPACK_CONFIG, "rope_axes_dim": (4, 6, 6)}


@torch.no_grad()
def test_dtype_casts_and_bf16_file_keeps_bf16(tmp_path):
    path = save_tiny_framepack(tmp_path, "single", dtype=torch.bfloat16)
    assert load_framepack_dit(path).proj_out.weight.dtype == torch.bfloat16
    assert load_framepack_dit(path, dtype=torch.float32).proj_out.weight.dtype == torch.float32


@torch.no_grad()
@pytest.mark.parametrize("scaled", [False, True])
def test_fp8_stores_only_block_linears(tmp_path, source, scaled):
    path = save_tiny_framepack(tmp_path, "single")
    dit = load_framepack_dit(path, fp8_base=not scaled, fp8_scaled=scaled)
    wanted = ScaledFp8Linear if scaled else Fp8StorageLinear
    assert type(dit.transformer_blocks[0].attn.to_q) is wanted
    assert type(dit.single_transformer_blocks[1].proj_out) is wanted
    assert dit.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    for name in ("proj_out", "image_projection.up", "context_embedder.proj_in", "time_text_embed.text_embedder.linear_1"):
        assert type(dit.get_submodule(name)) is torch.nn.Linear, name
    assert torch.allclose(_predict(dit), _predict(source), atol=0.05)


def test_prequantized_fp8_file_is_rejected(tmp_path):
    state = tiny_framepack_dit().state_dict()
    state["transformer_blocks.0.attn.to_q.scale_weight"] = torch.ones(1)
    save_state_dict(state, tmp_path / "fp8_scaled.safetensors")
    with pytest.raises(CheckpointError, match="--dit .*fp8_scaled.safetensors is a pre-quantized"):
        load_framepack_dit(tmp_path / "fp8_scaled.safetensors")


def test_load_benchmark_dit_has_released_widths_in_the_loader_layout():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from _bench_models import bench_dit

    spec = bench_dit("framepack", (1, 2))
    config = infer_framepack_config(spec.original_shapes())
    assert (config["num_layers"], config["num_single_layers"], config["num_refiner_layers"]) == (1, 2, 2)
    assert (config["num_attention_heads"], config["attention_head_dim"], config["image_proj_dim"]) == (24, 128, 1152)
    assert (config["text_embed_dim"], config["pooled_projection_dim"], config["guidance_embeds"]) == (4096, 768, True)
    assert spec.key_prefix == "" and spec.arch == "framepack"


@torch.no_grad()
def test_block_swap_finds_the_transformer_blocks_and_keeps_the_prediction(tmp_path, source):
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    from musubi_tuner.errors import UserError
    from musubi_tuner.memory.block_swap import enable_block_swap

    dit = load_framepack_dit(save_tiny_framepack(tmp_path, "single"))
    want = _predict(dit)
    scheduler = enable_block_swap(dit, 3, torch.device("cpu"))  # the last double block and both single blocks
    assert [s.block for s in scheduler.slots] == [dit.transformer_blocks[1], *dit.single_transformer_blocks]
    assert torch.equal(_predict(dit), want)
    scheduler.remove()
    plain = HunyuanVideoFramepackTransformer3DModel.from_config(dict(TINY_FRAMEPACK_CONFIG))
    with pytest.raises(UserError, match="declares no repeated blocks"):  # why the loader marks them
        enable_block_swap(plain, 1, torch.device("cpu"))
