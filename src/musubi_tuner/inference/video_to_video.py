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
