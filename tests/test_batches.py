"""Batches from cache files: pairing with text caches, buckets by shape, repeats, (seed, epoch) order."""

from collections import Counter
from pathlib import Path

import pytest
import torch

from musubi_tuner.dataset.batches import CachedBatches
from musubi_tuner.dataset.cache_files import (
    latent_cache_name, latent_metadata, text_cache_name, video_item_key, write_cache, write_text_cache,
)
from musubi_tuner.dataset.config import DatasetSpec
from musubi_tuner.dataset.traits import DatasetTraits
from musubi_tuner.errors import UserError

WAN = DatasetTraits(cache_code="wan", architecture="wan")


def spec(tmp_path: Path, index: int, kind="image", batch_size=2, num_repeats=1, **kw) -> DatasetSpec:
    cache = tmp_path / f"cache{index}"
    cache.mkdir(exist_ok=True)
    return DatasetSpec(index=index, kind=kind, config_path=tmp_path / "ds.toml", resolution=(64, 64),
                       caption_extension=".txt", batch_size=batch_size, num_repeats=num_repeats, enable_bucket=True,
                       bucket_no_upscale=False, skip_corrupted_cache=kw.pop("skip_corrupted_cache", False),
                       cache_directory=cache, image_directory=tmp_path, **kw)


def add_cache(s: DatasetSpec, stem: str, hw=(4, 4), frames=1, text_len=3, value=0.0, window=None, text=True):
    key = video_item_key(stem, *window) if window else stem
    lat = torch.full((2, frames, *hw), value)
    write_cache(s.cache_directory / latent_cache_name(key, (hw[1] * 8, hw[0] * 8), "wan"), {"latents": lat}, WAN,
                latent_metadata((hw[1] * 8, hw[0] * 8), frames if window else None))
    if text:
        write_text_cache(s.cache_directory / text_cache_name(stem, "wan"), stem,
                         {"varlen_t5": torch.full((text_len, 3), value)}, WAN)


def test_buckets_repeats_and_len(tmp_path):
    a = spec(tmp_path, 0, batch_size=2, num_repeats=2)
    for i, stem in enumerate(["a_1", "a_2", "a_3"]):
        add_cache(a, stem, hw=(4, 4), value=i)
    add_cache(a, "wide_one", hw=(4, 8))
    b = spec(tmp_path, 1, batch_size=3)
    add_cache(b, "b", hw=(4, 4))
    batches = CachedBatches([a, b], WAN, seed=1)
    # dataset 0: bucket 4x4 has 3 caches x 2 repeats = 6 -> 3 batches; 4x8: 1 x 2 -> 1 batch; dataset 1: 1 batch
    assert len(batches) == 5
    epoch = batches.batches_for_epoch(0)
    assert len(epoch) == 5
    counts = Counter(e.item_key for batch in epoch for e in batch)
    assert counts == {"a_1": 2, "a_2": 2, "a_3": 2, "wide_one": 2, "b": 1}
    for batch in epoch:
        assert len({e.dataset_index for e in batch}) == 1  # datasets never mix
        shapes = {batches.load_batch([e])["latents"].shape for e in batch}
        assert len(shapes) == 1  # one bucket per batch


def test_order_is_a_function_of_seed_and_epoch(tmp_path):
    s = spec(tmp_path, 0, batch_size=1)
    for i in range(8):
        add_cache(s, f"img_{i}")
    keys = lambda b, e: [[x.item_key for x in batch] for batch in b.batches_for_epoch(e)]  # noqa: E731
    first, again = CachedBatches([s], WAN, seed=7), CachedBatches([s], WAN, seed=7)
    assert keys(first, 3) == keys(again, 3)  # a resumed run sees the same epoch
    assert keys(first, 3) != keys(first, 4)
    assert keys(first, 3) != keys(CachedBatches([s], WAN, seed=8), 3)


def test_load_batch_stacks_and_keeps_varlen_lists(tmp_path):
    s = spec(tmp_path, 0, batch_size=2)
    add_cache(s, "x", text_len=3, value=1.0)
    add_cache(s, "y", text_len=5, value=2.0)
    batches = CachedBatches([s], WAN)
    (batch,) = batches.batches_for_epoch(0)
    out = batches.load_batch(batch)
    assert out["latents"].shape == (2, 2, 1, 4, 4)
    assert isinstance(out["t5"], list) and sorted(t.shape[0] for t in out["t5"]) == [3, 5]
    by_key = {e.item_key: i for i, e in enumerate(batch)}
    assert out["latents"][by_key["y"]].unique().tolist() == [2.0]


def test_video_caches_pair_with_media_stem(tmp_path):
    s = spec(tmp_path, 0, kind="video", batch_size=1)
    add_cache(s, "my_clip", frames=2, window=(0, 5))
    write_cache(s.cache_directory / latent_cache_name(video_item_key("my_clip", 4, 5), (32, 32), "wan"),
                {"latents": torch.zeros(2, 2, 4, 4)}, WAN, latent_metadata((32, 32), 5))
    batches = CachedBatches([s], WAN)
    entries = [e for b in batches.batches_for_epoch(0) for e in b]
    assert sorted(e.item_key for e in entries) == ["my_clip_00000-005", "my_clip_00004-005"]
    assert {e.text_path.name for e in entries} == {"my_clip_wan_te.safetensors"}


def test_missing_text_cache_names_file_and_command(tmp_path):
    s = spec(tmp_path, 0)
    add_cache(s, "lonely", text=False)
    message = r"lonely_wan_te.safetensors not found .* run wan_cache_text_encoder_outputs.py"
    with pytest.raises(UserError, match=message):
        CachedBatches([s], WAN, text_cache_command="wan_cache_text_encoder_outputs.py")


def test_no_caches_is_an_error(tmp_path):
    with pytest.raises(UserError, match="no latent caches"):
        CachedBatches([spec(tmp_path, 0)], WAN)


def test_corrupted_cache_error_or_skip(tmp_path):
    s = spec(tmp_path, 0)
    add_cache(s, "good")
    (s.cache_directory / "bad_0032x0032_wan.safetensors").write_bytes(b"garbage")
    (s.cache_directory / "bad_wan_te.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="skip_corrupted_cache"):
        CachedBatches([s], WAN)
    s2 = spec(tmp_path, 0, skip_corrupted_cache=True)
    assert len(CachedBatches([s2], WAN)) == 1


def test_non_finite_inputs_are_found_and_named_by_cache_file(tmp_path):
    s = spec(tmp_path, 0, batch_size=2)
    add_cache(s, "good", value=1.0)
    add_cache(s, "bad", value=float("inf"))  # the writer zeroes NaN, not Inf; a foreign tool may write either
    batches = CachedBatches([s], WAN)
    (entries,) = batches.batches_for_epoch(0)
    assert not batches.inputs_are_finite(batches.load_batch(entries))
    cache = s.cache_directory
    assert batches.non_finite_caches(entries) == [f"{cache / 'bad_0032x0032_wan.safetensors'} (latents)",
                                                  f"{cache / 'bad_wan_te.safetensors'} (t5)"]
    good = [e for e in entries if e.item_key == "good"]
    assert batches.inputs_are_finite(batches.load_batch(good)) and batches.non_finite_caches(good) == []
