"""FramePack's UniPC sampler for flow matching (the reference's `frame_pack/uni_pc_fm.py`, re-derived).

It is UniPC (Zhao et al. 2023) in data-prediction form with the log-SNR taken as lambda = -log(sigma): the
first-order step is exactly Euler on the flow ODE, x_t = (s_t / s_prev) x + (1 - s_t / s_prev) x0. Each step
predicts with UniP of the current order, evaluates the model at the prediction, and corrects with UniC using that
evaluation (the corrected x is carried forward; the evaluation is stored as the model output for it). The order
ramps up to min(3, steps - 1). The result is the last data prediction (at the smallest non-zero sigma), as there.

This is not diffusers' `UniPCMultistepScheduler`: with flow sigmas diffusers uses lambda = log((1 - s) / s), which
gives the same first-order step but different higher-order coefficients.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm import tqdm

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""denoise(x, sigma (B,)) -> predicted clean sample x0, same shape as x."""
VARIANTS = ("bh1", "bh2")
MAX_ORDER = 3


def _coefficients(lambdas_prev: list[float], lambda_t: float, order: int, variant: str
                  ) -> tuple[float, list[float], float, list[float] | None, list[float]]:
    """(h_phi_1, rks of the older points, B(h), predictor rhos or None, corrector rhos) for one step."""
    h = lambda_t - lambdas_prev[-1]
    rks = [(lambdas_prev[-(i + 1)] - lambdas_prev[-1]) / h for i in range(1, order)]
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    # b_k = k! * phi_{k+1}(hh) / B(h), with phi_{k+1} built by the recurrence phi_{k+1} = (phi_k - 1/k!) / hh
    nodes = torch.tensor([*rks, 1.0], dtype=torch.float64)
    rows, b = [], []
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    for k in range(1, order + 1):
        rows.append(nodes ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r = torch.stack(rows)
    bt = torch.tensor(b, dtype=torch.float64)
    rhos_p = None
    if rks:
        rhos_p = [0.5] if order == 2 else torch.linalg.solve(r[:-1, :-1], bt[:-1]).tolist()
    rhos_c = [0.5] if order == 1 else torch.linalg.solve(r, bt).tolist()
    return h_phi_1, rks, b_h, rhos_p, rhos_c


def _weighted(terms: list[torch.Tensor], weights: list[float]) -> torch.Tensor | float:
    total: torch.Tensor | float = 0.0
    for term, weight in zip(terms, weights):
        total = total + weight * term
    return total


def unipc_step(denoise: DenoiseFn, x: torch.Tensor, sigmas_prev: list[float], x0_prev: list[torch.Tensor],
               sigma_t: float, order: int, variant: str = "bh1") -> tuple[torch.Tensor, torch.Tensor]:
    """One UniPC step from the last point in `sigmas_prev` to `sigma_t`; returns (corrected x, x0 at the
    predicted x)."""
    lambdas_prev = [-math.log(s) for s in sigmas_prev[-order:]]
    h_phi_1, rks, b_h, rhos_p, rhos_c = _coefficients(lambdas_prev, -math.log(sigma_t), order, variant)
    m0 = x0_prev[-1]
    diffs = [(x0_prev[-(i + 1)] - m0) / rk for i, rk in zip(range(1, order), rks)]
    x_base = (sigma_t / sigmas_prev[-1]) * x - h_phi_1 * m0
    x_pred = x_base - b_h * _weighted(diffs, rhos_p) if rhos_p is not None else x_base
    x0_t = denoise(x_pred, torch.full((x.shape[0],), sigma_t, device=x.device, dtype=torch.float32))
    x_corr = x_base - b_h * (_weighted(diffs, rhos_c[:-1]) + rhos_c[-1] * (x0_t - m0))
    return x_corr, x0_t


def sample_unipc(denoise: DenoiseFn, noise: torch.Tensor, sigmas: torch.Tensor, variant: str = "bh1",
                 progress: bool = True, callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Sample from `noise` over `sigmas` (descending, ending at 0; the 0 is never evaluated) and return the final
    data prediction. `denoise` is called once per non-zero sigma."""
    if variant not in VARIANTS:
        raise ValueError(f"UniPC variant must be one of {VARIANTS}, got {variant!r}")
    grid = [float(s) for s in sigmas]
    order = min(MAX_ORDER, len(grid) - 2)
    x = noise
    sigmas_prev: list[float] = []
    x0_prev: list[torch.Tensor] = []
    for i in tqdm(range(len(grid) - 1), desc="denoising", disable=not progress):
        with torch.no_grad():
            if i == 0:
                x0 = denoise(x, torch.full((x.shape[0],), grid[0], device=x.device, dtype=torch.float32))
            else:
                x, x0 = unipc_step(denoise, x, sigmas_prev, x0_prev, grid[i], min(i, order), variant)
        sigmas_prev = [*sigmas_prev, grid[i]][-max(order, 1):]
        x0_prev = [*x0_prev, x0][-max(order, 1):]
        if callback is not None:
            callback(i, x0)
    return x0_prev[-1]
