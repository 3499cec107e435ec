"""FramePack one-frame inference (`--one_frame_inference`): sample a single latent frame placed at a chosen index,
conditioned on control images placed at their own indices (the reference's docs/framepack_1f.md: kisekaeichi,
1f-mc).

Options, comma separated: `no_2x`, `no_4x` (leave the compressed history out), `no_post` (no zero latent after the
window), `target_index=N` (index of the generated frame; default: the window size), `control_index=a;b;...` (indices
of the control latents, in order; default 0 each, the zero post latent at window + 1), `default` (no change).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from musubi_tuner.architectures.framepack.generation_sections import HISTORY_2X, HISTORY_4X, vanilla_indices
from musubi_tuner.architectures.framepack.packed_forward import packed_forward
from musubi_tuner.architectures.framepack.sampling import (
    LATENT_CHANNELS,
    ForwardFn,
    SamplerSettings,
    SectionImage,
    SectionInputs,
    TextCondition,
    sample_section,
    section_noise,
)
from musubi_tuner.errors import UserError

FLAGS = ("no_2x", "no_4x", "no_post", "default")


@dataclass(frozen=True)
class OneFrameOptions:
    no_2x: bool = False
    no_4x: bool = False
    no_post: bool = False
    target_index: int | None = None
    control_indices: tuple[int, ...] = field(default_factory=tuple)


def _index(text: str, name: str, where: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{where}: {name}={text!r} must be an integer") from None
    if value < 0:
        raise UserError(f"{where}: {name}={value} cannot be negative")
    return value


def parse_one_frame_options(text: str, where: str = "--one_frame_inference") -> OneFrameOptions:
    """`no_2x,no_4x,target_index=1,control_index=0;10` -> options. Unknown words are errors (the reference ignored
    them, so a typo silently changed the layout)."""
    flags: set[str] = set()
    target, controls = None, ()
    for raw in text.split(","):
        word = raw.strip()
        if not word:
            continue
        name, eq, value = word.partition("=")
        if eq and name == "target_index":
            target = _index(value, name, where)
        elif eq and name == "control_index":
            controls = tuple(_index(v, name, where) for v in value.split(";") if v.strip())
        elif not eq and word in FLAGS:
            flags.add(word)
        else:
            raise UserError(f"{where}: unknown option {word!r}; use {', '.join(FLAGS)}, target_index=N or "
                            "control_index=a;b")
    return OneFrameOptions("no_2x" in flags, "no_4x" in flags, "no_post" in flags, target, controls)


def latent_mask(mask: np.ndarray, latent_height: int, latent_width: int) -> torch.Tensor:
    """A uint8 (H, W) mask (alpha, or a grey image: 255 keeps) -> (1, 1, 1, h, w) float weights in [0, 1] at latent
    size (LANCZOS, as the reference)."""
    from PIL import Image

    small = Image.fromarray(mask).resize((latent_width, latent_height), Image.LANCZOS)
    return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)[None, None, None]


def one_frame_inputs(options: OneFrameOptions, control_latents: list[torch.Tensor],
                     masks: list[torch.Tensor | None], latent_window_size: int, latent_height: int,
                     latent_width: int) -> SectionInputs:
    """The packed inputs: control latents (each (1, 16, 1, h, w), masked where a mask is given) as the clean 1x
    latents, a zero post latent unless no_post, zero 2x/4x history unless left out."""
    def zeros(frames: int) -> torch.Tensor:
        return torch.zeros(1, LATENT_CHANNELS, frames, latent_height, latent_width)

    latents = [c.to(torch.float32) for c in control_latents] or [zeros(1)]
    if not options.no_post:
        latents.append(zeros(1))
    clean = torch.cat(latents, dim=2)
    for i, mask in enumerate(masks[: clean.shape[2]]):
        if mask is not None:
            clean[:, :, i : i + 1] = clean[:, :, i : i + 1] * mask
    history = vanilla_indices(latent_window_size, 0)  # one section right after the start: post, 2x, 4x indices
    clean_indices = torch.zeros(clean.shape[2], dtype=torch.int64)
    if not options.no_post:
        clean_indices[-1] = history.clean[-1]
    for i, index in enumerate(options.control_indices[: clean.shape[2]]):
        clean_indices[i] = index
    target = latent_window_size if options.target_index is None else options.target_index
    inputs = SectionInputs(torch.tensor([target], dtype=torch.int64), clean, clean_indices)
    if not options.no_2x:
        inputs.latents_clean_2x = zeros(HISTORY_2X)
        inputs.clean_latent_2x_indices = history.clean_2x
    if not options.no_4x:
        inputs.latents_clean_4x = zeros(HISTORY_4X)
        inputs.clean_latent_4x_indices = history.clean_4x
    return inputs


def sample_one_frame(dit: torch.nn.Module, inputs: SectionInputs, prompt: TextCondition, negative: TextCondition,
                     image: SectionImage, settings: SamplerSettings, generator: torch.Generator, height: int,
                     width: int, forward: ForwardFn = packed_forward, magcache: Any = None) -> torch.Tensor:
    """One latent frame (1, 16, 1, h, w) for pixel size height x width; the prompt and image are section 0's."""
    noise = section_noise(generator, 1, height, width)
    return sample_section(dit, noise, inputs, prompt, negative, image.image_embeddings, settings, forward, magcache)
