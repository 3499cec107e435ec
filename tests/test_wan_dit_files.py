"""Wan DiT files: name map, task inference at the published sizes (meta device), tiny load/save round trips,
and the messages for wrong files and wrong tasks."""

import pytest
import torch

from _numerics import assert_same_outputs, assert_same_weights
from musubi_tuner.architectures.wan.dit_files import (
    WAN_TASKS,
    build_empty_wan_dit,
    check_task_matches,
    diffusers_module_name,
    get_wan_task,
    infer_wan_config,
    load_wan_dit,
    original_module_name,
    save_wan_dit_original,
    wan_dit_to_diffusers,
    wan_dit_to_original,
)
from musubi_tuner.architectures.wan.tiny import (
    TINY_CLIP_DIM,
    TINY_CLIP_TOKENS,
    TINY_TEXT_DIM,
    make_tiny_dit,
    make_tiny_vae,
    tiny_dit_config,
    write_tiny_wan_files,
)
from musubi_tuner.errors import CheckpointError, UserError
from musubi_tuner.models.checkpoint_io import read_safetensors_keys, save_state_dict

_META_CACHE: dict = {}


def real_original_shapes(task: str) -> dict[str, tuple[int, ...]]:
    """Original-layout keys -> shapes of the published model for `task`, from a meta-device diffusers model."""
    if task not in _META_CACHE:
        sd = build_empty_wan_dit(get_wan_task(task).diffusers_config()).state_dict()
        _META_CACHE[task] = {k: tuple(v.shape) for k, v in wan_dit_to_original(sd).items()}, sd
    return _META_CACHE[task][0]


# ---- name map ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task, n_keys", [("t2v-1.3B", 825), ("t2v-14B", 1095), ("i2v-14B", 1303), ("flf2v-14B", 1304)])
def test_key_map_is_exact_inverse_of_diffusers_converter_at_real_size(task, n_keys):
    real_original_shapes(task)
    diffusers_sd = _META_CACHE[task][1]
    assert len(diffusers_sd) == n_keys
    original = wan_dit_to_original(diffusers_sd)
    assert len(original) == n_keys  # no two keys collapse
    back = wan_dit_to_diffusers(original)
    assert set(back) == set(diffusers_sd)
    assert all(back[k] is diffusers_sd[k] for k in diffusers_sd)  # the same tensor ends up under the same name
    assert all(diffusers_module_name(original_module_name(k)) == k for k in diffusers_sd)


def test_original_layout_has_the_reference_names():
    keys = set(real_original_shapes("i2v-14B"))
    for key in ("blocks.39.self_attn.q.weight", "blocks.0.cross_attn.k_img.weight",
                "blocks.0.cross_attn.norm_k_img.weight",
                "blocks.0.norm3.weight", "blocks.0.ffn.2.bias", "blocks.0.modulation", "head.head.weight",
                "head.modulation", "img_emb.proj.4.bias", "time_projection.1.weight", "text_embedding.2.weight"):
        assert key in keys, key
    assert "blocks.0.norm2.weight" not in keys  # the FFN norm has no affine parameters in Wan2.1
    assert real_original_shapes("flf2v-14B")["img_emb.emb_pos"] == (1, 514, 1280)


@pytest.mark.parametrize("diffusers_path, original", [
    ("blocks.0.attn1.to_q", "blocks.0.self_attn.q"),
    ("blocks.7.attn1.to_out.0", "blocks.7.self_attn.o"),
    ("blocks.12.attn2.to_v", "blocks.12.cross_attn.v"),
    ("blocks.3.attn2.add_k_proj", "blocks.3.cross_attn.k_img"),
    ("blocks.3.attn2.add_v_proj", "blocks.3.cross_attn.v_img"),
    ("blocks.1.ffn.net.0.proj", "blocks.1.ffn.0"),
    ("blocks.1.ffn.net.2", "blocks.1.ffn.2"),
    ("blocks.1.norm2", "blocks.1.norm3"),
    ("blocks.1.norm3", "blocks.1.norm2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("proj_out", "head.head"),
    ("blocks.0.attn1.to_q.lora_A.weight", "blocks.0.self_attn.q.lora_A.weight"),
])
def test_module_names_both_ways(diffusers_path, original):
    assert original_module_name(diffusers_path) == original
    assert diffusers_module_name(original) == diffusers_path


def test_every_tiny_linear_has_an_original_name_in_the_file_layout():
    model = make_tiny_dit("i2v-14B")
    original_keys = set(wan_dit_to_original(model.state_dict()))
    linears = [p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) > 20
    for path in linears:
        assert original_module_name(path) + ".weight" in original_keys
    with pytest.raises(ValueError, match="rope"):
        original_module_name("rope")


# ---- task inference at the published sizes ---------------------------------------------------------------
@pytest.mark.parametrize("task", list(WAN_TASKS))
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_task_and_config_inferred_from_real_size_weights(task, prefix):
    shapes = {prefix + k: v for k, v in real_original_shapes(task).items()}
    detected, config = infer_wan_config(shapes)
    same_weights = {"t2i-14B": "t2v-14B", "i2v-14B-FC": "t2v-14B-FC",  # one file, two tasks
                    "t2v-A14B": "t2v-14B"}  # each Wan2.2 T2V-A14B expert has the T2V-14B shapes
    assert detected == same_weights.get(task, task)
    assert config == get_wan_task(task).diffusers_config()
    check_task_matches(task, detected, config, "f.safetensors")  # accepted


def test_task_inferred_from_diffusers_layout_too():
    _, diffusers_sd = real_original_shapes("i2v-14B"), _META_CACHE["i2v-14B"][1]
    detected, config = infer_wan_config(diffusers_sd)
    assert detected == "i2v-14B" and config["added_kv_proj_dim"] == 5120 and config["image_dim"] == 1280


def test_published_configs_match_the_reference_table():
    t14 = get_wan_task("t2v-14B").diffusers_config()
    assert (t14["num_layers"], t14["num_attention_heads"] * t14["attention_head_dim"], t14["ffn_dim"],
            t14["num_attention_heads"]) == (40, 5120, 13824, 40)
    t13 = get_wan_task("t2v-1.3B").diffusers_config()
    assert (t13["num_layers"], t13["num_attention_heads"] * t13["attention_head_dim"], t13["ffn_dim"],
            t13["num_attention_heads"]) == (30, 1536, 8960, 12)
    i2v, flf = get_wan_task("i2v-14B").diffusers_config(), get_wan_task("flf2v-14B").diffusers_config()
    assert i2v["in_channels"] == flf["in_channels"] == 36 and i2v["pos_embed_seq_len"] is None
    assert flf["pos_embed_seq_len"] == 257 * 2


@pytest.mark.parametrize("file_task, wanted, detected_text", [
    ("t2v-1.3B", "t2v-14B", "t2v-1.3B DiT"),
    ("t2v-14B", "t2v-1.3B", "t2v-14B DiT"),
    ("i2v-14B", "t2v-14B", "i2v-14B DiT"),
    ("t2v-14B", "i2v-14B", "t2v-14B DiT"),
    ("flf2v-14B", "i2v-14B", "flf2v-14B DiT"),
    ("i2v-14B", "flf2v-14B", "i2v-14B DiT"),
])
def test_wrong_task_names_the_detected_task_and_expected_file(file_task, wanted, detected_text):
    detected, config = infer_wan_config(real_original_shapes(file_task))
    with pytest.raises(CheckpointError) as err:
        check_task_matches(wanted, detected, config, "my_dit.safetensors")
    msg = str(err.value)
    assert detected_text in msg and f"--task {wanted}" in msg and get_wan_task(wanted).example_file in msg
    assert f"pass --task {detected}" in msg and "--dit my_dit.safetensors" in msg


def _patched(task, **shapes):
    out = dict(real_original_shapes(task))
    out.update(shapes)
    return out


@pytest.mark.parametrize("shapes, needle", [
    (lambda: _patched("t2v-1.3B", **{"patch_embedding.weight": (3072, 48, 1, 2, 2)}), "Wan2.2 TI2V-5B"),
    (lambda: _patched("t2v-1.3B", **{"vace_blocks.0.after_proj.weight": (1536, 1536)}), "VACE"),
    (lambda: _patched("t2v-14B", **{"blocks.0.self_attn.q.scale_weight": (1,)}), "scaled-fp8"),
])
def test_out_of_scope_wan_variants_are_named(shapes, needle):
    with pytest.raises(CheckpointError, match=needle):
        infer_wan_config(shapes())


def test_fun_control_files_are_recognised_and_fit_their_three_tasks():
    # Fun-Control: 48 input channels (16 noisy + 16 control + 16 image latents) and the CLIP image branch
    detected, config = infer_wan_config(_patched("i2v-14B", **{"patch_embedding.weight": (5120, 48, 1, 2, 2)}))
    assert detected == "t2v-14B-FC" and config["in_channels"] == 48 and config["image_dim"] == 1280
    for task in ("t2v-14B-FC", "i2v-14B-FC"):  # one 14B file serves both
        check_task_matches(task, detected, config, "fc.safetensors")
    with pytest.raises(CheckpointError, match="--task i2v-14B needs a 14B I2V DiT"):
        check_task_matches("i2v-14B", detected, config, "fc.safetensors")
    small, small_config = infer_wan_config(real_original_shapes("t2v-1.3B-FC"))
    assert small == "t2v-1.3B-FC" and small_config["in_channels"] == 48
    with pytest.raises(CheckpointError, match="pass --task t2v-1.3B-FC"):
        check_task_matches("t2v-1.3B", small, small_config, "fc13.safetensors")


def test_unsupported_and_unknown_task_values():
    with pytest.raises(UserError, match=r"ti2v-5B \(Wan2.2 TI2V-5B\) is not supported.*t2v-1.3B, t2v-14B"):
        get_wan_task("ti2v-5B")
    choices = ("t2v-1.3B, t2v-14B, i2v-14B, t2i-14B, flf2v-14B, t2v-A14B, i2v-A14B, t2v-1.3B-FC, t2v-14B-FC, "
               "i2v-14B-FC")
    with pytest.raises(UserError, match=rf"unknown --task 'x2v'; choose one of: {choices}"):
        get_wan_task("x2v")


# ---- tiny round trips ------------------------------------------------------------------------------------
def _inputs(task, generator):
    config = tiny_dit_config(task)
    x = torch.randn(1, config["in_channels"], 3, 4, 6, generator=generator)
    context = torch.randn(1, 512, config["text_dim"], generator=generator)  # I2V needs exactly 512 text tokens
    kwargs = dict(hidden_states=x, timestep=torch.tensor([437.0]), encoder_hidden_states=context, return_dict=False)
    if task != "t2v-1.3B":
        frames = 2 if task == "flf2v-14B" else 1
        kwargs["encoder_hidden_states_image"] = torch.randn(frames, TINY_CLIP_TOKENS, config["image_dim"],
                                                            generator=generator)
    return kwargs


def _forward(model, task):
    with torch.no_grad():
        return model(**_inputs(task, torch.Generator().manual_seed(3)))[0]


@pytest.mark.parametrize("task", ["t2v-1.3B", "i2v-14B", "flf2v-14B"])
@pytest.mark.parametrize("name, prefix", [("dit.safetensors", ""), ("comfy.safetensors", "model.diffusion_model."),
                                          ("dit.pth", ""), ("comfy.pt", "diffusion_model.")])
def test_tiny_dit_saved_in_original_layout_loads_to_identical_outputs(tmp_path, task, name, prefix):
    source = make_tiny_dit(task, seed=1)
    save_wan_dit_original(source, tmp_path / name, prefix=prefix)
    loaded = load_wan_dit(tmp_path / name, task=task)
    assert type(loaded) is type(source) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert loaded.config == source.config
    want = _forward(source, task)
    assert_same_weights(loaded, source)
    assert_same_outputs(_forward(loaded, task), want)
    assert want.abs().sum() > 0


def test_saved_file_has_exactly_the_original_keys(tmp_path):
    source = make_tiny_dit("i2v-14B")
    save_wan_dit_original(source, tmp_path / "a.safetensors", prefix="model.diffusion_model.")
    keys = set(read_safetensors_keys(tmp_path / "a.safetensors"))
    assert keys == {"model.diffusion_model." + k for k in wan_dit_to_original(source.state_dict())}
    assert "model.diffusion_model.blocks.1.cross_attn.k_img.weight" in keys


def test_diffusers_layout_file_loads_too(tmp_path):
    source = make_tiny_dit("i2v-14B")
    save_state_dict(source.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    loaded = load_wan_dit(tmp_path / "diffusion_pytorch_model.safetensors", task="i2v-14B")
    assert_same_weights(loaded, source)
    assert_same_outputs(_forward(loaded, "i2v-14B"), _forward(source, "i2v-14B"))


def test_dtype_cast_keeps_fp32_modules(tmp_path):
    paths = write_tiny_wan_files(tmp_path, "t2v-1.3B", dtype=torch.bfloat16)
    assert paths["dit"].name == "wan2.1_t2v_tiny_bf16.safetensors"
    model = load_wan_dit(paths["dit"], task="t2v-1.3B", dtype=torch.float16)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.float16
    assert model.blocks[0].ffn.net[0].proj.weight.dtype == torch.float16
    for name in ("scale_shift_table", "blocks.0.scale_shift_table", "blocks.0.norm2.weight",
                 "condition_embedder.time_embedder.linear_1.weight"):
        assert model.get_parameter(name).dtype == torch.float32, name
    kept = load_wan_dit(paths["dit"])  # dtype None: the file's dtype
    assert kept.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert kept.scale_shift_table.dtype == torch.float32


def test_tiny_file_is_accepted_for_any_task_of_its_mode(tmp_path):
    paths = write_tiny_wan_files(tmp_path, "t2v-1.3B")
    for task in ("t2v-1.3B", "t2v-14B", "t2i-14B"):
        load_wan_dit(paths["dit"], task=task)
    with pytest.raises(CheckpointError, match=r"T2V DiT 256 wide with 2 layers, but --task i2v-14B"):
        load_wan_dit(paths["dit"], task="i2v-14B")
    assert infer_wan_config(read_safetensors_keys(paths["dit"]))[0] == "t2v"


# ---- wrong files -----------------------------------------------------------------------------------------
def _save_fake(path, keys):
    save_state_dict({k: torch.zeros(1) for k in keys}, path)
    return path


@pytest.mark.parametrize("keys, kind", [
    (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "FLUX.1 DiT"),
    (["model.diffusion_model.double_blocks.0.img_attn_qkv.weight"], "HunyuanVideo DiT"),
    (["lora_unet_blocks_0_self_attn_q.lora_down.weight", "lora_unet_blocks_0_self_attn_q.alpha"], "LoRA file"),
    (["encoder.block.0.layer.0.SelfAttention.q.weight"], "T5/umT5 text encoder"),
    (["something.else"], "is not a Wan DiT"),
])
def test_wrong_architecture_names_what_it_is_and_what_is_expected(tmp_path, keys, kind):
    path = _save_fake(tmp_path / "wrong.safetensors", keys)
    with pytest.raises(CheckpointError) as err:
        load_wan_dit(path, task="t2v-1.3B")
    msg = str(err.value)
    assert kind in msg and "wrong.safetensors" in msg
    assert "--dit expects a Wan2.1 DiT such as wan2.1_t2v_1.3B_bf16.safetensors" in msg


def test_vae_passed_as_dit(tmp_path):
    from musubi_tuner.architectures.wan.vae_files import save_wan_vae_original

    save_wan_vae_original(make_tiny_vae(), tmp_path / "wan_2.1_vae.safetensors")
    with pytest.raises(CheckpointError, match="looks like a Wan VAE.*--dit expects a Wan2.1 DiT"):
        load_wan_dit(tmp_path / "wan_2.1_vae.safetensors")


def test_incomplete_dit_is_reported(tmp_path):
    sd = wan_dit_to_original(make_tiny_dit("t2v-1.3B").state_dict())
    del sd["blocks.1.cross_attn.o.weight"]
    save_state_dict(sd, tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match=r"missing: blocks\.1\.attn2\.to_out\.0\.weight"):
        load_wan_dit(tmp_path / "cut.safetensors")


def test_tiny_dit_matches_the_tiny_encoders():
    from musubi_tuner.architectures.wan.tiny_encoders import TINY_CLIP, TINY_UMT5

    assert TINY_TEXT_DIM == TINY_UMT5["d_model"] == tiny_dit_config()["text_dim"]
    assert TINY_CLIP_DIM == TINY_CLIP["hidden_size"] == tiny_dit_config("i2v-14B")["image_dim"]
    assert TINY_CLIP_TOKENS == (TINY_CLIP["image_size"] // TINY_CLIP["patch_size"]) ** 2 + 1
    assert tiny_dit_config("flf2v-14B")["pos_embed_seq_len"] == 2 * TINY_CLIP_TOKENS


def test_wan22_i2v_expert_without_clip_branch_is_i2v_a14b():
    """An I2V DiT with 36 input channels and no img_emb / k_img (each Wan2.2 I2V-A14B expert) is its own task."""
    shapes = real_original_shapes("i2v-A14B")
    assert not any(k.startswith("img_emb.") or ".k_img." in k for k in shapes)
    assert shapes["patch_embedding.weight"][1] == 36
    detected, config = infer_wan_config({"model.diffusion_model." + k: v for k, v in shapes.items()})
    assert detected == "i2v-A14B" and config["image_dim"] is None and config["added_kv_proj_dim"] is None
    check_task_matches("i2v-A14B", detected, config, "wan2.2_i2v_high_noise_14B_fp16.safetensors")
    with pytest.raises(CheckpointError, match=r"--task i2v-14B needs a 14B I2V DiT.*pass --task i2v-A14B"):
        check_task_matches("i2v-14B", detected, config, "wan2.2_i2v_high_noise_14B_fp16.safetensors")
    wan21_detected, wan21_config = infer_wan_config(real_original_shapes("i2v-14B"))
    with pytest.raises(CheckpointError, match=r"is a i2v-14B DiT, but --task i2v-A14B needs a 14B I2V \(no CLIP"):
        check_task_matches("i2v-A14B", wan21_detected, wan21_config, "wan2.1_i2v_480p_14B_bf16.safetensors")
