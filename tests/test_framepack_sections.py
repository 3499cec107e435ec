"""FramePack training-side sectioning against the reference's fpack_cache_latents.py arithmetic, worked out by
hand for small cases: frame k of the clip holds the value k + 1 everywhere, so 0 marks the zero history."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from musubi_tuner.architectures.framepack import cache_sections as cs
from musubi_tuner.architectures.framepack.architecture import section_cache_path
from musubi_tuner.dataset.cache_files import parse_latent_cache_name
from musubi_tuner.errors import UserError


def clip(latent_frames: int) -> torch.Tensor:
    return torch.arange(1, latent_frames + 1, dtype=torch.float32).view(1, -1, 1, 1).expand(2, -1, 2, 2).clone()


def frames_of(t: torch.Tensor) -> list[int]:
    """The marker value of each frame of a (C, F, H, W) tensor (asserting the frame is uniform)."""
    values = []
    for f in range(t.shape[1]):
        frame = t[:, f]
        assert torch.all(frame == frame.flatten()[0])
        values.append(int(frame.flatten()[0]))
    return values


def test_section_counts_and_trimming():
    assert cs.section_count(37, 9) == 1 and cs.used_frame_count(37, 9) == 37
    assert cs.section_count(45, 9) == 1 and cs.used_frame_count(45, 9) == 37  # 12 latents: 2 dropped
    assert cs.section_count(73, 9) == 2 and cs.used_frame_count(73, 9) == 73
    assert cs.section_count(33, 9) == 0
    with pytest.raises(UserError, match=r"clip.mp4: 33 frames .* \(37 = fp_latent_window_size 9"):
        cs.check_clip_length(33, 9, "clip.mp4")


def test_inverted_paddings_use_the_long_video_trick_after_four_sections():
    from musubi_tuner.architectures.framepack.generation_sections import default_latent_paddings

    assert default_latent_paddings(3) == [2, 1, 0]
    assert default_latent_paddings(4) == [3, 2, 1, 0]
    assert default_latent_paddings(6) == [3, 2, 2, 2, 1, 0]


def test_inverted_sections_emulate_backward_sampling():
    sections = cs.inverted_sections(clip(7), window=2)  # 3 sections of 2 latents after the start latent
    assert len(sections) == 3
    expected = [  # section index (time order) -> targets, clean, 2x, 4x frames; target/clean/2x/4x indices
        ([2, 3], [1, 4], [5, 6], [7] + [0] * 15, [1, 2], [0, 3], [4, 5], list(range(6, 22))),
        ([4, 5], [1, 6], [7, 0], [0] * 16, [3, 4], [0, 5], [6, 7], list(range(8, 24))),
        ([6, 7], [1, 0], [0, 0], [0] * 16, [5, 6], [0, 7], [8, 9], list(range(10, 26))),
    ]
    for got, (target, clean, h2, h4, idx, cidx, idx2, idx4) in zip(sections, expected):
        assert frames_of(got["latents"]) == target
        assert frames_of(got["latents_clean"]) == clean
        assert frames_of(got["latents_clean_2x"]) == h2
        assert frames_of(got["latents_clean_4x"]) == h4
        assert got["latent_indices"].tolist() == idx
        assert got["clean_latent_indices"].tolist() == cidx
        assert got["clean_latent_2x_indices"].tolist() == idx2
        assert got["clean_latent_4x_indices"].tolist() == idx4
        assert got["latent_indices"].dtype == torch.int64


def test_f1_sections_hold_the_past_latents():
    sections = cs.f1_sections(clip(7), window=2)
    expected = [  # targets, clean (start + 1x), 2x, last two of 4x
        ([2, 3], [1, 1], [0, 0], [0, 0]),
        ([4, 5], [1, 3], [1, 2], [0, 0]),
        ([6, 7], [1, 5], [3, 4], [1, 2]),
    ]
    for got, (target, clean, h2, h4_tail) in zip(sections, expected):
        assert frames_of(got["latents"]) == target
        assert frames_of(got["latents_clean"]) == clean
        assert frames_of(got["latents_clean_2x"]) == h2
        assert frames_of(got["latents_clean_4x"])[-2:] == h4_tail
        assert got["latent_indices"].tolist() == [20, 21]
        assert got["clean_latent_indices"].tolist() == [0, 19]
        assert got["clean_latent_2x_indices"].tolist() == [17, 18]
        assert got["clean_latent_4x_indices"].tolist() == list(range(1, 17))


def test_one_frame_default_adds_a_zero_post_latent():
    got = cs.one_frame_cache(clip(2), window=9, clean_indices=None, target_index=None, no_post=False, no_2x=False,
                             no_4x=False)
    assert frames_of(got["latents"]) == [2] and frames_of(got["latents_clean"]) == [1, 0]
    assert got["clean_latent_indices"].tolist() == [0, 10] and got["latent_indices"].tolist() == [9]
    assert got["clean_latent_2x_indices"].tolist() == [11, 12]
    assert got["clean_latent_4x_indices"].tolist() == list(range(13, 29))
    assert "latents_clean_2x" not in got and "latents_clean_4x" not in got


def test_one_frame_kisekaeichi_preset():
    got = cs.one_frame_cache(clip(3), window=9, clean_indices=[0, 10], target_index=1, no_post=True, no_2x=True,
                             no_4x=True)
    assert frames_of(got["latents_clean"]) == [1, 2] and frames_of(got["latents"]) == [3]
    assert got["clean_latent_indices"].tolist() == [0, 10] and got["latent_indices"].tolist() == [1]
    assert "clean_latent_2x_indices" not in got and "clean_latent_4x_indices" not in got


@pytest.mark.parametrize("stem", ["clip", "my_clip_v2"])
def test_section_cache_names_follow_the_reference(stem):
    path = section_cache_path(Path(f"/c/{stem}_00000-045_0640x0480_fp.safetensors"), 2)
    assert path == Path(f"/c/{stem}_00000-045-0002_0640x0480_fp.safetensors")
    parsed = parse_latent_cache_name(path.name, "fp", video=True)
    assert parsed.media_stem == stem and parsed.window == "00000-045-0002" and parsed.original_size == (640, 480)


def test_control_alpha_becomes_a_latent_mask():
    from musubi_tuner.architectures.framepack.architecture import latent_mask

    alpha = torch.full((32, 48), 255, dtype=torch.uint8)
    alpha[:16] = 0  # top half transparent
    mask = latent_mask(alpha, (4, 6))
    assert mask.shape == (4, 6) and torch.all(mask[0] == 0) and torch.all(mask[-1] == 1)


def test_framepack_buckets_pick_the_nearest_aspect_ratio():
    from musubi_tuner.architectures.framepack.buckets import BUCKETS_640, nearest_framepack_bucket

    assert len(BUCKETS_640) == 14 and all(h % 16 == 0 and w % 16 == 0 for h, w in BUCKETS_640)
    assert nearest_framepack_bucket(1080, 1920) == (480, 832)  # 16:9 -> 23040 off, the closest
    assert nearest_framepack_bucket(832, 480) == (832, 480)  # an exact match
    assert nearest_framepack_bucket(512, 512) == (640, 608)  # tie with (608, 640): the later one wins
    assert nearest_framepack_bucket(100, 10000) == (416, 960) and nearest_framepack_bucket(10000, 100) == (960, 416)
