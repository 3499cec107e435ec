"""Masked loss, caption dropout and validation loss: the parts that are exact math or pure functions."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch
from PIL import Image

from musubi_tuner.dataset.batches import CachedBatches
from musubi_tuner.dataset.cache_files import empty_caption_cache_name, write_text_cache
from musubi_tuner.dataset.config import load_dataset_config
from musubi_tuner.dataset.masks import load_pixel_mask, mask_on_latent_grid
from musubi_tuner.dataset.sources import collect_items
from musubi_tuner.errors import DatasetConfigError, UserError
from musubi_tuner.training.loss import per_sample_loss
from musubi_tuner.training.validation import VALIDATION_TIMESTEPS, ValidationLoss, band_key
from test_batches import WAN, add_cache, spec

# ---- masked loss ----------------------------------------------------------------------------------


def test_a_half_zero_mask_makes_the_loss_depend_only_on_the_other_half():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 3, 4, 6, generator=gen), torch.randn(2, 4, 3, 4, 6, generator=gen)
    mask = torch.ones(2, 1, 3, 4, 6)
    mask[..., :3] = 0  # left half of every latent frame ignored
    loss = per_sample_loss(pred, target, mask)
    right = ((pred - target) ** 2)[..., 3:].mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(loss, right * 0.5, rtol=1e-6, atol=0)  # weighted mean over all cells
    changed = pred.clone()
    changed[..., :3] = 1e3  # whatever the model says there does not count
    assert torch.equal(per_sample_loss(changed, target, mask), loss)
    torch.testing.assert_close(per_sample_loss(pred, target), ((pred - target) ** 2).mean(dim=(1, 2, 3, 4)))


def test_the_mask_is_area_averaged_onto_the_latent_grid_for_every_frame():
    pixels = torch.zeros(16, 16)
    pixels[:8, :8] = 1.0  # top-left quadrant
    pixels[8:, 8:12] = 1.0  # half of the bottom-right quadrant
    grid = mask_on_latent_grid(pixels, torch.zeros(16, 3, 2, 2))
    assert grid.shape == (1, 3, 2, 2)
    assert torch.equal(grid[0, 2], torch.tensor([[1.0, 0.0], [0.0, 0.5]]))
    assert mask_on_latent_grid(pixels, torch.zeros(16, 2, 2)).shape == (1, 2, 2)  # (C, H, W) image latents


def _mask_dataset(tmp_path, mask_size=(32, 32), extra=""):
    images, masks = tmp_path / "img", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    Image.new("RGB", (32, 32), "red").save(images / "a.png")
    (images / "a.txt").write_text("a")
    Image.new("RGB", (32, 32), "blue").save(images / "b.png")
    (images / "b.txt").write_text("b")
    left = Image.new("L", mask_size, 255)
    left.paste(0, (0, 0, mask_size[0] // 2, mask_size[1]))
    left.save(masks / "a.png")  # b has no mask: it counts fully
    toml = tmp_path / "ds.toml"
    toml.write_text(f'[general]\nresolution = [32, 32]\ncaption_extension = ".txt"\n[[datasets]]\n'
                    f'image_directory = "{images.as_posix()}"\nmask_directory = "{masks.as_posix()}"\n{extra}')
    return toml, masks


def test_mask_directory_masks_items_by_stem_and_items_without_one_count_fully(tmp_path):
    toml, masks = _mask_dataset(tmp_path)
    (spec_,) = load_dataset_config(toml, WAN)
    items = {i.item_key: i for i in collect_items(spec_, WAN).items}
    assert items["a"].mask_path == masks / "a.png" and items["b"].mask_path is None
    pixels = load_pixel_mask(items["a"], spec_)
    assert pixels.shape == (32, 32) and pixels[:, :16].max() == 0 and pixels[:, 16:].min() == 1


def test_a_mask_of_another_size_is_an_error_naming_the_file(tmp_path):
    toml, masks = _mask_dataset(tmp_path, mask_size=(32, 16))
    (spec_,) = load_dataset_config(toml, WAN)
    with pytest.raises(DatasetConfigError, match="mask .*a.png is 32x16 but .*a.png is 32x32"):
        collect_items(spec_, WAN)


def test_alpha_mask_uses_the_alpha_channel(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (16, 0, 32, 32))
    rgba.save(images / "a.png")
    (images / "a.txt").write_text("a")
    toml = tmp_path / "ds.toml"
    toml.write_text(f'[general]\nresolution = [32, 32]\ncaption_extension = ".txt"\n[[datasets]]\n'
                    f'image_directory = "{images.as_posix()}"\nalpha_mask = true\n')
    (spec_,) = load_dataset_config(toml, WAN)
    (item,) = collect_items(spec_, WAN).items
    pixels = load_pixel_mask(item, spec_)
    assert pixels[:, :16].max() == 0 and pixels[:, 16:].min() == 1


@pytest.mark.parametrize("extra, message", [
    ("alpha_mask = true", "alpha_mask: give either alpha_mask = true or mask_directory"),
    ("caption_dropout_rate = 1.5", "caption_dropout_rate: must be a number from 0 to 1"),
    ("caption_dropout_every_n_epochs = -1", "caption_dropout_every_n_epochs: must be >= 0"),
])
def test_bad_mask_and_dropout_keys_name_the_key(tmp_path, extra, message):
    toml, _ = _mask_dataset(tmp_path, extra=extra)
    with pytest.raises(DatasetConfigError, match=message):
        load_dataset_config(toml, WAN)


def test_validation_datasets_take_the_same_keys_and_are_labelled(tmp_path):
    toml, _ = _mask_dataset(tmp_path)
    val = tmp_path / "val"
    val.mkdir()
    toml.write_text(toml.read_text() + f'[[validation_datasets]]\nimage_directory = "{val.as_posix()}"\n')
    assert [s.section for s in load_dataset_config(toml, WAN)] == ["datasets"]
    train, validation = load_dataset_config(toml, WAN, with_validation=True)
    assert validation.is_validation and validation.label.endswith("[[validation_datasets]][0]")
    toml.write_text(toml.read_text() + f'[[validation_datasets]]\nimage_directory = "{val.as_posix()}"\n')
    with pytest.raises(DatasetConfigError, match=r"\[\[validation_datasets\]\]\[1\]: cache_directory .* also used by "
                                                 r"\[\[validation_datasets\]\]\[0\]"):
        load_dataset_config(toml, WAN, with_validation=True)


# ---- caption dropout ------------------------------------------------------------------------------


def _dropout_batches(tmp_path, seed=3, **dropout):
    s = spec(tmp_path, 0, batch_size=2, **dropout)
    for i in range(6):
        add_cache(s, f"item{i}", value=i)
    write_text_cache(s.cache_directory / empty_caption_cache_name("wan"), "", {"varlen_t5": torch.zeros(1, 3)}, WAN)
    return CachedBatches([s], WAN, seed=seed), s.cache_directory / empty_caption_cache_name("wan")


def test_caption_dropout_rate_one_trains_on_the_empty_prompt_only(tmp_path):
    batches, empty = _dropout_batches(tmp_path, caption_dropout_rate=1.0)
    for epoch in range(3):
        texts = {e.text_path for b in batches.batches_for_epoch(epoch) for e in b}
        assert texts == {empty}
    batch = batches.load_batch(batches.batches_for_epoch(0)[0])
    assert all(torch.equal(t, torch.zeros(1, 3)) for t in batch["t5"])


def test_caption_dropout_keeps_the_order_and_is_a_function_of_seed_and_epoch(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain_spec = spec(tmp_path / "a", 0, batch_size=2)
    for i in range(6):
        add_cache(plain_spec, f"item{i}", value=i)
    plain = CachedBatches([plain_spec], WAN, seed=3)
    dropped, empty = _dropout_batches(tmp_path / "b", caption_dropout_rate=0.5)
    for epoch in range(3):
        keys = [[e.item_key for e in b] for b in dropped.batches_for_epoch(epoch)]
        assert keys == [[e.item_key for e in b] for b in plain.batches_for_epoch(epoch)]  # order untouched
        assert dropped.batches_for_epoch(epoch) == dropped.batches_for_epoch(epoch)  # same draws every time
    # the draws: one uniform per entry in training order from the (seed, epoch) stream
    rng = random.Random("3/1/caption_dropout")
    expected = [rng.random() < 0.5 for _ in range(6)]
    got = [e.text_path == empty for b in dropped.batches_for_epoch(1) for e in b]
    assert got == expected and any(got) and not all(got)


def test_caption_dropout_every_n_epochs_drops_every_caption_of_those_epochs(tmp_path):
    batches, empty = _dropout_batches(tmp_path, caption_dropout_every_n_epochs=2)
    dropped = [{e.text_path == empty for b in batches.batches_for_epoch(epoch) for e in b} for epoch in range(4)]
    assert dropped == [{False}, {True}, {False}, {True}]  # epochs 2 and 4 (1-based)


def test_caption_dropout_without_the_empty_caption_cache_says_what_to_run(tmp_path):
    s = spec(tmp_path, 0, caption_dropout_rate=0.1)
    add_cache(s, "a")
    with pytest.raises(UserError, match="caption dropout needs the empty caption's cache .*wan_empty_caption_te"
                                        ".* run wan_cache_text_encoder_outputs.py"):
        CachedBatches([s], WAN, seed=0, text_cache_command="wan_cache_text_encoder_outputs.py")


# ---- validation loss ------------------------------------------------------------------------------


class _LinearArch:
    """predict = a fixed linear map of the noisy latents: enough to check fixed noise and fixed timesteps."""

    def latents_from_cache(self, latents):
        return latents

    def predict(self, dit, batch, noisy, timesteps):
        return dit(noisy) * (timesteps / 1000).view(-1, *[1] * (noisy.ndim - 1))


def test_validation_uses_fixed_noise_and_timesteps_and_leaves_every_training_rng_alone(tmp_path):
    s = spec(tmp_path, 0, batch_size=2)
    for i in range(3):
        add_cache(s, f"v{i}", value=i / 3)
    validation = ValidationLoss(CachedBatches([s], WAN, seed=5), seed=5)
    dit = torch.nn.Conv3d(2, 2, 1)
    torch.manual_seed(1)
    random.seed(1)
    before = (torch.get_rng_state(), random.getstate())
    first = validation.evaluate(_LinearArch(), dit, torch.device("cpu"), contextlib.nullcontext)
    second = validation.evaluate(_LinearArch(), dit, torch.device("cpu"), contextlib.nullcontext)
    assert first == second  # comparable between points of a run and between runs
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert list(first) == ["loss/validation", "loss/validation_t0-250", "loss/validation_t250-500",
                           "loss/validation_t500-750", "loss/validation_t750-1000"]
    assert first["loss/validation"] == pytest.approx(sum(list(first.values())[1:]) / 4, abs=0)
    assert VALIDATION_TIMESTEPS == (125.0, 375.0, 625.0, 875.0) and band_key(999.0) == "loss/validation_t750-1000"
