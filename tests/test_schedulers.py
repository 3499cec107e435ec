"""Flow schedulers: the sigma grids match the reference's samplers exactly."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from musubi_tuner.errors import UserError
from musubi_tuner.inference.schedulers import SOLVERS, flux_mu, make_flow_scheduler


def wan_flow_unipc_schedule(steps: int, shift: float, n_train: int = 1000):
    """What the original Wan FlowUniPCMultistepScheduler computes (written from its formulas)."""
    alphas = np.linspace(1, 1 / n_train, n_train)[::-1].copy()
    train_sigmas = torch.from_numpy(1.0 - alphas).to(torch.float32)  # built with shift=1
    sigma_max, sigma_min = train_sigmas[0].item(), train_sigmas[-1].item()
    sigmas = np.linspace(sigma_max, sigma_min, steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = torch.from_numpy(sigmas * n_train).to(torch.int64)
    return timesteps, torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))


@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
@pytest.mark.parametrize("steps,shift", [(50, 5.0), (20, 3.0), (40, 12.0), (1, 5.0)])
def test_wan_style_grid_matches_original_flow_unipc(solver, steps, shift):
    sched = make_flow_scheduler(solver, shift)
    timesteps = sched.set_timesteps(steps)
    want_t, want_sigmas = wan_flow_unipc_schedule(steps, shift)
    assert torch.equal(timesteps, want_t)
    if solver == "unipc":
        assert torch.equal(sched.sigmas, want_sigmas)
    else:  # diffusers' DPM grid starts from 0.999 in float64 instead of float32: 1 ulp apart
        assert torch.allclose(sched.sigmas, want_sigmas, atol=1e-7, rtol=0)


def test_wan_unipc_first_values():
    sched = make_flow_scheduler("unipc", 3.0)
    t = sched.set_timesteps(10)
    assert t.tolist() == [999, 963, 922, 874, 817, 749, 666, 562, 428, 249]
    assert sched.sigmas[0].item() == pytest.approx(3 * 0.999 / (1 + 2 * 0.999), abs=1e-7)
    assert sched.sigmas[-1].item() == 0.0


def test_vanilla_grid_is_shifted_linspace_from_one():
    sched = make_flow_scheduler("vanilla", 5.0)
    t = sched.set_timesteps(8)
    base = np.linspace(1, 0, 9)
    want = 5.0 * base / (1 + 4.0 * base)
    assert torch.allclose(sched.sigmas.double(), torch.from_numpy(want), atol=1e-7)
    assert t.dtype == torch.float32
    assert torch.allclose(t.double(), torch.from_numpy(want[:-1] * 1000), atol=1e-4)
    assert t[0].item() == 1000.0


def test_flux_mu_line():
    assert flux_mu(256) == pytest.approx(0.5)
    assert flux_mu(4096) == pytest.approx(1.15)
    assert flux_mu(2176) == pytest.approx(0.825)  # midpoint
    # 1024x1024 image: 64x64 packed tokens
    assert flux_mu(4096) > flux_mu(1024) > flux_mu(256)


def test_dynamic_shift_matches_flux_time_shift():
    mu = flux_mu(1024)
    sched = make_flow_scheduler("vanilla", None, mu=mu)
    sched.set_timesteps(6)
    t = np.linspace(1, 0, 7)[:-1]
    want = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    assert torch.allclose(sched.sigmas[:-1].double(), torch.from_numpy(want), atol=1e-6)
    # Same as diffusers' own resolution-dependent shifting.
    ref = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    ref.set_timesteps(sigmas=t, mu=mu)
    assert torch.allclose(sched.sigmas, ref.sigmas, atol=1e-6)


@pytest.mark.parametrize("solver", SOLVERS)
def test_dynamic_shift_for_every_solver(solver):
    sched = make_flow_scheduler(solver, None, mu=1.0)
    sched.set_timesteps(4)
    static = make_flow_scheduler(solver, math.e)
    static.set_timesteps(4)
    assert torch.equal(sched.sigmas, static.sigmas)


def test_unknown_solver_lists_choices():
    with pytest.raises(UserError, match="unipc, dpm\\+\\+, vanilla"):
        make_flow_scheduler("euler_a", 3.0)


def test_missing_shift_and_mu():
    with pytest.raises(UserError, match="--flow_shift"):
        make_flow_scheduler("unipc", None)
    with pytest.raises(UserError, match="--flow_shift"):
        make_flow_scheduler("unipc", -1.0)


def test_zero_steps_rejected():
    with pytest.raises(UserError, match="--infer_steps"):
        make_flow_scheduler("unipc", 3.0).set_timesteps(0)


def test_euler_step_is_exact():
    sched = make_flow_scheduler("vanilla", 3.0)
    t = sched.set_timesteps(4)
    x = torch.randn(2, 3)
    v = torch.randn(2, 3)
    out = sched.step(v, t[0], x)
    dt = (sched.sigmas[1] - sched.sigmas[0]).item()
    assert torch.allclose(out, x + dt * v, atol=1e-7)
