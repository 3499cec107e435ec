"""Cache names and tensor keys as the reference writes them, and cache I/O."""

import logging

import pytest
import torch
from safetensors import safe_open

from musubi_tuner.dataset.cache_files import (
    batch_key, file_key, latent_cache_name, latent_metadata, parse_latent_cache_name, read_cache,
    read_cache_shapes, text_cache_name, video_item_key, write_cache, write_text_cache,
)
from musubi_tuner.dataset.traits import DatasetTraits
from musubi_tuner.errors import UserError

WAN = DatasetTraits(cache_code="wan", architecture="wan")


def test_names():
    assert latent_cache_name("cat", (1280, 720), "wan") == "cat_1280x0720_wan.safetensors"
    assert latent_cache_name(video_item_key("clip", 0, 25), (1280, 720), "wan") == \
        "clip_00000-025_1280x0720_wan.safetensors"
    assert text_cache_name("my_clip", "fk") == "my_clip_fk_te.safetensors"


def test_parse_splits_from_the_right_with_underscores():
    p = parse_latent_cache_name("my_cat_01_0512x0768_fk.safetensors", "fk", video=False)
    assert (p.item_key, p.media_stem, p.original_size, p.window) == ("my_cat_01", "my_cat_01", (512, 768), None)
    v = parse_latent_cache_name("a_b_00016-025_1280x0720_wan.safetensors", "wan", video=True)
    assert (v.item_key, v.media_stem, v.original_size, v.window) == ("a_b_00016-025", "a_b", (1280, 720), "00016-025")
    fp = parse_latent_cache_name("x_00000-037-0001_0640x0640_wan.safetensors", "wan", video=True)
    assert fp.media_stem == "x" and fp.window == "00000-037-0001"


@pytest.mark.parametrize("name, video", [
    ("cat_wan_te.safetensors", False),           # text cache
    ("cat_0512x0512_fk.safetensors", False),     # other architecture
    ("cat_wan.safetensors", False),              # no size token
    ("cat_0512x0512_wan.safetensors", True),     # video cache without a window token
])
def test_parse_rejects_other_files(name, video):
    assert parse_latent_cache_name(name, "wan", video=video) is None


def test_file_keys_follow_reference():
    assert file_key("latents", torch.zeros(16, 5, 8, 10, dtype=torch.bfloat16)) == "latents_5x8x10_bfloat16"
    # Kontext-style (C, H, W) image latents get F = 1
    assert file_key("latents_control", torch.zeros(16, 8, 10)) == "latents_control_1x8x10_float32"
    assert file_key("varlen_t5", torch.zeros(7, 32, dtype=torch.float16)) == "varlen_t5_float16"
    assert file_key("llm_mask", torch.ones(4, dtype=torch.bool)) == "llm_mask"
    assert file_key("clip_l_pooler", torch.zeros(8, dtype=torch.float8_e4m3fn)) == "clip_l_pooler_float8_e4m3fn"
    with pytest.raises(ValueError):
        file_key("latents", torch.zeros(4, 4))


@pytest.mark.parametrize("key, expected", [
    ("latents_5x8x10_bfloat16", ("latents", False)),
    ("latents_control_1x8x10_float32", ("latents_control", False)),
    ("latents_clean_2x_3x8x10_bfloat16", ("latents_clean_2x", False)),
    ("varlen_t5_float16", ("t5", True)),
    ("llm_mask", ("llm_mask", False)),
    ("llama_attention_mask", ("llama_attention_mask", False)),
    ("clip_l_pooler_float8_e4m3fn", ("clip_l_pooler", False)),
    ("f_indices_int32", ("f_indices", False)),
    ("latent_indices_int64", ("latent_indices", False)),
])
def test_batch_keys(key, expected):
    assert batch_key(key) == expected


def test_write_and_read_latent_cache(tmp_path, caplog):
    path = tmp_path / "c" / latent_cache_name("clip_00000-005", (64, 48), "wan")
    lat = torch.arange(2 * 2 * 3 * 4, dtype=torch.float32).reshape(2, 2, 3, 4)
    lat[0, 0, 0, 0] = float("nan")
    with caplog.at_level(logging.WARNING):
        write_cache(path, {"latents": lat}, WAN, latent_metadata((64, 48), 5))
    assert "NaN" in caplog.text
    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == ["latents_2x3x4_float32"]
        assert f.metadata() == {"architecture": "wan", "width": "64", "height": "48", "frame_count": "5",
                                "format_version": "1.0.1"}
    tensors, varlen = read_cache(path)
    assert varlen == set() and tensors["latents"][0, 0, 0, 0] == 0 and tensors["latents"][0, 0, 0, 1] == 1
    assert read_cache_shapes(path) == {"latents": ((2, 2, 3, 4), False)}
    assert not list(path.parent.glob(".*tmp"))  # atomic write leaves no temp file


def test_image_metadata_has_no_frame_count():
    assert latent_metadata((10, 20), None) == {"width": "10", "height": "20"}


def test_text_cache_merges_passes(tmp_path, caplog):
    path = tmp_path / text_cache_name("a_b", "hv")
    hv = DatasetTraits(cache_code="hv", architecture="hunyuan_video")
    write_text_cache(path, "a cat", {"llm": torch.ones(3, 4), "llm_mask": torch.ones(3, dtype=torch.bool)}, hv)
    with caplog.at_level(logging.WARNING):
        write_text_cache(path, "a dog", {"clipL": torch.zeros(4, dtype=torch.float16)}, hv)
    assert "caption changed" in caplog.text
    tensors, varlen = read_cache(path)
    assert set(tensors) == {"llm", "llm_mask", "clipL"} and varlen == set()
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["caption1"] == "a dog" and f.metadata()["architecture"] == "hunyuan_video"
    with pytest.raises(UserError, match="written for architecture 'hunyuan_video'"):
        write_text_cache(path, "x", {"varlen_t5": torch.ones(2, 3)}, WAN)


def test_varlen_read(tmp_path):
    path = tmp_path / "x_wan_te.safetensors"
    write_text_cache(path, "cap", {"varlen_t5": torch.ones(7, 4, dtype=torch.bfloat16)}, WAN)
    tensors, varlen = read_cache(path)
    assert varlen == {"t5"} and tensors["t5"].shape == (7, 4) and tensors["t5"].dtype == torch.bfloat16


def test_unreadable_cache_is_user_error(tmp_path):
    bad = tmp_path / "x_0001x0001_wan.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read cache file"):
        read_cache(bad)


def test_metadata_values_are_strings_and_text_caches_merge_by_default(tmp_path):
    lat = tmp_path / "a_0010x0020_wan.safetensors"
    write_cache(lat, {"latents": torch.zeros(2, 1, 2, 2)}, WAN, {"width": 10, "height": 20, "frame_count": None})
    with safe_open(str(lat), framework="pt") as f:
        assert f.metadata() == {"architecture": "wan", "width": "10", "height": "20", "format_version": "1.0.1"}
    te = tmp_path / "a_wan_te.safetensors"
    write_cache(te, {"varlen_t5": torch.ones(2, 3)}, WAN, {"caption1": "x"})
    write_cache(te, {"extra": torch.ones(1)}, WAN, {"caption1": "x"})
    assert set(read_cache(te)[0]) == {"t5", "extra"}
