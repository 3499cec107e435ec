"""Timestep sampling, noisy inputs and loss weighting for flow-matching training.

Conventions (the reference's): t = 1 is pure noise, t = 0 the clean latent; the noisy input is
`(1 - t) * latents + t * noise` and the target `noise - latents`. The model sees timesteps on a
0..1000 scale: `t * 1000 + 1` for every mode except `sigma`, which indexes a 1000-entry table
(sigma = k/1000, timestep = sigma * 1000) and applies no shift.

All randomness goes through the `torch.Generator` passed in (CPU), so a run resumes exactly when the
trainer saves and restores that generator's state. Samples are made on the CPU in float32; the
caller moves them to its device.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

NUM_TRAIN_TIMESTEPS = 1000
SHIFT_MODES = ("flux_shift", "qwen_shift", "qinglong_flux", "qinglong_qwen")
"""Modes whose shift depends on the image-token count (`image_seq_len`)."""
_REJECTION_LOOPS = 1000
_EPS = 1e-7


@dataclass(frozen=True, kw_only=True)
class TimestepConfig:
    """The `--timestep_sampling` family of flags (defaults = the reference's)."""

    sampling: str = "sigma"
    discrete_flow_shift: float = 1.0
    sigmoid_scale: float = 1.0
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    min_timestep: int | None = None
    """0..1000 scale; None = 0."""
    max_timestep: int | None = None
    """0..1000 scale; None = 1000."""
    preserve_distribution_shape: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TimestepConfig":
        return cls(
            sampling=args.timestep_sampling,
            discrete_flow_shift=args.discrete_flow_shift,
            sigmoid_scale=args.sigmoid_scale,
            weighting_scheme=args.weighting_scheme,
            logit_mean=args.logit_mean,
            logit_std=args.logit_std,
            mode_scale=args.mode_scale,
            min_timestep=args.min_timestep,
            max_timestep=args.max_timestep,
            preserve_distribution_shape=args.preserve_distribution_shape,
        )

    @property
    def timestep_range(self) -> tuple[int, int]:
        """(min, max) on the 0..1000 scale."""
        lo = self.min_timestep if self.min_timestep is not None else 0
        hi = self.max_timestep if self.max_timestep is not None else NUM_TRAIN_TIMESTEPS
        return lo, hi


@dataclass(frozen=True)
class TimestepSample:
    sigmas: torch.Tensor
    """(B,) noise coefficient t in [0, 1]."""
    timesteps: torch.Tensor
    """(B,) what the model is given, 0..1000 scale."""


# ---- small maths -----------------------------------------------------------------------------


def uniform_to_normal(u: torch.Tensor) -> torch.Tensor:
    """Standard-normal quantile of u (clamped away from 0 and 1): sqrt(2) * erfinv(2u - 1)."""
    u = u.clamp(_EPS, 1.0 - _EPS)
    return math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)


def linear_mu(seq_len: float, x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15) -> float:
    """The line through (x1, y1) and (x2, y2) evaluated at `seq_len` (resolution-dependent shift)."""
    slope = (y2 - y1) / (x2 - x1)
    return slope * seq_len + (y1 - slope * x1)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 time shift: s*t / (1 + (s-1)*t)."""
    return (t * shift) / (1 + (shift - 1) * t)


def resolution_shift(sampling: str, image_seq_len: int | None) -> float:
    """exp(mu) with mu linear in the image-token count: FLUX (256,0.5)-(4096,1.15), Qwen (256,0.5)-(8192,0.9)."""
    if image_seq_len is None:
        raise ValueError(f"timestep sampling {sampling!r} needs image_seq_len (image tokens of the latent)")
    if sampling in ("flux_shift", "qinglong_flux"):
        mu = linear_mu(image_seq_len)
    else:
        mu = linear_mu(image_seq_len, x1=256, y1=0.5, x2=8192, y2=0.9)
    return math.exp(mu)


# ---- draws (each takes optional stratified uniforms in place of fresh randomness) -------------


def _rand(n: int, gen: torch.Generator, u: torch.Tensor | None) -> torch.Tensor:
    return torch.rand((n,), generator=gen) if u is None else u


def _randn(n: int, gen: torch.Generator, u: torch.Tensor | None) -> torch.Tensor:
    return torch.randn((n,), generator=gen) if u is None else uniform_to_normal(u)


def _normal(n: int, mean: float, std: float, gen: torch.Generator, u: torch.Tensor | None) -> torch.Tensor:
    if u is None:
        return torch.normal(mean, std, size=(n,), generator=gen)
    return mean + std * uniform_to_normal(u)


def density_samples(cfg: TimestepConfig, n: int, gen: torch.Generator) -> torch.Tensor:
    """u in [0, 1] from the `--weighting_scheme` density (used by `sigma` sampling)."""
    if cfg.weighting_scheme == "logit_normal":
        return torch.sigmoid(torch.normal(cfg.logit_mean, cfg.logit_std, size=(n,), generator=gen))
    u = torch.rand((n,), generator=gen)
    if cfg.weighting_scheme == "mode":
        return 1 - u - cfg.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def _shifted_logit_normal(n: int, shift: float, cfg: TimestepConfig, gen: torch.Generator, u: torch.Tensor | None):
    t = torch.sigmoid(_randn(n, gen, u) * cfg.sigmoid_scale)
    return shift_timesteps(t, shift)


def _logsnr_t(n: int, mean: float, std: float, gen: torch.Generator, u: torch.Tensor | None) -> torch.Tensor:
    return torch.sigmoid(-_normal(n, mean, std, gen, u) / 2)


def _qinglong(cfg: TimestepConfig, n: int, gen: torch.Generator, seq_len: int | None, u: torch.Tensor | None):
    """Per-sample mix. flux: 79% shift / 11% logsnr / 10% logsnr N(5.36, 1); qwen: 95% shift / 5% logsnr N(5.36, 1)."""
    decide = torch.rand((n,), generator=gen)
    is_flux = cfg.sampling == "qinglong_flux"
    mid = decide < (0.79 if is_flux else 0.95)
    logsnr = (decide >= 0.79) & (decide < 0.9) & is_flux
    logsnr2 = decide >= (0.9 if is_flux else 0.95)
    t = torch.zeros((n,))
    pick = (lambda m: None) if u is None else (lambda m: u[m])
    if mid.any():
        shift = resolution_shift(cfg.sampling, seq_len)
        t[mid] = _shifted_logit_normal(int(mid.sum()), shift, cfg, gen, pick(mid))
    if logsnr.any():
        t[logsnr] = _logsnr_t(int(logsnr.sum()), cfg.logit_mean, cfg.logit_std, gen, pick(logsnr))
    if logsnr2.any():
        t[logsnr2] = _logsnr_t(int(logsnr2.sum()), 5.36, 1.0, gen, pick(logsnr2))
    return t


def sample_unit_t(
    cfg: TimestepConfig,
    n: int,
    gen: torch.Generator,
    image_seq_len: int | None = None,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """n raw t in [0, 1] for a non-`sigma` mode, before the --min/--max_timestep range is applied."""
    mode = cfg.sampling
    if mode == "uniform":
        return _rand(n, gen, uniform)
    if mode == "sigmoid":
        return torch.sigmoid(cfg.sigmoid_scale * _randn(n, gen, uniform))
    if mode == "shift":
        return _shifted_logit_normal(n, cfg.discrete_flow_shift, cfg, gen, uniform)
    if mode in ("flux_shift", "qwen_shift"):
        return _shifted_logit_normal(n, resolution_shift(mode, image_seq_len), cfg, gen, uniform)
    if mode == "logsnr":
        return _logsnr_t(n, cfg.logit_mean, cfg.logit_std, gen, uniform)
    if mode in ("qinglong_flux", "qinglong_qwen"):
        return _qinglong(cfg, n, gen, image_seq_len, uniform)
    raise ValueError(f"unknown timestep sampling {mode!r}")


# ---- range handling ----------------------------------------------------------------------------


def _rejection_sample(
    cfg: TimestepConfig, n: int, gen: torch.Generator, seq_len: int | None, uniform: torch.Tensor | None
) -> torch.Tensor:
    """Keep drawing until n samples fall in [min, max]/1000, so the distribution's shape is kept."""
    lo, hi = (v / NUM_TRAIN_TIMESTEPS for v in cfg.timestep_range)
    accepted: list[torch.Tensor] = []
    count = 0
    for attempt in range(_REJECTION_LOOPS):
        # Stratified uniforms are used once; later rounds draw fresh ones.
        t = sample_unit_t(cfg, n, gen, seq_len, uniform if attempt == 0 else None)
        ok = t[(t >= lo) & (t <= hi)][: n - count]
        accepted.append(ok)
        count += ok.numel()
        if count == n:
            return torch.cat(accepted)
    logger.warning("could not draw %d timesteps in [%s, %s] in %d rounds; scaling instead", n, lo, hi, _REJECTION_LOOPS)
    return sample_unit_t(cfg, n, gen, seq_len) * (hi - lo) + lo


def sample_t(
    cfg: TimestepConfig,
    n: int,
    gen: torch.Generator,
    image_seq_len: int | None = None,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """n noise coefficients for a non-`sigma` mode, inside the --min/--max_timestep range.

    Default: [0, 1] is mapped linearly onto [min, max]/1000 (which distorts the shape);
    with --preserve_distribution_shape out-of-range draws are rejected instead.
    """
    if cfg.preserve_distribution_shape:
        return _rejection_sample(cfg, n, gen, image_seq_len, uniform)
    lo, hi = (v / NUM_TRAIN_TIMESTEPS for v in cfg.timestep_range)
    return sample_unit_t(cfg, n, gen, image_seq_len, uniform) * (hi - lo) + lo


def sigma_table() -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas (1001,), timesteps (1000,)): the linear training table, sigma 1 -> 0, timestep = sigma * 1000."""
    sigmas = torch.linspace(1, 0, NUM_TRAIN_TIMESTEPS + 1)
    return sigmas, (sigmas[:-1] * NUM_TRAIN_TIMESTEPS).to(torch.float32)


def sample_sigma_mode(cfg: TimestepConfig, n: int, gen: torch.Generator) -> TimestepSample:
    """`sigma`: u from the weighting density picks an entry of the linear table inside [min, max]."""
    lo, hi = cfg.timestep_range
    u = density_samples(cfg, n, gen)
    # clamp: a density sample that rounds to 1.0 would index past the table.
    index = (u * (hi - lo) + lo).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
    sigmas, table = sigma_table()
    return TimestepSample(sigmas=sigmas[index], timesteps=table[index])


def sample_timesteps(
    cfg: TimestepConfig,
    batch_size: int,
    gen: torch.Generator,
    image_seq_len: int | None = None,
    uniform: torch.Tensor | None = None,
) -> TimestepSample:
    """One noise coefficient and model timestep per sample.

    image_seq_len: image tokens of the latent (the architecture's `timestep_shift_sequence_length`),
        needed by flux_shift/qwen_shift/qinglong_*.
    uniform: per-sample stratified uniforms from `stratified_timestep_pool` (--num_timestep_buckets);
        they replace the first uniform/normal draw. Ignored by `sigma`, as in the reference.
    """
    if cfg.sampling == "sigma":
        return sample_sigma_mode(cfg, batch_size, gen)
    if uniform is not None:
        uniform = torch.as_tensor(uniform, dtype=torch.float32).reshape(-1)
        if uniform.numel() != batch_size:
            raise ValueError(f"got {uniform.numel()} stratified timesteps for a batch of {batch_size}")
    t = sample_t(cfg, batch_size, gen, image_seq_len, uniform)
    return TimestepSample(sigmas=t, timesteps=t * NUM_TRAIN_TIMESTEPS + 1)


# ---- noisy input, target, loss weighting -------------------------------------------------------


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


def noisy_model_input(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """(1 - t) * latents + t * noise, t broadcast per sample (float32 t promotes low-precision latents)."""
    t = _per_sample(sigmas.to(latents.device), latents.ndim)
    return (1 - t) * latents + t * noise


def flow_matching_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the model learns: noise - latents."""
    return noise - latents


def sigmas_for_timesteps(timesteps: torch.Tensor) -> torch.Tensor:
    """Sigma of the nearest table entry (first on ties), as the reference looks weights up."""
    sigmas, table = sigma_table()
    t = timesteps.detach().to("cpu", torch.float32).reshape(-1)
    index = torch.argmin((table[None, :] - t[:, None]).abs(), dim=1)
    return sigmas[index]


def compute_loss_weighting(weighting_scheme: str, timesteps: torch.Tensor, ndim: int = 1) -> torch.Tensor:
    """Per-sample loss weights from the MODEL timesteps, shaped (B, 1, ...) with `ndim` dims: sigma_sqrt = sigma^-2,
    cosmap = 2 / (pi * (1 - 2s + 2s^2)), anything else 1. Computed in float32 on the CPU."""
    n = timesteps.reshape(-1).shape[0]
    if weighting_scheme == "sigma_sqrt":
        weights = sigmas_for_timesteps(timesteps) ** -2.0
    elif weighting_scheme == "cosmap":
        s = sigmas_for_timesteps(timesteps)
        weights = 2 / (math.pi * (1 - 2 * s + 2 * s**2))
    else:
        weights = torch.ones((n,))
    return _per_sample(weights, ndim)


def sample_noisy_input(
    args: argparse.Namespace,
    latents: torch.Tensor,
    noise: torch.Tensor,
    gen: torch.Generator,
    image_seq_len: int | None = None,
    uniform: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training draw from the flags: (noisy input, model timesteps (B,), noise coefficients (B,)),
    timesteps and coefficients on the latents' device."""
    sample = sample_timesteps(TimestepConfig.from_args(args), latents.shape[0], gen, image_seq_len, uniform)
    return noisy_input_from_sample(latents, noise, sample)


def noisy_input_from_sample(latents: torch.Tensor, noise: torch.Tensor,
                            sample: TimestepSample) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy input, model timesteps, noise coefficients) for a drawn sample, on the latents' device."""
    sigmas = sample.sigmas.to(latents.device)
    return noisy_model_input(latents, noise, sigmas), sample.timesteps.to(latents.device), sigmas


# ---- --num_timestep_buckets ---------------------------------------------------------------------


def stratified_timestep_pool(num_buckets: int, num_batches: int, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """(num_batches, batch_size) uniforms for one epoch: [0, 1) cut into `num_buckets` equal strata,
    each filled equally (ceil), shuffled, trimmed. Feed row i to batch i as `uniform`."""
    needed = num_batches * batch_size
    per_bucket = math.ceil(needed / num_buckets)
    offsets = torch.rand((num_buckets, per_bucket), generator=gen)
    values = ((torch.arange(num_buckets, dtype=torch.float32)[:, None] + offsets) / num_buckets).reshape(-1)
    values = values[torch.randperm(values.numel(), generator=gen)][:needed]
    return values.reshape(num_batches, batch_size)


# ---- --show_timesteps console -------------------------------------------------------------------


def timestep_histogram(
    cfg: TimestepConfig,
    gen: torch.Generator,
    image_seq_len: int | None = 4096,
    num_samples: int = 100_000,
    num_buckets: int | None = None,
    width: int = 64,
    bins_per_line: int = 25,
) -> str:
    """Text histogram of sampled timesteps (0..999, `bins_per_line` per row) and of the loss weights.

    image_seq_len defaults to a 1024x1024 image (64x64 tokens), like the reference's preview.
    """
    counts = torch.zeros(NUM_TRAIN_TIMESTEPS)
    chunk = 1000
    for start in range(0, num_samples, chunk):
        n = min(chunk, num_samples - start)
        uniform = stratified_timestep_pool(num_buckets, 1, n, gen)[0] if num_buckets and num_buckets > 1 else None
        sigmas = sample_timesteps(cfg, n, gen, image_seq_len, uniform).sigmas
        bins = (sigmas * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
        counts += torch.bincount(bins, minlength=NUM_TRAIN_TIMESTEPS).float()
    weights = compute_loss_weighting(cfg.weighting_scheme, torch.arange(1, NUM_TRAIN_TIMESTEPS + 1).float(), 1)
    weights = torch.where(torch.isinf(weights), torch.ones_like(weights), weights)
    lines = _bar_lines("Sampled timesteps", "max count", counts, width, bins_per_line, show_value=False)
    lines += _bar_lines("Sampled loss weighting", "max weighting", weights, width, bins_per_line, show_value=True)
    return "\n".join(lines)


def _bar_lines(title: str, label: str, values: torch.Tensor, width: int, per_line: int, show_value: bool) -> list[str]:
    means = values.reshape(-1, per_line).mean(dim=1).tolist()
    top = max(means) or 1.0
    lines = [f"{title}: {label}={max(means):g}"]
    for i, value in enumerate(means):
        head = f"{i * per_line:4d}-{(i + 1) * per_line - 1:4d}: " + (f"{value:8.2f} " if show_value else "")
        lines.append(head + "#" * int(value / top * width))
    return lines


def print_timestep_histogram(cfg: TimestepConfig, gen: torch.Generator, image_seq_len: int | None = 4096, **kw) -> None:
    """`--show_timesteps console`: print the histogram (the caller then exits)."""
    print(timestep_histogram(cfg, gen, image_seq_len, **kw))
