"""Loss masks: find an item's mask, bring it to the bucket like the media, and shrink it to the latent grid.

A mask is a grayscale image with the media's stem in the dataset's `mask_directory` (or, with
`alpha_mask = true`, the image's own alpha channel): white = full weight, black = the loss ignores that
area. It must have the media's size (checked when items are listed, before any model loads). It is
cached beside the latents as the `mask` content, one weight per latent cell (area average), the same
weight for every latent frame of a video. Items without a mask count fully.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from musubi_tuner.dataset import media
from musubi_tuner.dataset.config import DatasetSpec
from musubi_tuner.dataset.items import Item, ItemPixels
from musubi_tuner.errors import DatasetConfigError

MASK_CONTENT = "mask"
"""Content name of the cached mask (file key `mask_float32`, batch key `mask`)."""


def index_masks(directory: Path) -> dict[str, Path]:
    """stem -> mask image in `directory` (any image extension)."""
    return {p.stem: p for p in sorted(directory.iterdir()) if p.is_file() and media.is_image(p)}


def attach_masks(items: list[Item], spec: DatasetSpec, stem_of) -> None:
    """Set `item.mask_path` for the items that have a mask; a mask of another size is a DatasetConfigError."""
    if not spec.has_masks:
        return
    found = index_masks(spec.mask_directory) if spec.mask_directory is not None else {}
    checked: dict[Path, Path | None] = {}
    for item in items:
        if item.media_path not in checked:
            checked[item.media_path] = _mask_of(item, spec, found.get(stem_of(item.media_path)))
        item.mask_path = checked[item.media_path]


def _mask_of(item: Item, spec: DatasetSpec, candidate: Path | None) -> Path | None:
    if spec.alpha_mask:
        return item.media_path if _has_alpha(item.media_path) else None
    if candidate is None:
        return None
    size = media.probe_image(candidate)
    if size != item.original_size:
        raise DatasetConfigError(
            f"{spec.label}: mask {candidate} is {size[0]}x{size[1]} but {item.media_path} is "
            f"{item.original_size[0]}x{item.original_size[1]}; save the mask at the media's size")
    return candidate


def _has_alpha(path: Path) -> bool:
    with Image.open(path) as img:
        return "A" in img.getbands() or "transparency" in img.info


def load_pixel_mask(item: Item, spec: DatasetSpec) -> torch.Tensor | None:
    """float32 (H, W) in [0, 1] at the item's bucket size (resized and cropped as the media), or None."""
    if item.mask_path is None:
        return None
    with Image.open(item.mask_path) as img:
        grey = img.convert("RGBA").getchannel("A") if spec.alpha_mask else img.convert("L")
        resized = media.resize_to_bucket(grey, item.bucket_size)
    return torch.from_numpy(np.ascontiguousarray(resized, dtype=np.float32) / 255.0)


def load_pixels_with_mask(item: Item, spec: DatasetSpec, bucket_step: int = 16) -> ItemPixels:
    """`media.load_item_pixels` plus the item's pixel mask (None without one)."""
    pixels = media.load_item_pixels(item, spec, bucket_step=bucket_step)
    pixels.mask = load_pixel_mask(item, spec)
    return pixels


def mask_on_latent_grid(mask: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """(H, W) pixel mask -> (1, [F,] h, w) weights broadcastable over `latents` (C, [F,] h, w): area average
    per latent cell, repeated over latent frames."""
    h, w = latents.shape[-2:]
    cells = torch.nn.functional.interpolate(mask[None, None].float(), size=(h, w), mode="area")[0, 0]
    return cells.expand(*latents.shape[1:-2], h, w).unsqueeze(0).contiguous()
