"""Which steps apply classifier-free guidance (`--cfg_skip_mode`, `--cfg_apply_ratio`) and skip-layer guidance
(`--slg_*`), decided as the reference's Wan generate script decides them, and the velocity of one step.

Step indices count the steps that actually run (video to video runs only the last ones), as the reference counts
them over the timesteps it samples.
"""

from __future__ import annotations

import argparse
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from torch import nn

from musubi_tuner.errors import UserError

logger = logging.getLogger(__name__)

CFG_SKIP_MODES = ("early", "late", "middle", "early_late", "alternate", "none")
SLG_MODES = ("original", "uncond")


@dataclass(frozen=True)
class SkipLayerGuidance:
    """SLG: an extra prediction of the negative prompt with some DiT blocks skipped."""

    layers: tuple[int, ...]
    scale: float = 3.0
    """`original` mode only: weight of (cond - skip-layer prediction)."""
    start: float = 0.0
    end: float = 0.3
    """Share of the steps where SLG applies: steps int(start * n) <= i < int(end * n)."""
    mode: str = "original"
    """original: SD3.5's formula, a third pass; uncond: the skip-layer pass replaces the negative pass (Wan2GP)."""

    def applies(self, step: int, num_steps: int) -> bool:
        return int(self.start * num_steps) <= step < int(self.end * num_steps)


@dataclass(frozen=True)
class GuidanceOptions:
    """Per-step guidance choices from the generate flags; the default changes nothing."""

    cfg_skip_mode: str = "none"
    cfg_apply_ratio: float | None = None
    slg: SkipLayerGuidance | None = None


def cfg_apply_pattern(mode: str, ratio: float | None, num_steps: int) -> list[bool]:
    """For each step, whether CFG runs on it (True) or the positive prediction alone is used (False).

    Without a mode or a ratio every step applies CFG. `apply = int(n * ratio)` steps apply it: early skips the
    first steps, late the last, early_late both ends (the odd step at the end), middle the centre; alternate adds
    `ratio` each step and applies CFG whenever the sum reaches 1 (in float arithmetic, as the reference).
    """
    if mode == "none" or ratio is None:
        return [True] * num_steps
    apply_steps = int(num_steps * ratio)
    if mode == "alternate":
        pattern, total = [], 0.0
        for _ in range(num_steps):
            total += ratio
            pattern.append(total >= 1.0)
            if pattern[-1]:
                total -= 1.0
        return pattern
    if mode == "middle":
        skip_start = apply_steps // 2  # the reference's (n - skipped) // 2
        skip_end = skip_start + (num_steps - apply_steps)
        return [not skip_start <= i < skip_end for i in range(num_steps)]
    start = {"early": num_steps - apply_steps, "late": 0, "early_late": (num_steps - apply_steps) // 2}[mode]
    return [start <= i < start + apply_steps for i in range(num_steps)]


def pattern_text(pattern: Sequence[bool]) -> str:
    """The reference's log form: A = CFG applied, S = skipped."""
    return "".join("A" if apply else "S" for apply in pattern)


@dataclass(frozen=True)
class GuidancePlan:
    """What each of the `num_steps` steps that run does."""

    cfg: tuple[bool, ...]
    slg: tuple[bool, ...]
    options: GuidanceOptions

    @classmethod
    def for_steps(cls, options: GuidanceOptions | None, num_steps: int) -> "GuidancePlan":
        options = options or GuidanceOptions()
        cfg = cfg_apply_pattern(options.cfg_skip_mode, options.cfg_apply_ratio, num_steps)
        slg = [options.slg is not None and options.slg.applies(i, num_steps) for i in range(num_steps)]
        if options.cfg_skip_mode != "none" and options.cfg_apply_ratio is not None:
            logger.info("CFG skip mode %s, apply ratio %s: %s", options.cfg_skip_mode, options.cfg_apply_ratio,
                        pattern_text(cfg))
        return cls(cfg=tuple(cfg), slg=tuple(slg), options=options)


SkipLayers = Callable[[Sequence[int]], ContextManager[Any]]
"""skip_layers(indices): a context in which the DiT's blocks at `indices` pass their input through."""


def step_velocity(predict: Callable[[dict[str, Any]], torch.Tensor], cond: dict[str, Any],
                  uncond: dict[str, Any] | None, guidance_scale: float, plan: GuidancePlan, step: int,
                  skip_layers: SkipLayers | None = None) -> torch.Tensor:
    """The velocity of step `step`: predict(conditioning) runs the DiT on this step's latents and timestep.

    - no negative pass, or CFG skipped on this step: the positive prediction alone;
    - CFG: uncond + scale * (cond - uncond);
    - SLG `uncond` on this step: the same, with the negative prediction made with the layers skipped;
    - SLG `original` on this step: CFG + slg_scale * (cond - negative prediction with the layers skipped).
    """
    velocity = predict(cond)
    if uncond is None or not plan.cfg[step]:
        return velocity
    slg = plan.options.slg if plan.slg[step] else None
    if slg is not None and skip_layers is None:
        raise UserError("--slg_layers: this model family cannot skip blocks; drop the --slg_* flags")
    if slg is not None and slg.mode == "uncond":
        with skip_layers(slg.layers):
            return guided_velocity(velocity, predict(uncond), guidance_scale)
    guided = guided_velocity(velocity, predict(uncond), guidance_scale)
    if slg is None:
        return guided
    with skip_layers(slg.layers):
        skipped = predict(uncond)
    return guided + slg.scale * (velocity - skipped)


def guided_velocity(cond_pred: torch.Tensor, uncond_pred: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond)."""
    return uncond_pred + guidance_scale * (cond_pred - uncond_pred)


@contextmanager
def blocks_passed_through(blocks: nn.ModuleList, indices: Sequence[int]) -> Iterator[None]:
    """Inside the context, each block at `indices` returns its first input (the hidden states) unchanged, as the
    reference's skip_block_indices leaves those blocks out of the loop. Blocks must take and return the hidden
    states first (diffusers' Wan blocks do)."""
    bad = [i for i in indices if not 0 <= i < len(blocks)]
    if bad:
        raise UserError(f"--slg_layers {','.join(map(str, bad))}: this DiT has blocks 0..{len(blocks) - 1}")
    patched = [blocks[i] for i in sorted(set(indices))]
    own = [block.__dict__.get("forward") for block in patched]  # a forward someone else set on the instance
    for block in patched:
        block.forward = _pass_through  # instance attribute: hooks (block swap) still run around it
    try:
        yield
    finally:
        for block, previous in zip(patched, own):
            if previous is None:
                del block.forward
            else:
                block.forward = previous


def _pass_through(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return hidden_states


def parse_slg_layers(text: str | None) -> tuple[int, ...] | None:
    """`--slg_layers 4,5,6` -> (4, 5, 6); None or empty -> None."""
    if text is None or not text.strip():
        return None
    try:
        layers = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--slg_layers {text}: expected block indices separated by commas, e.g. 4,5,6") from None
    if any(layer < 0 for layer in layers):
        raise UserError(f"--slg_layers {text}: block indices must be >= 0")
    return layers


def add_guidance_arguments(parser: argparse.ArgumentParser) -> None:
    """The reference's Wan `--cfg_skip_mode/--cfg_apply_ratio` and `--slg_*` flags, with its defaults."""
    from musubi_tuner.utils.flag_types import finite_float, unit_float

    parser.add_argument("--cfg_skip_mode", default="none", choices=CFG_SKIP_MODES,
                        help="steps that skip CFG (positive pass only): early, late, middle, early_late, alternate, "
                             "none (default: CFG on every step); needs --cfg_apply_ratio")
    parser.add_argument("--cfg_apply_ratio", type=unit_float, default=None,
                        help="share of the steps that apply CFG, 0.0-1.0 (default: all)")
    parser.add_argument("--slg_layers", default=None,
                        help="skip-layer guidance: DiT block indices to skip, comma separated (e.g. 4,5,6)")
    parser.add_argument("--slg_scale", type=finite_float, default=3.0, help="SLG scale, original mode (default 3.0)")
    parser.add_argument("--slg_start", type=unit_float, default=0.0, help="SLG starts at this share of the steps (0.0)")
    parser.add_argument("--slg_end", type=unit_float, default=0.3, help="SLG ends at this share of the steps (0.3)")
    parser.add_argument("--slg_mode", default=None, choices=SLG_MODES,
                        help="original: SD3.5's formula (a third pass); uncond: the skip-layer pass replaces the "
                             "negative pass (Wan2GP). Default: no SLG")


def guidance_options_from_args(args: argparse.Namespace, warn: bool = False) -> GuidanceOptions:
    """The flags of `add_guidance_arguments` as options, checked (a UserError names the flag); warn: log the flags
    that have no effect (once, when the flags are checked before any model loads)."""
    note = logger.warning if warn else logger.debug
    mode, ratio = getattr(args, "cfg_skip_mode", "none"), getattr(args, "cfg_apply_ratio", None)
    if mode != "none" and ratio is None:
        note("--cfg_skip_mode %s without --cfg_apply_ratio has no effect (CFG on every step), as in the reference",
             mode)
    layers = parse_slg_layers(getattr(args, "slg_layers", None))
    slg_mode = getattr(args, "slg_mode", None)
    if slg_mode is None:
        if layers is not None:
            note("--slg_layers without --slg_mode has no effect; add --slg_mode original or uncond")
        return GuidanceOptions(cfg_skip_mode=mode, cfg_apply_ratio=ratio)
    if layers is None:
        note("--slg_mode %s without --slg_layers has no effect (no block to skip), as in the reference", slg_mode)
        return GuidanceOptions(cfg_skip_mode=mode, cfg_apply_ratio=ratio)
    if args.slg_end < args.slg_start:
        raise UserError(f"--slg_end {args.slg_end} is before --slg_start {args.slg_start}; SLG would never run")
    slg = SkipLayerGuidance(layers=layers, scale=args.slg_scale, start=args.slg_start, end=args.slg_end, mode=slg_mode)
    return GuidanceOptions(cfg_skip_mode=mode, cfg_apply_ratio=ratio, slg=slg)
