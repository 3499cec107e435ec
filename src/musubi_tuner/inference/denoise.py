"""The denoising loop with classifier-free guidance, shared by generation and training samples."""

from __future__ import annotations

from typing import Any, Callable

import torch
from tqdm import tqdm

from musubi_tuner.inference.guidance import GuidanceOptions, GuidancePlan, SkipLayers, guided_velocity, step_velocity
from musubi_tuner.inference.schedulers import FlowScheduler

PredictFn = Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor]
"""predict(latents, timesteps (B,) float on the 0..1000 scale, cond) -> velocity (noise - x0)."""


def initial_noise(
    shape: tuple[int, ...],
    seed: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    cpu_noise: bool = True,
) -> torch.Tensor:
    """Standard normal noise of `shape` for `seed`.

    cpu_noise=True draws on the CPU so a seed gives the same noise on every device (as ComfyUI does);
    False draws with a generator on `device`. Noise is drawn in float32, then cast to `dtype`.
    """
    gen_device = torch.device("cpu") if cpu_noise else torch.device(device)
    generator = torch.Generator(device=gen_device).manual_seed(int(seed))
    noise = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


__all__ = ["PredictFn", "denoise", "guided_velocity", "initial_noise"]


def denoise(
    predict: PredictFn,
    latents: torch.Tensor,
    scheduler: FlowScheduler,
    num_steps: int,
    cond: dict[str, Any],
    uncond: dict[str, Any] | None = None,
    guidance_scale: float | Callable[[float], float] = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = True,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    start_step: int = 0,
    guidance: GuidanceOptions | None = None,
    skip_layers: SkipLayers | None = None,
) -> torch.Tensor:
    """Run the sampler from noise `latents` (B, ...) and return the final latents (float32).

    The positive and negative passes are two `predict` calls (so batch-size-1 memory is enough);
    with `uncond` None or `guidance_scale` 1.0 only the positive pass runs. A callable `guidance_scale` gives the scale
    per timestep (Wan2.2: one per expert); CFG then runs whenever `uncond` is given.
    `callback(step_index, latents)` is called after every step (e.g. latent previews).
    start_step: skip the first steps of the schedule (video to video starts from noised source latents).
    guidance: CFG skipping and skip-layer guidance per step (`inference.guidance`; None: CFG on every step), over
    the steps that run; skip_layers: the DiT's block-skipping context, needed by skip-layer guidance.
    """
    if uncond is None or (not callable(guidance_scale) and guidance_scale == 1.0):
        uncond = None  # no negative pass
    timesteps = scheduler.set_timesteps(num_steps, device=latents.device)
    if start_step:
        scheduler.begin_at(start_step)
        timesteps = timesteps[start_step:]
    # The solver works in float32 whatever dtype the DiT runs in; `predict` casts its inputs.
    latents = latents.to(torch.float32)
    batch = latents.shape[0]
    plan = GuidancePlan.for_steps(guidance, len(timesteps))
    for i, t in enumerate(tqdm(timesteps, desc="denoising", disable=not progress)):
        t_batch = t.to(device=latents.device, dtype=torch.float32).expand(batch)
        with torch.no_grad():
            scale = guidance_scale(float(t)) if callable(guidance_scale) else guidance_scale
            velocity = step_velocity(lambda c: predict(latents, t_batch, c).to(torch.float32), cond, uncond,
                                     scale, plan, i, skip_layers)
        latents = scheduler.step(velocity, t, latents, generator=generator)
        if callback is not None:
            callback(i, latents)
    return latents
