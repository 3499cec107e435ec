"""Conditioning images for generation (I2V start/end images, Kontext control images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from musubi_tuner.errors import UserError


def load_image_resized(path: str | Path, width: int, height: int, flag: str = "--image_path") -> torch.Tensor:
    """The image at `path`, scaled to cover (width, height) and center-cropped, as uint8 (H, W, 3).

    Uses the dataset's resize so generation conditions on images prepared exactly like training data.
    flag: the option `path` came from, named in errors (`--image_path`, `--end_image_path`, ...).
    """
    from musubi_tuner.dataset.media import resize_to_bucket

    image = open_image_for_flag(path, flag)
    return torch.from_numpy(np.array(resize_to_bucket(image, (width, height)), copy=True))


def open_image_for_flag(path: str | Path, flag: str):
    """The RGB PIL image at `path`; a missing or undecodable file raises a UserError naming `flag` and the path."""
    from musubi_tuner.dataset.media import MediaError, load_image_rgb

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: image not found (check the path)")
    try:
        return load_image_rgb(path)
    except MediaError as exc:  # its message names only the file
        raise UserError(f"{flag} {path}: {exc}") from exc


def load_video_resized(path: str | Path, frames: int, width: int, height: int, flag: str = "--video_path") -> torch.Tensor:
    """The first `frames` frames of a video file (or folder of frames), each resized like `load_image_resized`,
    as uint8 (F, H, W, 3). A shorter video is an error naming `flag`, as the reference refuses it."""
    from musubi_tuner.dataset.media import MediaError, decode_frames, probe_video, resize_to_bucket

    path = Path(path)
    if not path.exists():
        raise UserError(f"{flag} {path}: video not found (check the path)")
    try:
        count, _ = probe_video(path)
        if count < frames:
            raise UserError(f"{flag} {path}: the video has {count} frames but {frames} are generated; "
                            f"use a longer video or a smaller --video_length")
        decoded = decode_frames(path, list(range(frames)))
    except MediaError as exc:
        raise UserError(f"{flag} {path}: {exc}") from exc
    return torch.from_numpy(np.stack([resize_to_bucket(f, (width, height)) for f in decoded]))
