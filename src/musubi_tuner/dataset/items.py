"""What one cache item is: a media file (or a frame window of a video) bound to a bucket."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Item:
    dataset_index: int
    """Index of its `[[datasets]]` entry (0-based) in the TOML."""
    item_key: str
    """Stem used in the latent cache name; videos add `_{start:05d}-{count:03d}`."""
    caption_key: str
    """Stem used in the text-encoder cache name (the media stem; one per media file)."""
    media_path: Path
    """Image file, video file, or directory of frames."""
    caption: str
    original_size: tuple[int, int]
    """(width, height) of the source media."""
    bucket_size: tuple[int, int]
    """(width, height) the pixels are resized/cropped to."""
    frame_indices: list[int] | None = None
    """Source frame indices (after source_fps resampling) for a video window; None for images."""
    control_paths: list[Path] = field(default_factory=list)
    latent_cache_path: Path | None = None
    text_cache_path: Path | None = None
    mask_path: Path | None = None
    """Loss mask image (the media itself with `alpha_mask`); None: the item counts fully (dataset/masks.py)."""

    @property
    def frame_count(self) -> int:
        return 1 if self.frame_indices is None else len(self.frame_indices)


@dataclass
class ItemPixels:
    """Decoded media for one cache item, ready for the VAE."""

    pixels: torch.Tensor
    """uint8 (F, H, W, 3), already resized/cropped to the bucket; F = 1 for images."""
    control: list[torch.Tensor] = field(default_factory=list)
    """uint8 (F, H, W, 3) control images/videos (may be empty)."""
    control_alpha: list[torch.Tensor | None] = field(default_factory=list)
    """Per control image: its alpha channel as uint8 (H, W) at the control's size, None without one (FramePack
    one-frame training masks the control latents with it); empty for videos."""
    mask: torch.Tensor | None = None
    """float32 (H, W) loss mask in [0, 1] at the bucket size, or None (dataset/masks.py)."""
