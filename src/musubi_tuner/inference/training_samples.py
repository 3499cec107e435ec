"""Samples during training (--sample_prompts): the generate scripts' `render()` on the model being trained.

Prompts are encoded once at start (then the text encoders are freed); the VAE stays loaded for decoding.
Files go to `<output_dir>/sample/` named `{output_name}_{e000001|000100}_{idx:02d}_{timestamp}_{seed}`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Callable, ContextManager

import torch

from musubi_tuner.architectures.base import Architecture
from musubi_tuner.inference.generate import (
    RenderSettings,
    encode_conditions,
    free_memory,
    generation_metadata,
    render,
    sample_solver_for,
)
from musubi_tuner.inference.prompts import PromptSpec, load_prompt_file

logger = logging.getLogger(__name__)

# Reference defaults for sample prompts (smaller than the generate scripts' defaults): 256x256, 1 frame, 20 steps
# and flow shift 14.5 unless the line gives --fs (`--fs 0`: FLUX's resolution-dependent shift).
SAMPLE_DEFAULTS = PromptSpec(width=256, height=256, frames=1, steps=20, flow_shift=14.5)


def sample_request(spec: PromptSpec, args: argparse.Namespace) -> PromptSpec:
    """As the reference: classifier-free guidance only when the line gives a negative prompt (--n). A line without
    a seed (--d) uses --seed, so samples of two runs can be compared."""
    if spec.negative_prompt is None:
        spec = replace(spec, negative_prompt="", guidance_scale=1.0)
    if spec.seed is None:
        spec = replace(spec, seed=getattr(args, "seed", None))
    return spec


def load_sample_requests(arch: Architecture, args: argparse.Namespace) -> list[PromptSpec]:
    """Every --sample_prompts entry parsed, resolved and checked; training calls this at start-up too, so a bad
    line stops the run before any model loads, not at the first sample step."""
    from musubi_tuner.inference.prompt_checks import checked_requests

    specs = [sample_request(spec, args) for spec in load_prompt_file(args.sample_prompts, SAMPLE_DEFAULTS)]
    return checked_requests(arch, specs, args)


class TrainingSampler:
    def __init__(self, arch: Architecture, args: argparse.Namespace, device: torch.device):
        self.arch, self.args, self.device = arch, args, device
        self.specs = arch.sample_requests(args)
        text_encoders = arch.load_text_encoders(args, device)
        self.conditions = [encode_conditions(arch, text_encoders, spec) for spec in self.specs]
        del text_encoders
        free_memory()
        self.latent_encoders = arch.load_latent_encoders(args, device)
        self.settings = RenderSettings(solver=sample_solver_for(arch, args), device=device, progress=False)
        self.folder = Path(args.output_dir) / "sample"
        logger.info("%d sample prompts ready", len(self.specs))

    def run(self, dit: torch.nn.Module, *, epoch: int | None = None, step: int | None = None,
            autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> list[Path]:
        """Render every sample prompt with `dit`. autocast: the training step's (mixed precision), so a bf16/fp16
        DiT with its fp32 LoRA samples as it trains; the VAE decodes outside it, in its own dtype."""
        from musubi_tuner.inference.outputs import write_outputs

        tag = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
        written: list[Path] = []
        for spec, (cond, uncond) in zip(self.specs, self.conditions):
            with torch.random.fork_rng(devices=[]), autocast():  # sampling must not move the training RNG
                latents = render(self.arch, dit, self.latent_encoders, spec, cond, uncond, self.settings, self.args)
            frames = self.arch.decode_latents(self.latent_encoders, latents)[0]
            stamp = datetime.now().strftime("%Y%m%d%H%M%S")
            name = f"{self.args.output_name}_{tag}_{spec.index:02d}_{stamp}_{spec.seed}"
            kind = "images" if frames.shape[0] == 1 else "video"
            written += write_outputs(kind, frames, latents[0].cpu(), self.folder, spec.seed, self.arch.output_fps(self.args),
                                     generation_metadata(spec), basename=name)
        logger.info("samples written to %s", self.folder)
        return written
