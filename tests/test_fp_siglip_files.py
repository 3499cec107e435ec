"""SigLIP image encoder files: the tiny encoder saved as a ComfyUI-style single file and as an image_encoder folder
loads to identical weights and embeddings; preprocessing is the reference's SiglipImageProcessor; wrong files."""

import json

import numpy as np
import pytest
import torch

from musubi_tuner.errors import CheckpointError, UserError
from musubi_tuner.models.siglip_files import (
    TINY_SIGLIP_CONFIG,
    encode_siglip_images,
    infer_siglip_config,
    load_siglip_image_encoder,
    preprocess_siglip_images,
    save_tiny_siglip,
    tiny_siglip,
)

from _numerics import assert_same_outputs, assert_same_weights


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40, 30, 3), dtype=np.uint8), rng.integers(0, 256, (17, 50, 3), dtype=np.uint8)]


@torch.no_grad()
def test_comfy_file_and_folder_give_identical_embeddings(tmp_path):
    source = tiny_siglip()
    comfy = load_siglip_image_encoder(save_tiny_siglip(tmp_path / "c", "comfy"))
    folder = save_tiny_siglip(tmp_path / "f", "folder")
    from_folder = load_siglip_image_encoder(folder)
    from_parent = load_siglip_image_encoder(folder.parent)  # the reference's from_pretrained(subfolder="image_encoder")
    for model in (comfy, from_folder, from_parent):
        assert_same_weights(model, source)
        assert not model.training and not any(p.requires_grad for p in model.parameters())
    want = encode_siglip_images(source, _images())
    assert want.shape == (2, 4, TINY_SIGLIP_CONFIG["hidden_size"])  # 28 px / patch 14 = 2x2 tokens
    assert_same_outputs(encode_siglip_images(comfy, _images()), want)
    assert_same_outputs(encode_siglip_images(from_folder, _images()), want)


def test_folder_config_sets_the_head_count_the_weights_do_not_hold(tmp_path):
    folder = save_tiny_siglip(tmp_path, "folder")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 1}))
    assert load_siglip_image_encoder(folder).config.num_attention_heads == 1
    assert load_siglip_image_encoder(save_tiny_siglip(tmp_path / "c")).config.num_attention_heads == 2


def test_released_sizes_are_read_from_the_weights():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    released = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                "image_size": 384, "patch_size": 14}
    with torch.device("meta"):
        model = SiglipVisionModel(SiglipVisionConfig(**released))
    config = infer_siglip_config(model.state_dict())
    assert {k: config[k] for k in released} == released and config["vision_use_head"] is True


def test_preprocessing_is_the_reference_siglip_image_processor():
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    # the reference's FEATURE_EXTRACTOR_CONFIG, at the tiny input size
    processor = SiglipImageProcessorPil(do_resize=True, size={"height": 28, "width": 28}, resample=3,
                                        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    ours = preprocess_siglip_images(_images(), 28)
    for i, image in enumerate(_images()):
        theirs = processor.preprocess(images=image, return_tensors="pt")["pixel_values"][0]
        assert torch.allclose(ours[i], theirs.float(), atol=1e-6)
    flat = np.full((5, 7, 3), 255, dtype=np.uint8)  # by hand: 255 -> 1.0 -> (1 - 0.5) / 0.5 = 1
    assert torch.equal(preprocess_siglip_images([flat], 28), torch.ones(1, 3, 28, 28))
    with pytest.raises(ValueError, match="image 0 must be an HxWx3 uint8"):
        preprocess_siglip_images([np.zeros((4, 4), np.uint8)], 28)


def test_wrong_files_are_named(tmp_path):
    with pytest.raises(UserError, match="--image_encoder .*nope.safetensors: no such file"):
        load_siglip_image_encoder(tmp_path / "nope.safetensors")
    from musubi_tuner.architectures.framepack.tiny import save_tiny_framepack

    dit = save_tiny_framepack(tmp_path, "single")
    with pytest.raises(CheckpointError, match="--image_encoder .* is a FramePack DiT; --image_encoder expects SigLIP"):
        load_siglip_image_encoder(dit)
