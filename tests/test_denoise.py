"""The denoising loop: exact Euler integration, CFG math, timestep format, seeds."""

import pytest
import torch

from musubi_tuner.inference.denoise import denoise, guided_velocity, initial_noise
from musubi_tuner.inference.schedulers import SOLVERS, make_flow_scheduler


def constant_field(latents, timesteps, cond):
    return cond["v"].expand_as(latents)


def test_euler_constant_velocity_is_exact():
    # dx/dsigma = c from sigma 1 to 0: x_final = x_T - c, whatever the shift and step count.
    x = torch.randn(2, 4, 3, 5)
    c = torch.randn(1, 4, 1, 1)
    out = denoise(constant_field, x, make_flow_scheduler("vanilla", 5.0), 7, {"v": c}, progress=False)
    assert torch.allclose(out, x - c, atol=1e-6)


def test_euler_linear_velocity_matches_product_formula():
    a = 0.7
    x = torch.randn(1, 3, 4, dtype=torch.float64).float()
    sched = make_flow_scheduler("vanilla", 3.0)
    out = denoise(lambda lat, t, cond: a * lat, x, sched, 5, {}, progress=False)
    sigmas = sched.sigmas.double()
    factor = torch.prod(1 + a * (sigmas[1:] - sigmas[:-1])).item()
    assert torch.allclose(out, x * factor, atol=1e-6)


@pytest.mark.parametrize("solver", SOLVERS)
def test_every_solver_reaches_the_end_of_a_straight_path(solver):
    # On the straight path x_sigma = x0 + sigma*c the velocity is c; every solver must land on x0.
    sched = make_flow_scheduler(solver, 3.0)
    sched.set_timesteps(6)
    x0, c = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    x_start = x0 + sched.sigmas[0] * c
    out = denoise(constant_field, x_start, sched, 6, {"v": c}, progress=False)
    assert torch.allclose(out, x0, atol=1e-5)


def test_cfg_combination_exact():
    cond, uncond = torch.tensor(2.0), torch.tensor(-1.0)
    assert guided_velocity(cond, uncond, 5.0).item() == -1.0 + 5.0 * 3.0
    x = torch.zeros(1, 2, 2)
    out = denoise(constant_field, x, make_flow_scheduler("vanilla", 1.0), 4, {"v": cond}, {"v": uncond}, 5.0,
                  progress=False)
    assert torch.allclose(out, torch.full_like(x, -14.0), atol=1e-6)


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, latents, timesteps, cond):
        self.calls.append((timesteps.clone(), cond["name"]))
        return torch.zeros_like(latents)


@pytest.mark.parametrize(
    "uncond,scale,per_step", [(None, 5.0, 1), ({"name": "neg"}, 1.0, 1), ({"name": "neg"}, 4.0, 2)]
)
def test_number_of_passes(uncond, scale, per_step):
    rec = Recorder()
    sched = make_flow_scheduler("unipc", 3.0)
    denoise(rec, torch.zeros(3, 2), sched, 5, {"name": "pos"}, uncond, scale, progress=False)
    assert len(rec.calls) == 5 * per_step
    if per_step == 2:
        assert [name for _, name in rec.calls[:2]] == ["pos", "neg"]


def test_timesteps_are_float_batch_on_1000_scale():
    rec = Recorder()
    denoise(rec, torch.zeros(3, 2), make_flow_scheduler("unipc", 3.0), 4, {"name": "pos"}, progress=False)
    first = rec.calls[0][0]
    assert first.dtype == torch.float32 and first.shape == (3,)
    assert first.tolist() == [999.0] * 3
    assert [c[0][0].item() for c in rec.calls] == sorted([c[0][0].item() for c in rec.calls], reverse=True)


def test_callback_sees_every_step():
    seen = []
    denoise(constant_field, torch.zeros(1, 2), make_flow_scheduler("vanilla", 1.0), 3, {"v": torch.ones(1)},
            progress=False, callback=lambda i, lat: seen.append((i, lat[0, 0].item())))
    assert [i for i, _ in seen] == [0, 1, 2]
    assert seen[-1][1] == pytest.approx(-1.0)


def test_initial_noise_is_seeded():
    a = initial_noise((1, 4, 2, 8, 8), 42, "cpu")
    b = initial_noise((1, 4, 2, 8, 8), 42, "cpu")
    c = initial_noise((1, 4, 2, 8, 8), 43, "cpu")
    assert torch.equal(a, b) and not torch.equal(a, c)
    want = torch.randn((1, 4, 2, 8, 8), generator=torch.Generator().manual_seed(42))
    assert torch.equal(a, want)
    assert initial_noise((2, 3), 1, "cpu", dtype=torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(initial_noise((2, 3), 7, "cpu", cpu_noise=False), initial_noise((2, 3), 7, "cpu"))


def nonlinear_field(latents, timesteps, cond):
    return torch.tanh(latents * cond["w"]) + timesteps.view(-1, *[1] * (latents.ndim - 1)) / 1000


@pytest.mark.parametrize("solver", SOLVERS)
def test_same_seed_same_latents(solver):
    def run(seed):
        noise = initial_noise((1, 2, 4, 4), seed, "cpu")
        return denoise(nonlinear_field, noise, make_flow_scheduler(solver, 3.0), 5, {"w": 0.5}, {"w": -0.5}, 3.0,
                       progress=False)

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))
