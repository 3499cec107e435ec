"""Video to video (`--video_path` + `--strength`): start the sampler part way, from the source video's latents
noised to the step the strength gives, as the reference does (HunyuanVideo; any family can use it through
`Architecture.generation_source_latents`)."""

from __future__ import annotations

import torch

from musubi_tuner.errors import UserError
from musubi_tuner.inference.schedulers import FlowScheduler


def steps_for_strength(num_steps: int, strength: float) -> int:
    """How many of the `num_steps` steps run: int(num_steps * strength), as the reference (at least 1)."""
    if not 0.0 < strength <= 1.0:
        raise UserError(f"--strength {strength}: must be in (0, 1] (1 = ignore the source video, as plain generation)")
    steps = int(num_steps * strength)
    if steps < 1:
        raise UserError(f"--strength {strength} with {num_steps} steps leaves no step to run; raise --strength "
                        "or --infer_steps")
    return steps


def noised_source(scheduler: FlowScheduler, num_steps: int, strength: float, noise: torch.Tensor,
                  source: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(latents to start from, index of the first step to run). `scheduler` must be set to `num_steps` already.

    The start is the flow-matching interpolation at the first kept timestep t: noise * t + source * (1 - t).
    """
    if tuple(source.shape) != tuple(noise.shape):
        raise UserError(f"the source video's latents {tuple(source.shape)} do not match the output "
                        f"{tuple(noise.shape)}; check --video_size / --video_length")
    start = num_steps - steps_for_strength(num_steps, strength)
    t = float(scheduler.inner.timesteps[start]) / 1000.0
    latents = noise * t + source.to(noise.device, noise.dtype) * (1.0 - t)
    return latents, start


def add_video_to_video_arguments(parser) -> None:
    """`--video_path` and `--strength` (default 0.8, as hv_generate_video.py), for any family that encodes videos."""
    parser.add_argument("--video_path", default=None,
                        help="video to video: the source video (file or folder of frames), resized to "
                             "--video_size; its first --video_length frames are used")
    parser.add_argument("--strength", type=float, default=0.8,
                        help="video to video: share of the steps re-run on the noised source (default 0.8; "
                             "1.0 ignores the source)")


def check_video_to_video_flags(args, infer_steps: int) -> None:
    """Before any model loads: the source video exists and `--strength` leaves at least one of the steps."""
    from pathlib import Path

    if not getattr(args, "video_path", None):
        return
    if not Path(args.video_path).exists():
        raise UserError(f"--video_path {args.video_path}: video not found (check the path)")
    steps_for_strength(infer_steps, args.strength)


def load_source_video(video_path: str, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """The source video's first frames for a (C, F, H, W) latent of 4N+1-frame families, uint8 (F, H, W, 3)."""
    from musubi_tuner.inference.images import load_video_resized

    frames = (latent_shape[1] - 1) * 4 + 1
    return load_video_resized(video_path, frames, latent_shape[-1] * 8, latent_shape[-2] * 8)
