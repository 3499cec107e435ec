"""MagCache for FramePack (`--magcache_mag_ratios` ...): skip the transformer blocks on steps where the residual they
add (output - input of the block stack) is predicted to change little, and reuse the last residual instead.

The skip rule is the reference's: after the first `retention_ratio * steps` steps (at least 1) and before the last,
multiply the step's magnitude ratio into an accumulated ratio and add |1 - accumulated| to an accumulated error; skip
while that error stays <= threshold and at most K steps in a row, else run the blocks and reset. Ratios given for
another step count are resampled to the nearest entries. Calibration runs every step and records the residual norm
ratio between consecutive steps (the values to pass as --magcache_mag_ratios).

The blocks are skipped from outside the model: for a skipped call both block lists are swapped for empty ones and
the cached residual is added where the block output enters `norm_out`. The residual is kept for the tokens that reach
`norm_out` (the sampled window); each guidance pass (positive/negative) keeps its own state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from musubi_tuner.errors import UserError

DEFAULT_MAG_RATIOS = (
    1.0, 1.06971, 1.29073, 1.11245, 1.09596, 1.05233, 1.01415, 1.05672, 1.00848, 1.03632, 1.02974, 1.00984, 1.03028,
    1.00681, 1.06614, 1.05022, 1.02592, 1.01776, 1.02985, 1.00726, 1.03727, 1.01502, 1.00992, 1.03371, 0.9976,
    1.02742, 1.0093, 1.01869, 1.00815, 1.01461, 1.01152, 1.03082, 1.0061, 1.02162, 1.01999, 0.99063, 1.01186, 1.0217,
    0.99947, 1.01711, 0.9904, 1.00258, 1.00878, 0.97039, 0.97686, 0.94315, 0.97728, 0.91154, 0.86139, 0.76592,
)
"""MagCache's published ratios for HunyuanVideo-family models at 50 steps (the reference's default for `0`)."""


def parse_mag_ratios(text: str) -> tuple[float, ...] | None:
    """--magcache_mag_ratios: comma-separated floats; `0` means the default 50-step ratios (None)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--magcache_mag_ratios {text!r}: expected comma-separated numbers, or 0 for the defaults") from None
    if values == (0.0,):
        return None
    return values


def resample_ratios(ratios: tuple[float, ...], steps: int) -> np.ndarray:
    """Nearest-entry resampling of the ratio list to `steps` entries (the last entry for a single step)."""
    if steps == 1:
        return np.array([ratios[-1]])
    positions = np.round(np.arange(steps) * ((len(ratios) - 1) / (steps - 1))).astype(int)
    return np.array(ratios)[positions]


@dataclass
class _PassState:
    count: int = 0
    residual: torch.Tensor | None = None
    ratio: float = 1.0
    skipped_in_row: int = 0
    error: float = 0.0
    calibration: list[float] = field(default_factory=list)


@dataclass
class MagCache:
    mag_ratios: tuple[float, ...] | None = None
    retention_ratio: float = 0.2
    threshold: float = 0.24
    k: int = 6
    calibrate: bool = False
    steps: int = 0
    skipped: int = 0
    """Skipped block-stack runs over the whole video (for the log and tests)."""
    _ratios: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    _passes: dict[str, _PassState] = field(default_factory=dict, repr=False)
    calibration_ratios: list[list[float]] = field(default_factory=list, repr=False)

    def start(self, steps: int) -> None:
        """Reset before a section of `steps` sampler steps."""
        self._flush_calibration()
        self.steps = steps
        ratios = self.mag_ratios or DEFAULT_MAG_RATIOS
        self._ratios = np.array(ratios) if (self.calibrate or len(ratios) == steps) else resample_ratios(ratios, steps)
        self._passes = {}

    def _flush_calibration(self) -> None:
        state = self._passes.get("positive")
        if self.calibrate and state is not None and state.calibration:
            self.calibration_ratios.append(state.calibration)

    def finish(self) -> list[list[float]]:
        """Calibration ratios per section (each starting with 1.0, ready for --magcache_mag_ratios)."""
        self._flush_calibration()
        self._passes = {}
        return [[1.0, *ratios] for ratios in self.calibration_ratios]

    def _should_skip(self, state: _PassState) -> bool:
        if self.calibrate or not (max(int(self.retention_ratio * self.steps), 1) <= state.count < self.steps - 1):
            return False
        state.ratio *= float(self._ratios[state.count])
        state.error += abs(1 - state.ratio)
        state.skipped_in_row += 1
        if state.error <= self.threshold and state.skipped_in_row <= self.k:
            return True
        state.ratio, state.skipped_in_row, state.error = 1.0, 0, 0.0
        return False

    def run(self, dit: nn.Module, pass_name: str, call: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One model call for a guidance pass, with the blocks skipped when the rule says so."""
        state = self._passes.setdefault(pass_name, _PassState())
        skip = state.residual is not None and self._should_skip(state)
        with _block_stack_hooks(dit, state, skip, self.calibrate):
            out = call()
        self.skipped += int(skip)
        state.count += 1
        if state.count >= self.steps:
            state.count, state.ratio, state.skipped_in_row, state.error = 0, 1.0, 0, 0.0
        return out


@contextmanager
def _block_stack_hooks(dit: nn.Module, state: _PassState, skip: bool, calibrate: bool) -> Iterator[None]:
    captured: dict[str, torch.Tensor] = {}

    def grab_input(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.setdefault("input", hidden)

    def at_norm_out(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if skip:
            hidden = hidden + state.residual
        else:
            residual = hidden - captured["input"][:, -hidden.shape[1]:]
            if calibrate and state.residual is not None:
                ratio = residual.norm(dim=-1) / state.residual.norm(dim=-1)
                state.calibration.append(round(ratio.mean().item(), 5))
            state.residual = residual
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    handles = [dit.norm_out.register_forward_pre_hook(at_norm_out, with_kwargs=True)]
    saved = None
    if skip:
        saved = (dit.transformer_blocks, dit.single_transformer_blocks)
        dit.transformer_blocks, dit.single_transformer_blocks = nn.ModuleList(), nn.ModuleList()
    else:
        first = dit.transformer_blocks[0] if len(dit.transformer_blocks) else dit.single_transformer_blocks[0]
        handles.append(first.register_forward_pre_hook(grab_input, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        if saved is not None:
            dit.transformer_blocks, dit.single_transformer_blocks = saved
