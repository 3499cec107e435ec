"""Validation loss over the dataset config's `[[validation_datasets]]`.

Every item is scored at the same fixed timesteps (the centres of four bands of the 0..1000 scale) with the
same noise each time: the noise comes from a generator re-seeded with `--validation_seed` (default `--seed`)
at every evaluation, so two evaluations of one run, and two runs, are comparable. It runs in eval mode
without gradients and never draws from the training streams (noise generator, torch/python/numpy global
RNGs), so a run with validation trains exactly as one without it, and resume stays bit-exact.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from musubi_tuner.dataset.batches import CachedBatches
from musubi_tuner.dataset.masks import MASK_CONTENT
from musubi_tuner.training.loss import per_sample_loss
from musubi_tuner.training.timesteps import flow_matching_target, noisy_model_input

BAND_WIDTH = 250
VALIDATION_TIMESTEPS = tuple(float(start + BAND_WIDTH // 2) for start in range(0, 1000, BAND_WIDTH))
"""125, 375, 625, 875: one fixed timestep per band of the 0..1000 scale."""


def band_key(timestep: float) -> str:
    """`loss/validation_t250-500` for a timestep in that band."""
    start = int(timestep // BAND_WIDTH) * BAND_WIDTH
    return f"loss/validation_t{start}-{start + BAND_WIDTH}"


class ValidationLoss:
    """The validation batches and the fixed-noise evaluation; `evaluate` returns the logs."""

    def __init__(self, batches: CachedBatches, seed: int):
        self.batches, self.seed = batches, seed

    @torch.no_grad()
    def evaluate(self, arch: Any, dit: torch.nn.Module, device: torch.device, forward_context: Callable[[], Any],
                 conditioning: dict[str, Any] | None = None) -> dict[str, float]:
        """{`loss/validation`: mean over items and timesteps, `loss/validation_tA-B`: mean per band}.
        conditioning: the architecture's per-step training entries (e.g. HunyuanVideo's guidance), as in training."""
        gen = torch.Generator("cpu").manual_seed(self.seed)
        totals = {t: 0.0 for t in VALIDATION_TIMESTEPS}
        count = 0
        for entries in self.batches.batches_for_epoch(0):
            batch = {**self.batches.load_batch(entries), **(conditioning or {})}
            latents = arch.latents_from_cache(batch["latents"].to(device, torch.float32))
            size = latents.shape[0]
            for t in VALIDATION_TIMESTEPS:
                noise = torch.randn(latents.shape, generator=gen).to(device)
                noisy = noisy_model_input(latents, noise, torch.full((size,), t / 1000))
                with forward_context():
                    pred = arch.predict(dit, batch, noisy, torch.full((size,), t, device=device))
                loss = per_sample_loss(pred, flow_matching_target(latents, noise), batch.get(MASK_CONTENT))
                totals[t] += loss.sum().item()
            count += size
        logs = {band_key(t): total / count for t, total in totals.items()}
        return {"loss/validation": sum(logs.values()) / len(logs), **logs}


def describe(logs: dict[str, float]) -> str:
    """One line for the console: the mean, then each band."""
    bands = ", ".join(f"{k.removeprefix('loss/validation_')} {v:.5f}" for k, v in logs.items() if k != "loss/validation")
    return f"{logs['loss/validation']:.5f} ({bands})"
