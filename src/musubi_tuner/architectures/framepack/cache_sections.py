"""Training-side FramePack sectioning: one clip's latents -> the per-section training caches.

What the reference's `fpack_cache_latents.py` writes, as pure tensor arithmetic (no models, no files):
- a clip of F frames has `(F - 1) // 4 + 1` latent frames; after the start latent it is cut into
  `sections = (latent_frames - 1) // window` windows of `window` latents (the rest is dropped);
- each section is one cache: its target latents plus the clean history the sampler would see at that point:
  `latents_clean` (start latent + 1 recent latent), `latents_clean_2x` (2), `latents_clean_4x` (16) and the
  RoPE frame index of every latent (`latent_indices`, `clean_latent_indices`, `clean_latent_2x_indices`,
  `clean_latent_4x_indices`);
- plain FramePack (inverted anti-drifting) emulates its backward sampling order: sections are visited from
  the last to the first, the history holds the (true) future sections, and the target sits after a blank
  padding of `padding * window` indices; F1 (`--f1`) samples forwards: the history holds the past latents;
- one-frame training (`--one_frame`, image datasets): the control images' latents are the clean latents at
  the dataset's `fp_1f_clean_indices`, the image itself is the target at `fp_1f_target_index`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from musubi_tuner.architectures.framepack.generation_sections import (
    HISTORY_1X,
    HISTORY_2X,
    HISTORY_4X,
    default_latent_paddings,
    f1_indices,
    vanilla_indices,
)
from musubi_tuner.errors import UserError

# the caches hold what the sampler would see, so the layouts and paddings are the generation side's
HISTORY_SPLIT = (HISTORY_1X, HISTORY_2X, HISTORY_4X)
"""Clean history latents at full (1x), 2x and 4x compression: the sampler keeps 1 + 2 + 16 of them."""
HISTORY_LEN = sum(HISTORY_SPLIT)


def latent_frame_count(frames: int) -> int:
    """Video frames (4N+1) -> latent frames of the HunyuanVideo VAE."""
    return (frames - 1) // 4 + 1


def section_count(frames: int, window: int) -> int:
    """Sections of `window` latents a clip of `frames` frames gives (0: too short)."""
    return (latent_frame_count(frames) - 1) // window


def used_frame_count(frames: int, window: int) -> int:
    """Frames actually encoded: the start frame plus whole sections (the reference trims the rest)."""
    return section_count(frames, window) * window * 4 + 1


def check_clip_length(frames: int, window: int, what: str) -> int:
    """The section count of a clip, or a UserError naming it when it is shorter than one section."""
    sections = section_count(frames, window)
    if sections < 1:
        need = window * 4 + 1
        raise UserError(f"{what}: {frames} frames are fewer than one FramePack section needs ({need} = "
                        f"fp_latent_window_size {window} x 4 + 1); raise target_frames / max_frames to at least "
                        f"{need} or lower fp_latent_window_size")
    return sections


def _section(target: torch.Tensor, latent_indices: torch.Tensor, clean: torch.Tensor, clean_indices: torch.Tensor,
             clean_2x: torch.Tensor, indices_2x: torch.Tensor, clean_4x: torch.Tensor,
             indices_4x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"latents": target.contiguous(), "latent_indices": latent_indices,
            "latents_clean": clean.contiguous(), "clean_latent_indices": clean_indices,
            "latents_clean_2x": clean_2x.contiguous(), "clean_latent_2x_indices": indices_2x,
            "latents_clean_4x": clean_4x.contiguous(), "clean_latent_4x_indices": indices_4x}


def inverted_sections(latents: torch.Tensor, window: int) -> list[dict[str, torch.Tensor]]:
    """Plain FramePack: (C, F, H, W) latents of a trimmed clip (F = sections * window + 1) -> one content dict
    per section, index 0 = first section in time."""
    sections = (latents.shape[1] - 1) // window
    c, _, h, w = latents.shape
    history = latents.new_zeros((c, HISTORY_LEN, h, w))
    start = latents[:, :1]
    out: dict[int, dict[str, torch.Tensor]] = {}
    for step, padding in enumerate(default_latent_paddings(sections)):
        index = sections - 1 - step  # sampling runs from the last section in time to the first
        layout = vanilla_indices(window, padding)
        first = 1 + index * window
        target = latents[:, first:first + window]
        post_lat, lat_2x, lat_4x = history.split(HISTORY_SPLIT, dim=1)
        out[index] = _section(target, layout.latent, torch.cat([start, post_lat], dim=1), layout.clean,
                              lat_2x, layout.clean_2x, lat_4x, layout.clean_4x)
        # what the sampler has generated after this step: this section (with the start latent at the very end)
        generated = latents[:, :window + 1] if index == 0 else target
        history = torch.cat([generated, history], dim=1)[:, :HISTORY_LEN]
    return [out[i] for i in range(sections)]


def f1_sections(latents: torch.Tensor, window: int) -> list[dict[str, torch.Tensor]]:
    """FramePack-F1 (forward sampling): (C, F, H, W) latents of a trimmed clip -> one content dict per section;
    the history is the latents just before the section, zero where the clip has none yet."""
    sections = (latents.shape[1] - 1) // window
    c, _, h, w = latents.shape
    layout = f1_indices(window)
    out = []
    for index in range(sections):
        first = 1 + index * window
        history = latents.new_zeros((c, HISTORY_LEN, h, w))
        past = latents[:, max(0, first - HISTORY_LEN):first]
        history[:, HISTORY_LEN - past.shape[1]:] = past
        lat_4x, lat_2x, lat_1x = history.split(HISTORY_SPLIT[::-1], dim=1)
        out.append(_section(latents[:, first:first + window], layout.latent,
                            torch.cat([latents[:, :1], lat_1x], dim=1), layout.clean,
                            lat_2x, layout.clean_2x, lat_4x, layout.clean_4x))
    return out


def one_frame_cache(latents: torch.Tensor, *, window: int, clean_indices: Sequence[int] | None,
                    target_index: int | None, no_post: bool, no_2x: bool, no_4x: bool) -> dict[str, torch.Tensor]:
    """One-frame training: (C, N + 1, H, W) latents (N control images, then the target image, each encoded on
    its own) -> the cache content. Zero 2x/4x latents are not stored (the trainer fills them in, as the
    reference); only their indices are, unless `no_2x` / `no_4x`."""
    clean_idx = list(clean_indices) if clean_indices else [0]
    clean = latents[:, :-1]
    history = vanilla_indices(window, 0)  # one section right after the start: post, 2x and 4x history indices
    if not no_post:  # a zero "recent history" latent right after the window
        clean_idx.append(int(history.clean[-1]))
        clean = F.pad(clean, (0, 0, 0, 0, 0, 1))
    content = {"latents": latents[:, -1:].contiguous(),
               "latent_indices": torch.tensor([window if target_index is None else target_index]),
               "latents_clean": clean.contiguous(), "clean_latent_indices": torch.tensor(clean_idx)}
    if not no_2x:
        content["clean_latent_2x_indices"] = history.clean_2x
    if not no_4x:
        content["clean_latent_4x_indices"] = history.clean_4x
    return content
