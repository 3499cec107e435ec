"""FramePack sampling: one section with the reference's UniPC, the vanilla (inverted anti-drifting) and F1 (forward)
section loops, and one-frame inference.

The DiT is driven through `forward(dit, **kwargs)`, by default `packed_forward` (the velocity for `hidden_states`;
tests pass a recording wrapper). Latents here are the VAE's scaled latents (B, 16, T, H/8, W/8) in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from musubi_tuner.architectures.framepack.generation_sections import (
    HISTORY_1X,
    HISTORY_2X,
    HISTORY_4X,
    SectionIndices,
    SectionStep,
    f1_indices,
    section_frames,
    vanilla_indices,
)
from musubi_tuner.architectures.framepack.packed_forward import embedded_guidance, packed_forward
from musubi_tuner.architectures.framepack.section_inputs import section_key
from musubi_tuner.inference.schedulers import flux_mu, shift_sigmas
from musubi_tuner.inference.unipc import sample_unipc

LATENT_CHANNELS = 16
MAX_DYNAMIC_SHIFT = 7.0
"""Without --flow_shift the shift follows the token count (FLUX's line) but never exceeds 7, as the reference."""
ForwardFn = Callable[..., torch.Tensor]


@dataclass
class TextCondition:
    """One encoded prompt: LLM states (1, L, D) with their mask (1, L) and the CLIP-L pooled vector (1, D)."""

    llama_vec: torch.Tensor
    llama_attention_mask: torch.Tensor
    clip_l_pooler: torch.Tensor
    prompt: str = ""


@dataclass
class SectionImage:
    """A start (or section) image: its scaled VAE latent (1, 16, 1, h, w) and SigLIP states (1, N, D)."""

    latent: torch.Tensor
    image_embeddings: torch.Tensor


@dataclass(kw_only=True)
class SamplerSettings:
    steps: int = 25
    embedded_cfg_scale: float = 10.0
    guidance_scale: float = 1.0
    guidance_rescale: float = 0.0
    flow_shift: float | None = None
    rope_scaling: tuple[float, int] | None = None
    """(--rope_scaling_factor, --rope_scaling_timestep_threshold), or None."""
    dtype: torch.dtype = torch.bfloat16
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    variant: str = "bh1"
    progress: bool = True


@dataclass
class SectionInputs:
    """The packed model's inputs besides the noise: indices (1-D) and clean history (None where left out)."""

    latent_indices: torch.Tensor
    latents_clean: torch.Tensor | None
    clean_latent_indices: torch.Tensor | None
    latents_clean_2x: torch.Tensor | None = None
    clean_latent_2x_indices: torch.Tensor | None = None
    latents_clean_4x: torch.Tensor | None = None
    clean_latent_4x_indices: torch.Tensor | None = None

    def as_kwargs(self, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        out = {}
        for name, value in vars(self).items():
            if value is not None and value.is_floating_point():
                value = value.to(device=device, dtype=dtype)
            elif value is not None:
                value = value.to(device)
            out[name] = value
        return out


def section_sigmas(steps: int, latent_frames: int, height: int, width: int, flow_shift: float | None) -> torch.Tensor:
    """linspace(1, 0, steps + 1) under the time shift exp(mu): mu = log(--flow_shift), or FLUX's line at the token
    count T*H*W/4 (latent units) capped at log(7)."""
    if flow_shift is not None:
        shift = flow_shift
    else:
        shift = math.exp(min(flux_mu(latent_frames * height * width // 4), math.log(MAX_DYNAMIC_SHIFT)))
    grid = torch.linspace(1, 0, steps + 1, dtype=torch.float64).numpy()
    return torch.from_numpy(shift_sigmas(grid, shift)).to(torch.float32)


def rescale_guidance(guided: torch.Tensor, positive: torch.Tensor, rescale: float) -> torch.Tensor:
    """CFG rescale (Lin et al.): match the guided prediction's std to the positive one's, mixed in by `rescale`."""
    if rescale == 0:
        return guided
    dims = list(range(1, guided.ndim))
    matched = guided * (positive.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * matched + (1 - rescale) * guided


def _text_kwargs(text: TextCondition, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"encoder_hidden_states": text.llama_vec.to(device, dtype),
            "encoder_attention_mask": text.llama_attention_mask.to(device),
            "pooled_projections": text.clip_l_pooler.to(device, dtype)}


def sample_section(dit: torch.nn.Module, noise: torch.Tensor, inputs: SectionInputs, positive: TextCondition,
                   negative: TextCondition, image_embeddings: torch.Tensor, settings: SamplerSettings,
                   forward: ForwardFn = packed_forward, magcache: Any | None = None) -> torch.Tensor:
    """Denoise one section from `noise` (1, 16, T, h, w); returns the clean latents (float32)."""
    device, dtype = settings.device, settings.dtype
    _, _, frames, height, width = noise.shape
    sigmas = section_sigmas(settings.steps, frames, height, width, settings.flow_shift)
    guidance = embedded_guidance(settings.embedded_cfg_scale, noise.shape[0], device=device, dtype=dtype)
    shared = {**inputs.as_kwargs(device, dtype), "guidance": guidance,
              "image_embeddings": image_embeddings.to(device, dtype), "rope_scaling": settings.rope_scaling}
    passes = {"positive": {**shared, **_text_kwargs(positive, device, dtype)}}
    use_cfg = settings.guidance_scale != 1.0
    if use_cfg:
        passes["negative"] = {**shared, **_text_kwargs(negative, device, dtype)}
    if magcache is not None:
        magcache.start(settings.steps)

    def velocity(x: torch.Tensor, timestep: torch.Tensor, name: str) -> torch.Tensor:
        def run() -> torch.Tensor:
            return forward(dit, hidden_states=x, timestep=timestep, **passes[name]).float()
        return magcache.run(dit, name, run) if magcache is not None else run()

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        timestep = (sigma * 1000.0).to(dtype)
        x_in = x.to(dtype)
        pred = velocity(x_in, timestep, "positive")
        if use_cfg:
            pred_neg = velocity(x_in, timestep, "negative")
            pred = rescale_guidance(pred_neg + settings.guidance_scale * (pred - pred_neg), pred,
                                    settings.guidance_rescale)
        return x_in.float() - pred * sigma.view(-1, *([1] * (x.ndim - 1)))

    with torch.no_grad():
        return sample_unipc(denoise, noise.to(device, torch.float32), sigmas.to(device), variant=settings.variant,
                            progress=settings.progress).float().cpu()


def section_noise(generator: torch.Generator, frames: int, height: int, width: int) -> torch.Tensor:
    """The reference's noise draw for one section, from the one CPU generator seeded once per video: (1, 16,
    (frames + 3) // 4, height // 8, width // 8) for pixel sizes."""
    return torch.randn((1, LATENT_CHANNELS, (frames + 3) // 4, height // 8, width // 8), generator=generator,
                       device=generator.device)


@dataclass
class VideoRequest:
    """Everything the section loops need for one video."""

    height: int
    width: int
    latent_window_size: int
    plan: list[SectionStep]
    prompts: dict[int, TextCondition]
    negative: TextCondition
    images: dict[int, SectionImage]
    end_latent: torch.Tensor | None = None
    on_section: Callable[[SectionStep, str], None] | None = field(default=None, repr=False)
    """Told which prompt each section uses (for the log)."""


def _conditions(request: VideoRequest, step: SectionStep) -> tuple[TextCondition, SectionImage]:
    prompt = request.prompts[section_key(request.prompts, step.section_index, step.section_index_from_last)]
    image = request.images[section_key(request.images, step.section_index, step.section_index_from_last)]
    if request.on_section is not None:
        request.on_section(step, prompt.prompt)
    return prompt, image


def _sample_step(dit: torch.nn.Module, request: VideoRequest, step: SectionStep, idx: SectionIndices,
                 history: tuple[torch.Tensor, torch.Tensor, torch.Tensor], settings: SamplerSettings,
                 generator: torch.Generator, forward: ForwardFn, magcache: Any) -> tuple[torch.Tensor, SectionImage]:
    """Sample one section of a video: the section's image and the 1x history latent as the clean latents, the 2x
    and 4x history as they are. Returns (latents, the section's image)."""
    prompt, image = _conditions(request, step)
    x1, x2, x4 = history
    inputs = SectionInputs(idx.latent, torch.cat([image.latent.to(x1), x1], dim=2), idx.clean,
                           x2, idx.clean_2x, x4, idx.clean_4x)
    noise = section_noise(generator, section_frames(request.latent_window_size), request.height, request.width)
    latents = sample_section(dit, noise, inputs, prompt, request.negative, image.image_embeddings, settings,
                             forward, magcache)
    return latents, image


def _empty_history(request: VideoRequest) -> torch.Tensor:
    size = HISTORY_1X + HISTORY_2X + HISTORY_4X
    return torch.zeros(1, LATENT_CHANNELS, size, request.height // 8, request.width // 8)


def sample_vanilla(dit: torch.nn.Module, request: VideoRequest, settings: SamplerSettings, generator: torch.Generator,
                   forward: ForwardFn = packed_forward, magcache: Any = None) -> torch.Tensor:
    """Inverted anti-drifting: sections from the end of the video back to the start image, each seeing the start
    image, the history already sampled after it, and (before any) the end image. Returns (1, 16, n*w+1, h, w)."""
    window = request.latent_window_size
    history = _empty_history(request)
    if request.end_latent is not None:
        history[:, :, :1] = request.end_latent
    generated_frames = 0
    for step in request.plan:
        post, x2, x4 = history[:, :, : HISTORY_1X + HISTORY_2X + HISTORY_4X].split(
            [HISTORY_1X, HISTORY_2X, HISTORY_4X], dim=2)
        latents, image = _sample_step(dit, request, step, vanilla_indices(window, step.latent_padding), (post, x2, x4),
                                      settings, generator, forward, magcache)
        if step.is_last_section:
            latents = torch.cat([image.latent.to(latents), latents], dim=2)
        generated_frames += latents.shape[2]
        history = torch.cat([latents, history], dim=2)
    return history[:, :, :generated_frames]


def sample_f1(dit: torch.nn.Module, request: VideoRequest, settings: SamplerSettings, generator: torch.Generator,
              forward: ForwardFn = packed_forward, magcache: Any = None) -> torch.Tensor:
    """F1: sections forward from the start image, each seeing the start image and the most recent history at 1x,
    2x and 4x compression. Returns (1, 16, 1 + n*w, h, w)."""
    window = request.latent_window_size
    history = torch.cat([_empty_history(request), request.images[0].latent.to(torch.float32)], dim=2)
    generated_frames = 1
    idx = f1_indices(window)
    for step in request.plan:
        x4, x2, x1 = history[:, :, -(HISTORY_4X + HISTORY_2X + HISTORY_1X):].split(
            [HISTORY_4X, HISTORY_2X, HISTORY_1X], dim=2)
        latents, _ = _sample_step(dit, request, step, idx, (x1, x2, x4), settings, generator, forward, magcache)
        generated_frames += latents.shape[2]
        history = torch.cat([history, latents], dim=2)
    return history[:, :, -generated_frames:]
