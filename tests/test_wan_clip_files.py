"""Wan I2V CLIP file -> transformers CLIPVisionModel: layouts, config inference, Wan preprocessing, errors."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from musubi_tuner.architectures.wan.clip_files import (
    CLIP_MEAN,
    CLIP_STD,
    clip_config_from_state_dict,
    clip_to_official,
    encode_images_clip,
    load_wan_clip,
    official_to_clip,
    preprocess_images_clip,
    to_clip_layout,
)
from musubi_tuner.architectures.wan.tiny_encoders import build_tiny_wan_clip, write_tiny_wan_encoder_files
from musubi_tuner.errors import CheckpointError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tiny_wan_encoder_files(tmp_path_factory.mktemp("wan_enc"))


@pytest.fixture
def images():
    return torch.randint(0, 256, (2, 45, 70, 3), dtype=torch.uint8)


def test_official_pth_loads_to_identical_outputs(files, images):
    model = load_wan_clip(files["clip"], "cpu", torch.float32)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    out = encode_images_clip(model, images)
    assert out.shape == (2, 17, 32)  # (56 / 14)^2 patches + class token
    assert torch.equal(out, encode_images_clip(build_tiny_wan_clip(), images))


def test_hf_layout_safetensors_loads_to_identical_outputs(tmp_path, images):
    source = build_tiny_wan_clip()
    sd = {f"vision_model.{k}": v for k, v in source.state_dict().items()}  # ComfyUI clip_vision_h layout
    sd["visual_projection.weight"] = torch.zeros(16, 32)
    save_file(sd, tmp_path / "clip_vision_tiny.safetensors")
    model = load_wan_clip(tmp_path / "clip_vision_tiny.safetensors", "cpu", torch.float32)
    assert torch.equal(encode_images_clip(model, images), encode_images_clip(source, images))


def _reference_wan_visual(sd, pixels, heads):
    """Wan's ViT written from its description on Wan's keys, stopping before the last block (use_31_block)."""
    x = F.conv2d(pixels, sd["visual.patch_embedding.weight"], stride=sd["visual.patch_embedding.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.cls_embedding"].expand(x.shape[0], -1, -1), x], dim=1) + sd["visual.pos_embedding"]
    dim = x.shape[-1]
    ln = lambda t, name: F.layer_norm(t, (dim,), sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-5)  # noqa: E731
    x = ln(x, "visual.pre_norm")
    blocks = sorted({int(k.split(".")[2]) for k in sd if k.startswith("visual.transformer.")})
    for i in blocks[:-1]:
        p = f"visual.transformer.{i}"
        qkv = F.linear(ln(x, f"{p}.norm1"), sd[f"{p}.attn.to_qkv.weight"], sd[f"{p}.attn.to_qkv.bias"])
        q, k, v = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + F.linear(att, sd[f"{p}.attn.proj.weight"], sd[f"{p}.attn.proj.bias"])
        h = F.gelu(F.linear(ln(x, f"{p}.norm2"), sd[f"{p}.mlp.0.weight"], sd[f"{p}.mlp.0.bias"]))
        x = x + F.linear(h, sd[f"{p}.mlp.2.weight"], sd[f"{p}.mlp.2.bias"])
    return x


def test_loaded_model_matches_wan_semantics_of_the_official_keys(files, images):
    sd = torch.load(files["clip"], weights_only=True)
    model = load_wan_clip(files["clip"], "cpu", torch.float32)
    pixels = preprocess_images_clip(images, 56)
    expected = _reference_wan_visual(sd, pixels, heads=2)
    torch.testing.assert_close(encode_images_clip(model, images), expected, rtol=1e-5, atol=1e-5)


def test_wan_preprocessing_resizes_to_the_config_size_and_normalises():
    gray = torch.full((1, 30, 90, 3), 200, dtype=torch.uint8)
    pixels = preprocess_images_clip(gray, 56)
    assert pixels.shape == (1, 3, 56, 56)
    expected = (torch.tensor(200 / 255.0) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(pixels[0, :, 10, 10], expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_images_clip(gray.float(), 56)


def test_other_towers_and_head_are_ignored_and_round_trip_keeps_the_visual_keys(files):
    sd = torch.load(files["clip"], weights_only=True)
    assert {"visual.head", "log_scale", "textual.token_embedding.weight"} <= sd.keys()
    hf = official_to_clip(sd)
    assert not any(k.startswith(("textual", "log_scale")) for k in hf)
    back = clip_to_official(hf)
    visual = {k for k in sd if k.startswith("visual.") and k != "visual.head"}
    assert back.keys() == visual and all(torch.equal(back[k], sd[k]) for k in visual)


def test_config_inferred_for_the_real_vit_h_14():
    shapes = {
        "visual.patch_embedding.weight": (1280, 3, 14, 14), "visual.cls_embedding": (1, 1, 1280),
        "visual.pos_embedding": (1, 257, 1280), "visual.pre_norm.weight": (1280,), "visual.pre_norm.bias": (1280,),
        "visual.post_norm.weight": (1280,), "visual.post_norm.bias": (1280,), "visual.head": (1280, 1024),
        "log_scale": (),
    }  # fmt: skip
    for i in range(32):
        p = f"visual.transformer.{i}"
        shapes |= {f"{p}.attn.to_qkv.weight": (3840, 1280), f"{p}.attn.to_qkv.bias": (3840,),
                   f"{p}.attn.proj.weight": (1280, 1280), f"{p}.attn.proj.bias": (1280,),
                   f"{p}.mlp.0.weight": (5120, 1280), f"{p}.mlp.0.bias": (5120,),
                   f"{p}.mlp.2.weight": (1280, 5120), f"{p}.mlp.2.bias": (1280,)}  # fmt: skip
        shapes |= {f"{p}.{n}.{w}": (1280,) for n in ("norm1", "norm2") for w in ("weight", "bias")}
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    config = clip_config_from_state_dict(to_clip_layout(sd, "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"))
    got = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size)
    assert got == (1280, 32, 16, 5120) and (config.patch_size, config.image_size) == (14, 224)
    assert (config.hidden_act, config.layer_norm_eps) == ("gelu", 1e-5)
    assert (config.image_size // config.patch_size) ** 2 + 1 == 257


def test_wrong_file_is_rejected_naming_the_expected_file(tmp_path, files):
    expected = r"--clip .*not a Wan CLIP image encoder.*models_clip_open-clip-xlm-roberta"
    with pytest.raises(CheckpointError, match=expected):
        load_wan_clip(files["t5"], "cpu", torch.float32)
    with pytest.raises(CheckpointError, match=r"--clip .*file not found"):
        load_wan_clip(tmp_path / "missing.pth", "cpu", torch.float32)
