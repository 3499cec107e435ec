"""FramePack generation planning: seconds <-> sections <-> latent paddings, and the index layouts per section.

The arithmetic is the reference's (`fpack_generate_video.py`): a section samples `latent_window_size` latent frames
(`4 * window - 3` pixel frames); the model's rate is 30 fps whatever `--fps` the file is written at.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from musubi_tuner.errors import UserError

MODEL_FPS = 30
"""The section count is computed at the rate FramePack was trained at (the reference hard-codes 30)."""
HISTORY_1X, HISTORY_2X, HISTORY_4X = 1, 2, 16
"""Clean history latents the packed model sees at full, 2x and 4x compression."""


def section_frames(latent_window_size: int) -> int:
    """Pixel frames one section samples (33 for the default window 9)."""
    return latent_window_size * 4 - 3


def section_count(video_seconds: float, latent_window_size: int) -> int:
    """Sections for a video length: round(seconds * 30 / (4 * window)), at least 1 (Python's round: halves to even)."""
    return int(max(round(video_seconds * MODEL_FPS / (latent_window_size * 4)), 1))


def seconds_for_sections(sections: int, latent_window_size: int, fps: float) -> float:
    """--video_sections as a length in seconds, as the reference reports it: (sections * 4 * window + 1) / fps."""
    return (sections * latent_window_size * 4 + 1) / fps


def total_latent_frames(sections: int, latent_window_size: int) -> int:
    """Latent frames of the finished video: every section's window plus the start image's latent."""
    return sections * latent_window_size + 1


def total_pixel_frames(sections: int, latent_window_size: int) -> int:
    """Decoded frames: the causal VAE turns T latent frames into 4 (T - 1) + 1."""
    return (total_latent_frames(sections, latent_window_size) - 1) * 4 + 1


def default_latent_paddings(sections: int) -> list[int]:
    """Vanilla (inverted) sampling: the padding of each section in sampling order.

    Up to 4 sections: n-1, ..., 1, 0. Longer videos: 3, 2, 2, ..., 2, 1, 0 (the reference found repeating 2 looks
    better than growing the padding)."""
    if sections > 4:
        return [3] + [2] * (sections - 3) + [1, 0]
    return list(reversed(range(sections)))


def parse_latent_paddings(text: str) -> list[int]:
    """--latent_paddings `3,2,1,0` -> [3, 2, 1, 0]; each a non-negative integer."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--latent_paddings {text!r}: expected comma-separated integers such as 3,2,1,0") from None
    if any(v < 0 for v in values):
        raise UserError(f"--latent_paddings {text!r}: paddings cannot be negative")
    return values


def latent_paddings(sections: int, user: list[int] | None = None) -> list[int]:
    """The paddings used: the user's first, the defaults for sections the user did not give; extra values are
    dropped. (The reference does the same for long videos; for 4 or fewer sections it fails on a short list.)"""
    paddings = default_latent_paddings(sections)
    if user:
        given = user[:sections]
        paddings[: len(given)] = given
    return paddings


@dataclass(frozen=True)
class SectionStep:
    """One section in sampling order."""

    loop_index: int
    section_index: int
    """Position in the video from the start (0 = first section shown)."""
    section_index_from_last: int
    """The same position counted from the end (-1 = last section); section prompts/images may use either."""
    latent_padding: int
    """Vanilla only: blank windows between the start image and this section (0 for F1)."""
    is_last_section: bool
    """Vanilla: the section that touches the start image (sampled last); F1: the final one."""


def plan_sections(sections: int, f1: bool, user_paddings: list[int] | None = None) -> list[SectionStep]:
    """The sections in the order they are sampled: vanilla runs from the end of the video back to the start, F1
    forward from the start image."""
    if f1:
        return [SectionStep(i, i, i - sections, 0, i == sections - 1) for i in range(sections)]
    paddings = latent_paddings(sections, user_paddings)
    steps = []
    for loop_index in range(sections):
        section_index = sections - 1 - loop_index
        steps.append(SectionStep(loop_index, section_index, -(loop_index + 1), paddings[loop_index], section_index == 0))
    return steps


@dataclass(frozen=True)
class SectionIndices:
    """Frame indices (1-D, int64) the packed model puts on each input of one section."""

    latent: torch.Tensor
    clean: torch.Tensor
    clean_2x: torch.Tensor
    clean_4x: torch.Tensor


def _split(sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.arange(sum(sizes)).split(sizes))


def vanilla_indices(latent_window_size: int, latent_padding: int) -> SectionIndices:
    """Inverted anti-drifting layout: [start | padding blanks | window | 1x post | 2x | 4x]."""
    pre, _blank, latent, post, x2, x4 = _split(
        [1, latent_padding * latent_window_size, latent_window_size, HISTORY_1X, HISTORY_2X, HISTORY_4X])
    return SectionIndices(latent, torch.cat([pre, post]), x2, x4)


def f1_indices(latent_window_size: int) -> SectionIndices:
    """F1 forward layout: [start | 4x | 2x | 1x | window]."""
    start, x4, x2, x1, latent = _split([1, HISTORY_4X, HISTORY_2X, HISTORY_1X, latent_window_size])
    return SectionIndices(latent, torch.cat([start, x1]), x2, x4)


def decode_chunks(sections: int, latent_window_size: int) -> list[slice]:
    """Latent slices decoded one by one (without --bulk_decode), in video order, over the finished latents
    (start latent first). Neighbours overlap by one window; their pixels are cross-faded over `section_frames`."""
    chunks = []
    start = 0
    for n in range(sections):
        first = n == 0
        length = 2 * latent_window_size + (1 if first else 0)
        chunks.append(slice(start, min(start + length, total_latent_frames(sections, latent_window_size))))
        start += latent_window_size + (1 if first else 0)
    return chunks


def cross_fade(earlier: torch.Tensor, later: torch.Tensor, overlap: int) -> torch.Tensor:
    """Join two (B, C, T, H, W) pixel clips whose last/first `overlap` frames show the same moment: over the overlap
    the weight moves linearly from the earlier clip (1 -> 0) to the later one."""
    weights = torch.linspace(1, 0, overlap, dtype=earlier.dtype, device=earlier.device).view(1, 1, -1, 1, 1)
    blended = weights * earlier[:, :, -overlap:] + (1 - weights) * later[:, :, :overlap]
    return torch.cat([earlier[:, :, :-overlap], blended, later[:, :, overlap:]], dim=2)
