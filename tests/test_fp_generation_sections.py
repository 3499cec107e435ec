"""FramePack section planning against the reference's arithmetic; every expected value below was worked out by hand
from the reference's formulas (fpack_generate_video.py), not by running this code."""

import pytest
import torch

from musubi_tuner.architectures.framepack import generation_sections as gs
from musubi_tuner.errors import UserError

# (seconds, window, sections): round(seconds * 30 / (4 * window)), at least 1, Python rounds halves to even.
SECONDS_TABLE = [
    (5.0, 9, 4),     # 150 / 36 = 4.17
    (1.0, 9, 1),     # 30 / 36 = 0.83
    (0.5, 9, 1),     # 15 / 36 = 0.42 -> 0 -> at least 1
    (3.0, 9, 2),     # 90 / 36 = 2.5 -> 2 (half to even)
    (4.2, 9, 4),     # 126 / 36 = 3.5 -> 4 (half to even)
    (60.0, 9, 50),   # 1800 / 36
    (5.0, 5, 8),     # 150 / 20 = 7.5 -> 8
    (1.5, 5, 2),     # 45 / 20 = 2.25
]


@pytest.mark.parametrize("seconds,window,sections", SECONDS_TABLE)
def test_section_count_matches_reference_table(seconds, window, sections):
    assert gs.section_count(seconds, window) == sections


# (sections, window): latent frames n*w+1, decoded frames 4*n*w+1, frames sampled per section 4w-3
FRAMES_TABLE = [(1, 9, 10, 37), (4, 9, 37, 145), (50, 9, 451, 1801), (2, 5, 11, 41)]


@pytest.mark.parametrize("sections,window,latents,pixels", FRAMES_TABLE)
def test_frames_for_sections(sections, window, latents, pixels):
    assert gs.total_latent_frames(sections, window) == latents
    assert gs.total_pixel_frames(sections, window) == pixels


def test_section_frames_and_seconds_for_sections():
    assert gs.section_frames(9) == 33
    assert gs.seconds_for_sections(4, 9, 30) == pytest.approx(145 / 30)
    # at 30 fps --video_sections N comes back as N sections
    for n in (1, 2, 4, 7, 50):
        assert gs.section_count(gs.seconds_for_sections(n, 9, 30), 9) == n


PADDINGS_TABLE = [
    (1, [0]),
    (2, [1, 0]),
    (3, [2, 1, 0]),
    (4, [3, 2, 1, 0]),
    (5, [3, 2, 2, 1, 0]),
    (7, [3, 2, 2, 2, 2, 1, 0]),
]


@pytest.mark.parametrize("sections,paddings", PADDINGS_TABLE)
def test_default_latent_paddings(sections, paddings):
    assert gs.default_latent_paddings(sections) == paddings


def test_user_latent_paddings_override_defaults_from_the_front():
    assert gs.latent_paddings(5, [0, 0]) == [0, 0, 2, 1, 0]
    assert gs.latent_paddings(3, [1, 1, 1, 1, 1]) == [1, 1, 1]
    assert gs.latent_paddings(4, [0]) == [0, 2, 1, 0]
    assert gs.parse_latent_paddings("3, 2,1,0") == [3, 2, 1, 0]
    with pytest.raises(UserError, match="--latent_paddings"):
        gs.parse_latent_paddings("3,x")
    with pytest.raises(UserError, match="negative"):
        gs.parse_latent_paddings("3,-1")


def test_vanilla_plan_runs_backwards_f1_forwards():
    plan = gs.plan_sections(4, f1=False)
    assert [s.section_index for s in plan] == [3, 2, 1, 0]
    assert [s.section_index_from_last for s in plan] == [-1, -2, -3, -4]
    assert [s.latent_padding for s in plan] == [3, 2, 1, 0]
    assert [s.is_last_section for s in plan] == [False, False, False, True]
    f1 = gs.plan_sections(4, f1=True)
    assert [s.section_index for s in f1] == [0, 1, 2, 3]
    assert [s.section_index_from_last for s in f1] == [-4, -3, -2, -1]
    assert [s.latent_padding for s in f1] == [0, 0, 0, 0]
    assert [s.is_last_section for s in f1] == [False, False, False, True]


def test_vanilla_indices_layout():
    # window 9, padding 2: [0 | 1..18 blank | 19..27 window | 28 post | 29,30 | 31..46]
    idx = gs.vanilla_indices(9, 2)
    assert idx.latent.tolist() == list(range(19, 28))
    assert idx.clean.tolist() == [0, 28]
    assert idx.clean_2x.tolist() == [29, 30]
    assert idx.clean_4x.tolist() == list(range(31, 47))
    zero = gs.vanilla_indices(9, 0)
    assert zero.latent.tolist() == list(range(1, 10)) and zero.clean.tolist() == [0, 10]


def test_f1_indices_layout():
    # [0 | 1..16 4x | 17,18 2x | 19 1x | 20..28 window]
    idx = gs.f1_indices(9)
    assert idx.clean.tolist() == [0, 19]
    assert idx.clean_4x.tolist() == list(range(1, 17))
    assert idx.clean_2x.tolist() == [17, 18]
    assert idx.latent.tolist() == list(range(20, 29))


def test_decode_chunks_match_reference_slices():
    # 4 sections of 9: [0:19], [10:28], [19:37], [28:37] (the last one clipped at 37 latent frames)
    assert gs.decode_chunks(4, 9) == [slice(0, 19), slice(10, 28), slice(19, 37), slice(28, 37)]
    assert gs.decode_chunks(1, 9) == [slice(0, 10)]


def test_cross_fade_lengths_and_weights():
    a = torch.zeros(1, 1, 5, 1, 1)
    b = torch.ones(1, 1, 4, 1, 1)
    out = gs.cross_fade(a, b, 3)
    assert out.shape[2] == 6
    assert out.flatten().tolist() == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
