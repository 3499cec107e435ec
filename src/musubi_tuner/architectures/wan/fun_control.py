"""Wan2.1 Fun-Control (alibaba-pai Wan2.1-Fun-Control; tasks `t2v-1.3B-FC`, `t2v-14B-FC`, `i2v-14B-FC`).

The DiT takes 48 input channels: the 16 noisy latents, then the 16 latents of the control video (pose, depth,
edges ... encoded by the Wan VAE), then 16 image latents: those of the I2V start frame for `i2v-14B-FC` (the I2V
conditioning without its 4 mask channels, every frame after the first zeroed), zeros for the T2V tasks. As in the
reference, control videos come from the dataset's `control_directory` (same stem, a video or a folder of frames)
and are cached as `latents_control_{F}x{H}x{W}_{dtype}`; generation reads `--control_path` (`--cn` per prompt).

Fun-Control DiTs keep the I2V CLIP image branch. `i2v-14B-FC` feeds it the start image's CLIP context. For the T2V
tasks the reference passes no CLIP context, so its I2V cross-attention reads the first 257 text tokens as image
tokens; here the branch gets an all-zero CLIP context instead, as alibaba-pai's own Fun pipeline does without a
start image (docs/wan.md, "Fun-Control").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from musubi_tuner.errors import UserError

FC_TASKS = ("t2v-1.3B-FC", "t2v-14B-FC", "i2v-14B-FC")
I2V_FC_TASKS = ("i2v-14B-FC",)
FC_IN_CHANNELS = 48
USES_START_IMAGE = "fun_control_i2v"
"""Batch entry (bool): the start-image latents and CLIP context are used (i2v-14B-FC), not zeros (T2V-FC)."""


def is_fun_control(task: str | None) -> bool:
    return task in FC_TASKS


def check_request(request: Any, task: str | None) -> None:
    """A request's control video fits the task: Fun-Control tasks need one with enough frames, others take none."""
    if is_fun_control(task) and not request.control_path:
        raise UserError(f"--task {task} (Fun-Control) needs a control video: --control_path (--cn in a prompt "
                        "line), a video file or a folder of frames")
    if request.control_path and not is_fun_control(task):
        raise UserError(f"--control_path/--cn needs a Fun-Control --task ({', '.join(FC_TASKS)}), not {task}")
    if request.control_path and request.frames:
        check_control_length(request.control_path, request.frames)


def control_condition(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The 32 conditioning channels after the noisy latents: control latents, then image latents (or zeros)."""
    if "latents_control" not in batch:
        raise UserError("a Fun-Control DiT needs control latents: cache the dataset with a control_directory "
                        "(wan_cache_latents.py), or pass --control_path (--cn in a prompt line) to generate")
    control = batch["latents_control"].to(device, dtype)
    image = torch.zeros_like(control)
    if batch.get(USES_START_IMAGE) and "latents_image" in batch:
        start = batch["latents_image"].to(device, dtype)[:, 4:]  # I2V conditioning without its mask channels
        image[:, :, :1] = start[:, :, :1]  # only the start frame is kept, as the reference does
    return torch.cat([control, image], dim=1)


def clip_context(batch: dict[str, Any], batch_size: int, image_dim: int, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """CLIP image tokens for the image branch: the start image's (i2v-14B-FC), else one all-zero token (every
    zero token embeds to the same vector, so one stands for any number)."""
    if batch.get(USES_START_IMAGE) and batch.get("clip") is not None:
        return batch["clip"].to(device, dtype)
    return torch.zeros(batch_size, 1, image_dim, device=device, dtype=dtype)


def check_control_length(path: str, frames: int, flag: str = "--control_path") -> None:
    """A control video (file or folder of frames) must have at least the frames generated; checked from its header
    before any model loads."""
    from musubi_tuner.dataset.media import MediaError, probe_video

    source = Path(path)
    if not source.exists():
        raise UserError(f"{flag} {path}: no such file or folder")
    try:
        count, _ = probe_video(source)
    except MediaError as exc:
        raise UserError(f"{flag} {path}: {exc}") from None
    if count < frames:
        raise UserError(f"{flag} {path} has {count} frames; the video needs {frames} (--video_length, or --f)")


def load_control_frames(path: str, frames: int, width: int, height: int, flag: str = "--control_path") -> torch.Tensor:
    """The first `frames` frames of a control video (file or folder of frames) resized/cropped to width x height,
    as uint8 (F, H, W, 3); fewer frames than needed is an error naming the flag, as in the reference."""
    from musubi_tuner.dataset.media import MediaError, decode_frames, resize_to_bucket

    check_control_length(path, frames, flag)
    try:
        decoded = decode_frames(Path(path), list(range(frames)))
    except MediaError as exc:
        raise UserError(f"{flag} {path}: {exc}") from None
    resized = [np.ascontiguousarray(resize_to_bucket(frame, (width, height))[..., :3]) for frame in decoded]
    return torch.from_numpy(np.stack(resized)).to(torch.uint8)
