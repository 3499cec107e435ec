"""Flow-matching schedulers for inference, built on diffusers.

`make_flow_scheduler` returns a `FlowScheduler`: a thin wrapper that fixes the sigma grid to the
reference tool's and hides the per-solver differences of diffusers' `set_timesteps`/`step`.

Sigma grids (before the shift s*t / (1 + (s-1)*t) is applied):
- `unipc`, `dpm++`: linspace(sigma_max, 0, N+1)[:-1] with sigma_max = 1 - 1/num_train_timesteps
  (stored as float32), as the original Wan `FlowUniPCMultistepScheduler` does. Timesteps are
  sigma*1000 truncated to integers, as there. (Wan's own dpm++ starts its grid at 1.0 instead;
  diffusers' DPM solver takes no custom sigmas, so ours shares the UniPC grid: first timestep 999.)
- `vanilla` (Euler): linspace(1, 0, N+1)[:-1], as the reference's FlowMatchDiscreteScheduler and
  the FLUX sampler do. Timesteps are float sigma*1000.

Resolution-dependent (dynamic) shifting for FLUX: exp(mu) / (exp(mu) + (1/t - 1)), which is exactly
the static shift with s = exp(mu), so every solver supports it through `flow_shift = exp(mu)`.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from musubi_tuner.errors import UserError

SOLVERS = ("unipc", "dpm++", "vanilla")

# FLUX's resolution-dependent shift: mu is linear in the image-token count through these two points.
FLUX_BASE_SEQ_LEN, FLUX_BASE_SHIFT = 256, 0.5
FLUX_MAX_SEQ_LEN, FLUX_MAX_SHIFT = 4096, 1.15


def flux_mu(image_seq_len: int) -> float:
    """mu for FLUX dynamic shifting: the line through (256, 0.5) and (4096, 1.15) at `image_seq_len`."""
    slope = (FLUX_MAX_SHIFT - FLUX_BASE_SHIFT) / (FLUX_MAX_SEQ_LEN - FLUX_BASE_SEQ_LEN)
    return FLUX_BASE_SHIFT + slope * (image_seq_len - FLUX_BASE_SEQ_LEN)


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """The flow-matching time shift s*t / (1 + (s-1)*t) (SD3 / Wan)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@dataclass
class FlowScheduler:
    """A diffusers scheduler plus the base sigma grid the reference uses for this solver."""

    solver: str
    shift: float
    """Effective static shift (exp(mu) for dynamic shifting)."""
    inner: object
    """The diffusers scheduler instance (stateful: `set_timesteps` resets it)."""
    num_train_timesteps: int = 1000
    _step_takes_generator: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self._step_takes_generator = "generator" in inspect.signature(self.inner.step).parameters

    def base_sigmas(self, num_steps: int) -> np.ndarray:
        """Unshifted sigmas for `num_steps` steps (without the final 0)."""
        if self.solver == "vanilla":
            return np.linspace(1.0, 0.0, num_steps + 1)[:-1]
        sigma_max = float(np.float32(1.0 - 1.0 / self.num_train_timesteps))
        return np.linspace(sigma_max, 0.0, num_steps + 1)[:-1]

    def set_timesteps(self, num_steps: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Reset the solver state and return the timesteps (0..1000 scale), one per step."""
        if num_steps < 1:
            raise UserError(f"the number of inference steps must be at least 1 (got {num_steps}); check --infer_steps")
        if self.solver == "dpm++":
            # diffusers' DPM flow grid is already linspace(sigma_max, 0) shifted by `flow_shift`.
            self.inner.set_timesteps(num_steps, device=device)
        else:
            self.inner.set_timesteps(sigmas=self.base_sigmas(num_steps), device=device)
        return self.inner.timesteps

    def begin_at(self, index: int) -> None:
        """Start the schedule at step `index` (video to video); call after `set_timesteps`."""
        if hasattr(self.inner, "set_begin_index"):
            self.inner.set_begin_index(index)

    @property
    def sigmas(self) -> torch.Tensor:
        """Sigmas of the current schedule, ending with 0 (len = steps + 1)."""
        return self.inner.sigmas

    def step(
        self, velocity: torch.Tensor, timestep: torch.Tensor, latents: torch.Tensor, generator=None
    ) -> torch.Tensor:
        """One solver step from `latents` at `timestep` given the predicted velocity (noise - x0)."""
        kwargs = {"generator": generator} if self._step_takes_generator else {}
        return self.inner.step(velocity, timestep, latents, return_dict=False, **kwargs)[0]


def make_flow_scheduler(
    solver: str, flow_shift: float | None, num_train_timesteps: int = 1000, mu: float | None = None
) -> FlowScheduler:
    """Build the scheduler for `--sample_solver`.

    flow_shift: static shift; None needs `mu` (FLUX resolution-dependent shift, see `flux_mu`).
    """
    if solver not in SOLVERS:
        raise UserError(f"unknown --sample_solver {solver!r}; choose one of: {', '.join(SOLVERS)}")
    if flow_shift is None:
        if mu is None:
            raise UserError("--flow_shift is not set and no resolution-dependent shift (mu) was given; "
                            "set --flow_shift")
        shift = math.exp(mu)
    else:
        if flow_shift <= 0:
            raise UserError(f"--flow_shift must be > 0 (got {flow_shift})")
        shift = float(flow_shift)

    # diffusers is imported here, not at module level: `--help` and argument errors should not pay for it
    if solver == "unipc":
        from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler

        inner = UniPCMultistepScheduler(
            num_train_timesteps=num_train_timesteps,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
            solver_order=2,
        )
    elif solver == "dpm++":
        from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler

        inner = DPMSolverMultistepScheduler(
            num_train_timesteps=num_train_timesteps,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
            algorithm_type="dpmsolver++",
            solver_order=2,
        )
    else:
        from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

        inner = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
    return FlowScheduler(solver=solver, shift=shift, inner=inner, num_train_timesteps=num_train_timesteps)
