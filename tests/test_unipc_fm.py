"""FramePack's flow-matching UniPC, checked on a linear ODE with a known solution: data x0 ~ N(mu, s^2) has the exact
denoiser D(x, sigma) = mu + (1 - sigma) s^2 / v (x - (1 - sigma) mu), v = (1 - sigma)^2 s^2 + sigma^2, and the
probability-flow ODE from x_1 has the exact solution x_sigma = (1 - sigma) mu + sqrt(v(sigma)) x_1."""

import math

import pytest
import torch

from musubi_tuner.inference.unipc import sample_unipc

MU, S = 1.0, 2.0


def _v(sigma):
    return (1 - sigma) ** 2 * S * S + sigma * sigma


def gaussian_denoiser(calls=None):
    def denoise(x, sigma):
        if calls is not None:
            calls.append(float(sigma[0]))
        sg = float(sigma[0])
        return MU + (1 - sg) * S * S / _v(sg) * (x - (1 - sg) * MU)
    return denoise


def test_two_steps_by_hand():
    # sigmas 1, 0.5, 0: order 1. x0 at sigma 1 is mu = 1; Euler to 0.5 gives 0.5*1 + 0.5*1 = 1;
    # the result is D(1, 0.5) = 1 + 0.5*4/(0.25*4 + 0.25) * (1 - 0.5) = 1.8 (the corrector's x is not used after).
    out = sample_unipc(gaussian_denoiser(), torch.ones(1, 1, dtype=torch.float64),
                       torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64), progress=False)
    assert out.item() == pytest.approx(1.8, abs=1e-12)


def test_one_model_call_per_nonzero_sigma():
    calls = []
    sigmas = torch.linspace(1, 0, 6, dtype=torch.float64)
    sample_unipc(gaussian_denoiser(calls), torch.zeros(1, 2, dtype=torch.float64), sigmas, progress=False)
    assert calls == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_converges_to_the_exact_solution_faster_than_first_order(variant):
    x1 = torch.tensor([[0.7, -1.3]], dtype=torch.float64)
    errors = []
    for n in (16, 32, 64):
        sigmas = torch.linspace(1, 0, n + 1, dtype=torch.float64)
        sigmas = 3 * sigmas / (1 + 2 * sigmas)  # shifted grid, as FramePack samples
        out = sample_unipc(gaussian_denoiser(), x1.clone(), sigmas, variant=variant, progress=False)
        last = float(sigmas[-2])  # the result is the data prediction at the last non-zero sigma
        exact = MU + (1 - last) * S * S * x1 / math.sqrt(_v(last))
        errors.append((out - exact).abs().max().item())
    assert errors[-1] < 5e-3
    # halving the step size cuts the error by more than 4x (a first-order method would only halve it)
    assert errors[0] / errors[1] > 4 and errors[1] / errors[2] > 4


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="bh1"):
        sample_unipc(gaussian_denoiser(), torch.zeros(1, 1), torch.tensor([1.0, 0.0]), variant="bh3", progress=False)
