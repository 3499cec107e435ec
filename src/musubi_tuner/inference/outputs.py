"""Writing generation results: H.264 mp4, PNG frames, latents with metadata. All writes are atomic.

File names follow the reference: `{timestamp}_{seed}.mp4`, `{timestamp}_{seed}_latent.safetensors`,
PNG frames `{timestamp}_{seed}/{timestamp}_{seed}_{i:03d}.png` (a single image: `{timestamp}_{seed}_000.png`
directly in the save folder), the timestamp as `%Y%m%d-%H%M%S-` plus milliseconds.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from musubi_tuner.errors import CheckpointError, UserError
from musubi_tuner.utils.atomic import atomic_path, save_safetensors_atomic

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("video", "images", "latent", "both", "latent_images")
LATENT_KEY = "latent"
VIDEO_BIT_RATE = 4_000_000


def output_basename(seed: int | str, now: datetime | None = None) -> str:
    """`{timestamp}_{seed}` with the reference's millisecond timestamp, e.g. `20250101-120000-123_42`."""
    now = now or datetime.now()
    return f"{now.strftime('%Y%m%d-%H%M%S-%f')[:-3]}_{seed}"


def _as_uint8_frames(frames: Any) -> np.ndarray:
    """(F,H,W,3) uint8 numpy from a tensor/array; a leading batch of 1 is dropped, (H,W,3) becomes 1 frame."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim == 5 and frames.shape[0] == 1:
        frames = frames[0]
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames shaped (F, H, W, 3), got {tuple(frames.shape)}")
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {frames.dtype}")
    return np.ascontiguousarray(frames)


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even width and height: repeat the last row/column where one is odd."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def _video_codec() -> str:
    import av

    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except Exception:  # PyAV builds without GPL codecs lack libx264
        logger.warning("this PyAV build has no libx264 encoder; writing MPEG-4 Part 2 (mpeg4) video instead")
        return "mpeg4"


def save_video_mp4(frames: Any, path: str | os.PathLike, fps: float, bit_rate: int = VIDEO_BIT_RATE) -> Path:
    """Write uint8 frames (F,H,W,3) as an H.264 yuv420p mp4 (odd sizes padded to even)."""
    import av

    frames = _pad_to_even(_as_uint8_frames(frames))
    height, width = frames.shape[1:3]
    rate = Fraction(fps).limit_denominator(1001)
    path = Path(path)
    with atomic_path(path) as tmp:
        # The temp name has no .mp4 suffix, so the container format is given explicitly.
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream(_video_codec(), rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.bit_rate = bit_rate
            for array in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
            container.mux(stream.encode())
    return path


def save_images(frames: Any, prefix: str | os.PathLike) -> list[Path]:
    """Write each frame as `{prefix}_{i:03d}.png` (a single image too, as the reference); the folder is created."""
    from PIL import Image

    frames = _as_uint8_frames(frames)
    prefix = Path(prefix)
    paths = []
    for i, array in enumerate(frames):
        path = prefix.with_name(f"{prefix.name}_{i:03d}.png")
        with atomic_path(path) as tmp:
            Image.fromarray(array).save(tmp, format="PNG")
        paths.append(path)
    return paths


def save_latent(latent: torch.Tensor, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Save one latent as safetensors (key `latent`); metadata values are stored as strings."""
    meta = None if metadata is None else {str(k): str(v) for k, v in metadata.items() if v is not None}
    save_safetensors_atomic({LATENT_KEY: latent.detach().cpu()}, path, metadata=meta)
    return Path(path)


def load_latent(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, str]]:
    """Read a latent written by `save_latent` (or the reference tool): (tensor, metadata)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--latent_path {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            metadata = dict(f.metadata() or {})
            if not keys:
                raise CheckpointError(f"{path} holds no tensor; pass a latent file written with --output_type latent")
            tensor = f.get_tensor(LATENT_KEY if LATENT_KEY in keys else keys[0])
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot read latent file {path}: {exc}") from exc
    return tensor, metadata


def write_outputs(
    output_type: str,
    frames: Any | None,
    latent: torch.Tensor | None,
    save_path: str | os.PathLike,
    seed: int | str,
    fps: float,
    metadata: dict[str, Any] | None = None,
    basename: str | None = None,
) -> list[Path]:
    """Write what `--output_type` asks for into `save_path`; returns the written files.

    video | images | latent | both (video + latent) | latent_images (latent + PNG frames).
    `frames` (uint8 (F,H,W,3)) is needed for video/images output, `latent` for latent output.
    `basename` overrides `{timestamp}_{seed}` (samples during training use their own names).
    """
    if output_type not in OUTPUT_TYPES:
        raise UserError(f"unknown --output_type {output_type!r}; choose one of: {', '.join(OUTPUT_TYPES)}")
    save_path = Path(save_path)
    name = basename or output_basename(seed)
    written: list[Path] = []
    if output_type in ("latent", "both", "latent_images"):
        if latent is None:
            raise ValueError(f"output_type {output_type} needs the latent")
        written.append(save_latent(latent, save_path / f"{name}_latent.safetensors", metadata))
    if output_type in ("video", "both"):
        written.append(save_video_mp4(_require(frames, output_type), save_path / f"{name}.mp4", fps))
    if output_type in ("images", "latent_images"):
        frames = _as_uint8_frames(_require(frames, output_type))
        # Several frames get their own folder, one image sits directly in save_path (as the reference).
        prefix = save_path / name / name if len(frames) > 1 else save_path / name
        written.extend(save_images(frames, prefix))
    return written


def _require(frames: Any | None, output_type: str) -> Any:
    if frames is None:
        raise ValueError(f"output_type {output_type} needs decoded frames")
    return frames
