"""Conditioning images for generation (I2V start/end images, Kontext control images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from musubi_tuner.errors import UserError


def load_image_resized(path: str | Path, width: int, height: int) -> torch.Tensor:
    """The image at `path`, scaled to cover (width, height) and center-cropped, as uint8 (H, W, 3).

    Uses the dataset's resize so generation conditions on images prepared exactly like training data.
    """
    from musubi_tuner.dataset.media import load_image_rgb, resize_to_bucket

    path = Path(path)
    if not path.is_file():
        raise UserError(f"image not found: {path} (check --image_path / --end_image_path / --control_image_path)")
    return torch.from_numpy(np.array(resize_to_bucket(load_image_rgb(path), (width, height)), copy=True))
