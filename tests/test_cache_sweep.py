"""The caching drivers never lose caches silently: empty datasets stop the run, caches of media that were
unusable this run are kept, removals are counted and named, --keep_cache keeps everything; captions with
BOMs and empty captions are handled and counted."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from musubi_tuner.architectures.base import Architecture
from musubi_tuner.caching import run_latent_caching, run_text_caching
from musubi_tuner.dataset.traits import DatasetTraits
from musubi_tuner.errors import DatasetConfigError


class FakeArch(Architecture):
    """No model: latents are zeros of the right shape, prompts become one small tensor."""

    name = script_prefix = "fake"
    traits = DatasetTraits(cache_code="fake", architecture="fake", frame_stride=None, target_fps=None)
    loads = 0

    def load_latent_encoders(self, args, device):
        FakeArch.loads += 1

    def encode_latents(self, encoders, batch, args):
        return [{"latents": torch.zeros(self.latent_shape(p.pixels.shape[2], p.pixels.shape[1], 1))} for p in batch]

    def latent_shape(self, width, height, frames):
        return (4, height // 8, width // 8)

    def load_text_encoders(self, args, device):
        FakeArch.loads += 1

    def encode_prompts(self, encoders, prompts):
        return [{"varlen_t5": torch.full((2, 4), float(len(p)))} for p in prompts]


def args(toml: Path, *, keep_cache=False, skip_existing=True) -> argparse.Namespace:
    return argparse.Namespace(dataset_config=str(toml), batch_size=None, num_workers=1, skip_existing=skip_existing,
                              keep_cache=keep_cache, device="cpu", strict=False)


def image(folder: Path, stem: str, caption: str | bytes = "a picture") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    text = folder / f"{stem}.txt"
    text.write_bytes(caption) if isinstance(caption, bytes) else text.write_text(caption)
    return path


@pytest.fixture
def dataset(tmp_path):
    media, cache = tmp_path / "media", tmp_path / "cache"
    for stem in ("a", "b", "c"):
        image(media, stem)
    image(tmp_path / "other", "d")  # a second dataset that stays intact
    toml = tmp_path / "ds.toml"
    toml.write_text('[general]\nresolution = [32, 32]\ncaption_extension = ".txt"\n\n'
                    f'[[datasets]]\nimage_directory = "{media.as_posix()}"\ncache_directory = "{cache.as_posix()}"\n'
                    f'[[datasets]]\nimage_directory = "{(tmp_path / "other").as_posix()}"\n')
    arch = FakeArch()
    run_latent_caching(arch, args(toml))
    run_text_caching(arch, args(toml))
    assert len(list(cache.iterdir())) == 6
    return arch, toml, media, cache


def test_an_empty_media_folder_is_an_error_and_keeps_every_cache(dataset):
    arch, toml, media, cache = dataset
    for p in media.iterdir():
        p.rename(p.with_name("x" + p.name + ".moved"))  # as if the folder were unmounted or emptied
    loads = FakeArch.loads
    for run in (run_latent_caching, run_text_caching):
        with pytest.raises(DatasetConfigError, match=r"ds.toml \[\[datasets\]\]\[0\]: .*media yields 0 items"):
            run(arch, args(toml))
    assert len(list(cache.iterdir())) == 6 and FakeArch.loads == loads


def test_caches_of_unreadable_media_are_kept_and_removals_are_named(dataset, caplog):
    arch, toml, media, cache = dataset
    (media / "b.png").write_bytes(b"not a png any more")  # unreadable this run
    (media / "c.png").unlink()  # really gone
    (media / "c.txt").unlink()
    with caplog.at_level(logging.WARNING):
        latent = run_latent_caching(arch, args(toml))
        text = run_text_caching(arch, args(toml))
    assert sorted(p.name for p in cache.iterdir()) == ["a_0032x0032_fake.safetensors", "a_fake_te.safetensors",
                                                       "b_0032x0032_fake.safetensors", "b_fake_te.safetensors"]
    assert [p.name for p in latent.removed_stale] == ["c_0032x0032_fake.safetensors"]
    assert [p.name for p in text.removed_stale] == ["c_fake_te.safetensors"]
    assert latent.kept_for_skipped == 1 and text.kept_for_skipped == 1
    report = latent.report("latent caches")
    assert "1 stale removed" in report and "removed: c_0032x0032_fake.safetensors" in report
    assert "kept 1 cache(s) of skipped media files" in report
    assert "removed 1 stale latent cache(s)" in caplog.text and "c_0032x0032_fake.safetensors" in caplog.text


def test_keep_cache_keeps_caches_of_items_no_longer_in_the_dataset(dataset):
    arch, toml, media, cache = dataset
    for name in ("c.png", "c.txt"):
        (media / name).unlink()
    summary = run_latent_caching(arch, args(toml, keep_cache=True))
    assert summary.removed_stale == [] and summary.kept_not_in_dataset == 1
    assert (cache / "c_0032x0032_fake.safetensors").exists()
    assert "kept 1 cache(s) of items no longer in the dataset (--keep_cache)" in summary.report("latent caches")


def test_files_that_are_not_cache_names_are_never_removed(dataset):
    arch, toml, media, cache = dataset
    (cache / "notes_fake.safetensors").write_bytes(b"x")  # no WxH size token: not one of ours
    assert run_latent_caching(arch, args(toml)).removed_stale == []
    assert (cache / "notes_fake.safetensors").exists()


def test_captions_with_boms_decode_and_empty_captions_are_warned_once_and_counted(tmp_path, caplog):
    media, text = tmp_path / "media", "un chat é"
    image(media, "utf8bom", b"\xef\xbb\xbf" + text.encode("utf-8"))
    image(media, "utf16le", text.encode("utf-16"))  # Python writes the BOM + native order
    image(media, "utf16be", b"\xfe\xff" + text.encode("utf-16-be"))
    image(media, "empty", " \n")
    toml = tmp_path / "ds.toml"
    toml.write_text('[general]\nresolution = [32, 32]\ncaption_extension = ".txt"\n\n'
                    f'[[datasets]]\nimage_directory = "{media.as_posix()}"\n')
    with caplog.at_level(logging.WARNING):
        summary = run_text_caching(FakeArch(), args(toml))
    assert summary.written == 4 and summary.bad_media == []
    assert summary.empty_captions == [media / "empty.txt"]
    assert "4 written, 0 already cached (skipped), 0 stale removed, 0 media files skipped, 1 empty captions" \
        in summary.report("text encoder caches")
    assert caplog.text.count("empty caption in") == 1 and str(media / "empty.txt") in caplog.text
    from musubi_tuner.dataset.cache_files import read_metadata

    for stem in ("utf8bom", "utf16le", "utf16be"):
        assert read_metadata(media / f"{stem}_fake_te.safetensors")["caption1"] == text
