"""Kontext control (reference) images at generation time: the reference tool's two sizing rules.

- default: resized (cover + center crop) to the preferred Kontext resolution closest in aspect
  ratio (BFL trained at those 17 sizes; other sizes work but drift);
- `--no_resize_control` (and samples during training, as the reference does): kept at its own size,
  cropped from the top-left corner down to multiples of 16 (2x2 packing of 8x latents).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from musubi_tuner.architectures.flux_kontext.packing import nearest_preferred_resolution
from musubi_tuner.errors import UserError

PIXEL_MULTIPLE = 16
"""Control and target sizes must be multiples of 16 px: 8x VAE downsampling, then 2x2 packing."""


def control_image_size(width: int, height: int, resize_to_preferred: bool) -> tuple[int, int]:
    """(width, height) the control image is brought to."""
    if resize_to_preferred:
        return nearest_preferred_resolution(width, height)
    w, h = width // PIXEL_MULTIPLE * PIXEL_MULTIPLE, height // PIXEL_MULTIPLE * PIXEL_MULTIPLE
    if w == 0 or h == 0:
        raise UserError(f"control image {width}x{height} is smaller than {PIXEL_MULTIPLE}x{PIXEL_MULTIPLE} pixels")
    return w, h


def load_control_image(
    path: str | Path, resize_to_preferred: bool, flag: str = "--control_image_path"
) -> torch.Tensor:
    """A control image file -> uint8 (H, W, 3), sized by the rules in the module docstring.

    flag: the option `path` came from, named in errors (`--control_image_path`, or a prompt's `--ci`).
    """
    from musubi_tuner.dataset.media import resize_to_bucket
    from musubi_tuner.inference.images import open_image_for_flag

    image = open_image_for_flag(path, flag)
    size = control_image_size(*image.size, resize_to_preferred)
    if resize_to_preferred:
        array = resize_to_bucket(image, size)
    else:
        array = np.asarray(image.crop((0, 0, *size)))
    return torch.from_numpy(np.array(array, dtype=np.uint8, copy=True))
