"""Generation glue: an Architecture + the shared sampler, schedulers and output writers.

`wan_generate_video.py`, `flux_kontext_generate_image.py` and samples during training all go
through `render()`, so what a sample shows during training is what the generate script makes.
"""

from __future__ import annotations

import argparse
import gc
import logging
import random
from dataclasses import dataclass, replace
from typing import Any

import torch

from musubi_tuner.architectures.base import Architecture
from musubi_tuner.inference.denoise import denoise, initial_noise
from musubi_tuner.inference.prompts import PromptSpec
from musubi_tuner.inference.schedulers import flux_mu, make_flow_scheduler

logger = logging.getLogger(__name__)


def free_memory() -> None:
    """Return freed model memory to the system/GPU (after dropping the last reference to a model)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def contents_to_batch(contents: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Content dicts (as written to caches) -> a batch as the trainer sees it (`varlen_x` -> list `x`)."""
    batch: dict[str, Any] = {}
    for key in contents[0]:
        values = [c[key] for c in contents]
        if key.startswith("varlen_"):
            batch[key[len("varlen_"):]] = values
        else:
            batch[key] = torch.stack(values)
    return batch


@dataclass
class RenderSettings:
    """Everything `render` needs besides the prompt; filled from flags or sample defaults."""

    solver: str = "unipc"
    device: torch.device = torch.device("cpu")
    progress: bool = True


def resolve_spec(arch: Architecture, spec: PromptSpec, args: argparse.Namespace | None = None) -> PromptSpec:
    """Fill every None in `spec` from the architecture's generation defaults for these flags (e.g. Wan's --task)."""
    width, height = spec.width or arch.generation_defaults.width, spec.height or arch.generation_defaults.height
    d = arch.generation_defaults_for(args, width, height)
    seed = spec.seed if spec.seed is not None else random.randint(0, 2**31 - 1)
    return replace(
        spec,
        width=width, height=height, frames=spec.frames or d.frames,
        seed=seed, steps=spec.steps or d.infer_steps,
        guidance_scale=d.guidance_scale if spec.guidance_scale is None else spec.guidance_scale,
        embedded_guidance=d.embedded_guidance if spec.embedded_guidance is None else spec.embedded_guidance,
        flow_shift=spec.flow_shift if spec.flow_shift is not None else d.flow_shift,
        negative_prompt=d.negative_prompt if spec.negative_prompt is None else spec.negative_prompt,
    )


def sample_solver_for(arch: Architecture, args: argparse.Namespace | None) -> str:
    """`--sample_solver` when given, else the family's reference sampler (UniPC for Wan, Euler for FLUX)."""
    return getattr(args, "sample_solver", None) or arch.generation_defaults_for(args).sample_solver


def render(arch: Architecture, dit: torch.nn.Module, latent_encoders: Any, spec: PromptSpec, cond: dict[str, Any],
           uncond: dict[str, Any] | None, settings: RenderSettings, args: argparse.Namespace) -> torch.Tensor:
    """Denoise one request; returns final latents (1, ...). `spec` must be resolved (no Nones)."""
    shape = arch.generation_latent_shape(spec, args)
    extras = arch.generation_conditioning(latent_encoders, spec, shape, args)
    cond = {**cond, **extras}
    uncond = {**uncond, **extras} if uncond is not None else None
    mu = None
    if spec.flow_shift is None or spec.flow_shift == 0:
        mu = flux_mu(arch.timestep_shift_sequence_length(shape))
    scheduler = make_flow_scheduler(settings.solver, spec.flow_shift or None, mu=mu)
    latents = initial_noise((1, *shape), spec.seed, settings.device)  # drawn on the CPU: same on every device
    start_step = 0
    source = arch.generation_source_latents(latent_encoders, spec, shape, args)
    if source is not None:  # video to video: start part way, from the source noised to that step
        from musubi_tuner.inference.video_to_video import noised_source

        source_latents, strength = source
        scheduler.set_timesteps(spec.steps, device=settings.device)
        latents, start_step = noised_source(scheduler, spec.steps, strength, latents,
                                            source_latents.reshape(latents.shape))

    def predict(x: torch.Tensor, t: torch.Tensor, c: dict[str, Any]) -> torch.Tensor:
        return arch.predict(dit, c, x, t)

    was_training = dit.training
    dit.eval()
    try:
        guidance_scale = arch.guidance_schedule(args, spec.guidance_scale) or spec.guidance_scale
        latents = denoise(predict, latents, scheduler, spec.steps, cond, uncond, guidance_scale,
                          progress=settings.progress, start_step=start_step,
                          guidance=arch.generation_guidance(args), skip_layers=arch.block_skipper(dit))
        return arch.generation_output_latents(latents, spec, args)
    finally:
        dit.train(was_training)


def encode_conditions(arch: Architecture, text_encoders: Any, spec: PromptSpec) -> tuple[dict, dict | None]:
    """Prompt (and negative prompt when CFG is on) -> batch-shaped conditioning dicts."""
    prompts = [spec.prompt]
    use_cfg = spec.guidance_scale is not None and spec.guidance_scale != 1.0
    if use_cfg:
        prompts.append(spec.negative_prompt or "")
    contents = arch.encode_prompts(text_encoders, prompts)
    cond = contents_to_batch(contents[:1])
    uncond = contents_to_batch(contents[1:]) if use_cfg else None
    if spec.embedded_guidance is not None:
        cond["guidance"] = torch.tensor([spec.embedded_guidance])
        if uncond is not None:
            uncond["guidance"] = torch.tensor([spec.embedded_guidance])
    return cond, uncond


def generation_metadata(spec: PromptSpec) -> dict[str, str]:
    return {"seeds": str(spec.seed), "prompt": spec.prompt, "negative_prompt": spec.negative_prompt or "",
            "height": str(spec.height), "width": str(spec.width), "video_length": str(spec.frames),
            "infer_steps": str(spec.steps), "guidance_scale": str(spec.guidance_scale),
            "flow_shift": str(spec.flow_shift)}
