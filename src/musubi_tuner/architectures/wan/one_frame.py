"""Wan one-frame training and inference (the reference's docs/wan_1f.md), on an I2V or FLF2V DiT.

A few clean control images and one target frame are laid out as a short latent "video" whose frames sit at
chosen time positions (`f_indices`, sorted): the RoPE time axis uses those positions instead of 0, 1, 2 ...,
so a target placed far from its control (e.g. control 0, target 9) is read as a frame that much later. The
conditioning is the I2V layout (4 mask + 16 latent channels): control frames carry mask 1 and their own latents,
the target frame mask 0 and the latents of a black image. Training caches store the frame positions as
`f_indices_int32`, the latents of every frame (controls and target) as `latents`, the conditioning as
`latents_image` and the CLIP context of each control image as `clip` (n_controls, tokens, width).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from musubi_tuner.errors import UserError

DEFAULT_CLEAN_INDICES = (0,)
DEFAULT_TARGET_INDEX = 9
"""The dataset's defaults when `fp_1f_clean_indices` / `fp_1f_target_index` are not set (docs/dataset_config.md)."""
MAX_CONTROL_IMAGES = 2
"""One start image (I2V) or a start and an end image (FLF2V): the CLIP branch takes no more."""


@dataclass(frozen=True)
class FrameLayout:
    """Where the target and the control frames sit on the time axis."""

    target_index: int
    control_indices: tuple[int, ...]

    @property
    def f_indices(self) -> list[int]:
        """Time positions of the latent frames, in order (controls and the target, sorted)."""
        return sorted([*self.control_indices, self.target_index])

    @property
    def target_position(self) -> int:
        """Which latent frame is the target (the one decoded after one-frame inference)."""
        return self.f_indices.index(self.target_index)


def parse_one_frame_options(text: str, flag: str = "--one_frame_inference") -> FrameLayout:
    """`target_index=N,control_index=a;b` (comma separated, any order; defaults: target 0, no control) -> layout.

    Other words (FramePack's `no_2x`, `no_4x`, `no_post`) are accepted and ignored, as the reference does for Wan.
    """
    target, controls = 0, ()
    for word in (w.strip() for w in text.split(",")):
        name, _, value = word.partition("=")
        try:
            if name == "target_index":
                target = int(value)
            elif name == "control_index":
                controls = tuple(int(v) for v in value.split(";"))
        except ValueError:
            raise UserError(f"{flag} {text!r}: {name} takes integers (e.g. target_index=1,control_index=0;2), "
                            f"got {value!r}") from None
    layout = FrameLayout(target, controls)
    if min(layout.f_indices) < 0:
        raise UserError(f"{flag} {text!r}: frame indices must be >= 0")
    if len(set(layout.f_indices)) != len(layout.f_indices):
        raise UserError(f"{flag} {text!r}: target_index and control_index values must all differ")
    if len(controls) > MAX_CONTROL_IMAGES:
        raise UserError(f"{flag} {text!r}: at most {MAX_CONTROL_IMAGES} control indices (start, or start and end "
                        f"image), got {len(controls)}")
    return layout


def check_request(request: Any, task: str | None, one_frame_tasks: tuple[str, ...],
                  trains_one_frame: bool | None) -> None:
    """A request's one-frame options (`--of`, `--ci`) fit the flags. trains_one_frame: the training flag --one_frame
    (samples during training), None for the generate script."""
    if trains_one_frame is not None and trains_one_frame != bool(request.one_frame):
        raise UserError("sample prompts of a --one_frame training run need --of (e.g. --of target_index=1,"
                        "control_index=0 --ci control.png), and --of needs --one_frame" if trains_one_frame else
                        "--of (one-frame inference) in a sample prompt needs --one_frame in the training flags")
    if request.one_frame:
        layout = parse_one_frame_options(request.one_frame)
        if task not in one_frame_tasks:
            raise UserError(f"one-frame inference needs --task {' or '.join(one_frame_tasks)}, not {task}")
        if len(request.control_image_paths) != len(layout.control_indices):
            raise UserError(f"one-frame inference {request.one_frame!r} has {len(layout.control_indices)} "
                            f"control_index value(s) but {len(request.control_image_paths)} control image(s) "
                            "(--control_image_path / --ci); give one image per index")
    elif request.control_image_paths:
        raise UserError("--control_image_path/--ci is for one-frame inference: add --one_frame_inference "
                        "(--of), e.g. target_index=1,control_index=0")


def dataset_layout(clean_indices: tuple[int, ...] | None, target_index: int | None) -> FrameLayout:
    """The layout of a one-frame training item from its dataset's `fp_1f_clean_indices` / `fp_1f_target_index`."""
    return FrameLayout(DEFAULT_TARGET_INDEX if target_index is None else target_index,
                       tuple(clean_indices) if clean_indices else DEFAULT_CLEAN_INDICES)


def condition_latents(layout: FrameLayout, control_latents: list[torch.Tensor], black_latent: torch.Tensor) -> torch.Tensor:
    """I2V-style conditioning (4 mask + C latent channels, one frame per `f_indices` entry), as the reference builds it.

    control_latents: (C, 1, h, w) each; as in the reference they fill the control positions in ascending time order
    (whatever order `control_indices` lists them in). black_latent: (C, 1, h, w).
    """
    channels, _, h, w = black_latent.shape
    y = black_latent.new_zeros(4 + channels, len(layout.f_indices), h, w)
    controls = iter(control_latents)
    for j, index in enumerate(layout.f_indices):
        if index == layout.target_index:
            y[4:, j] = black_latent[:, 0]
        else:
            y[:4, j] = 1.0
            y[4:, j] = next(controls)[:, 0]
    return y


def training_latents(layout: FrameLayout, control_latents: list[torch.Tensor], target_latent: torch.Tensor) -> torch.Tensor:
    """The latents trained on: every control at its position and the target at its own, (C, n + 1, h, w)."""
    ordered = iter(control_latents)
    frames = [target_latent if index == layout.target_index else next(ordered) for index in layout.f_indices]
    return torch.cat(frames, dim=1)


def batch_frame_indices(f_indices: torch.Tensor | None) -> list[int] | None:
    """The batch's `f_indices` (B, n) -> one list shared by the batch; items with different layouts cannot share the
    RoPE table (split attention and block swap pass one table to every item)."""
    if f_indices is None:
        return None
    rows = {tuple(int(v) for v in row) for row in f_indices.reshape(f_indices.shape[0], -1).tolist()}
    if len(rows) > 1:
        raise UserError(f"one batch mixes one-frame layouts {sorted(rows)}; give the datasets the same "
                        "fp_1f_clean_indices / fp_1f_target_index, or batch_size = 1")
    return list(next(iter(rows)))


@contextmanager
def rope_time_positions(dit: nn.Module, f_indices: list[int] | None) -> Iterator[None]:
    """While active, the DiT's RoPE gives latent frame k the time position f_indices[k] (height/width unchanged)."""
    if f_indices is None:
        yield
        return
    rope = dit.rope
    original = rope.forward

    def forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        frames = hidden_states.shape[2] // dit.config.patch_size[0]
        if frames != len(f_indices):
            raise ValueError(f"{frames} latent frames but {len(f_indices)} one-frame indices {f_indices}")
        cos, sin = original(hidden_states)  # (1, F*H*W, 1, D): the time part is replaced below
        positions = torch.tensor(f_indices, device=rope.freqs_cos.device)
        tokens_per_frame = cos.shape[1] // frames
        t = rope.t_dim
        time_cos = rope.freqs_cos[positions, :t].repeat_interleave(tokens_per_frame, dim=0)
        time_sin = rope.freqs_sin[positions, :t].repeat_interleave(tokens_per_frame, dim=0)
        cos, sin = cos.clone(), sin.clone()
        cos[0, :, 0, :t] = time_cos.to(cos.dtype)
        sin[0, :, 0, :t] = time_sin.to(sin.dtype)
        return cos, sin

    rope.forward = forward
    try:
        yield
    finally:
        del rope.forward  # back to the class method
