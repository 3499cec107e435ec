"""Timestep samplers, noisy input and loss weighting against the formulas, re-derived here."""

import argparse
import math

import pytest
import torch

from musubi_tuner.training import timesteps as T
from musubi_tuner.training.args import add_common_training_arguments


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def shifted(t, s):
    return s * t / (1 + (s - 1) * t)


def test_config_from_parser_defaults():
    args = add_common_training_arguments(argparse.ArgumentParser()).parse_args([])
    cfg = T.TimestepConfig.from_args(args)
    assert cfg == T.TimestepConfig()
    assert cfg.timestep_range == (0, 1000)


def test_uniform_and_model_timesteps():
    out = T.sample_timesteps(T.TimestepConfig(sampling="uniform"), 16, gen(1))
    u = torch.rand((16,), generator=gen(1))
    assert torch.equal(out.sigmas, u)
    assert torch.equal(out.timesteps, u * 1000 + 1)
    assert out.timesteps.min() >= 1 and out.timesteps.max() <= 1001


def test_sigmoid():
    cfg = T.TimestepConfig(sampling="sigmoid", sigmoid_scale=2.5)
    out = T.sample_timesteps(cfg, 32, gen(2)).sigmas
    assert torch.equal(out, torch.sigmoid(2.5 * torch.randn((32,), generator=gen(2))))


def test_shift():
    cfg = T.TimestepConfig(sampling="shift", discrete_flow_shift=3.0, sigmoid_scale=1.5)
    out = T.sample_timesteps(cfg, 32, gen(3)).sigmas
    t = torch.sigmoid(torch.randn((32,), generator=gen(3)) * 1.5)
    assert torch.equal(out, shifted(t, 3.0))
    assert out.mean() > t.mean()  # shift > 1 moves mass towards noise


@pytest.mark.parametrize(
    "mode,seq,mu",
    [
        ("flux_shift", 256, 0.5),
        ("flux_shift", 4096, 1.15),
        ("flux_shift", 1024, 0.5 + 0.65 * (1024 - 256) / 3840),
        ("qwen_shift", 8192, 0.9),
        ("qwen_shift", 4096, 0.5 + 0.4 * (4096 - 256) / 7936),
    ],
)
def test_resolution_shifts(mode, seq, mu):
    assert T.resolution_shift(mode, seq) == pytest.approx(math.exp(mu), rel=1e-12)
    out = T.sample_timesteps(T.TimestepConfig(sampling=mode), 64, gen(4), image_seq_len=seq).sigmas
    expected = shifted(torch.sigmoid(torch.randn((64,), generator=gen(4))), math.exp(mu))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)


def test_shift_mode_needs_sequence_length():
    with pytest.raises(ValueError, match="image_seq_len"):
        T.sample_timesteps(T.TimestepConfig(sampling="flux_shift"), 2, gen())


def test_logsnr():
    cfg = T.TimestepConfig(sampling="logsnr", logit_mean=-6.0, logit_std=2.0)
    out = T.sample_timesteps(cfg, 64, gen(5)).sigmas
    assert torch.equal(out, torch.sigmoid(-torch.normal(-6.0, 2.0, size=(64,), generator=gen(5)) / 2))


def _qinglong_expected(mode, n, seed, seq, cfg):
    g = gen(seed)
    decide = torch.rand((n,), generator=g)
    flux = mode == "qinglong_flux"
    mid = decide < (0.79 if flux else 0.95)
    mid_logsnr = (decide >= 0.79) & (decide < 0.9) if flux else torch.zeros(n, dtype=torch.bool)
    tail = decide >= (0.9 if flux else 0.95)
    t = torch.zeros(n)
    mu = 0.5 + 0.65 * (seq - 256) / 3840 if flux else 0.5 + 0.4 * (seq - 256) / 7936
    t[mid] = shifted(torch.sigmoid(torch.randn((int(mid.sum()),), generator=g) * cfg.sigmoid_scale), math.exp(mu))
    if mid_logsnr.any():
        z = torch.normal(cfg.logit_mean, cfg.logit_std, size=(int(mid_logsnr.sum()),), generator=g)
        t[mid_logsnr] = torch.sigmoid(-z / 2)
    t[tail] = torch.sigmoid(-torch.normal(5.36, 1.0, size=(int(tail.sum()),), generator=g) / 2)
    return t, mid, mid_logsnr, tail


@pytest.mark.parametrize("mode", ["qinglong_flux", "qinglong_qwen"])
def test_qinglong(mode):
    cfg = T.TimestepConfig(sampling=mode, logit_mean=-1.0, logit_std=1.5)
    out = T.sample_timesteps(cfg, 4000, gen(6), image_seq_len=2048).sigmas
    expected, mid, mid_logsnr, tail = _qinglong_expected(mode, 4000, 6, 2048, cfg)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)
    share = mid.float().mean().item()
    assert share == pytest.approx(0.79 if mode == "qinglong_flux" else 0.95, abs=0.03)
    assert bool(mid_logsnr.any()) == (mode == "qinglong_flux")


def test_sigma_mode_uses_linear_table():
    out = T.sample_timesteps(T.TimestepConfig(sampling="sigma"), 64, gen(7))
    u = torch.rand((64,), generator=gen(7))
    index = (u * 1000).long()
    assert torch.equal(out.sigmas, torch.linspace(1, 0, 1001)[index])
    # timestep = sigma * 1000 (no +1, no shift), from the same table
    torch.testing.assert_close(out.timesteps, out.sigmas * 1000)
    assert out.timesteps.min() >= 1 and out.timesteps.max() <= 1000


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "none"])
def test_sigma_mode_densities_and_range(scheme):
    cfg = T.TimestepConfig(sampling="sigma", weighting_scheme=scheme, logit_mean=0.3, logit_std=0.7, min_timestep=100, max_timestep=400)
    out = T.sample_timesteps(cfg, 256, gen(8))
    g = gen(8)
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.normal(0.3, 0.7, size=(256,), generator=g))
    else:
        u = torch.rand((256,), generator=g)
        if scheme == "mode":
            u = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    index = (u * 300 + 100).long()
    assert torch.equal(out.sigmas, torch.linspace(1, 0, 1001)[index])
    # index 100..399 -> timesteps 900..601
    assert out.timesteps.min() > 600 and out.timesteps.max() <= 900


def test_range_scaling_maps_linearly():
    cfg = T.TimestepConfig(sampling="uniform", min_timestep=200, max_timestep=500)
    out = T.sample_timesteps(cfg, 128, gen(9))
    assert torch.equal(out.sigmas, torch.rand((128,), generator=gen(9)) * (0.5 - 0.2) + 0.2)
    assert out.timesteps.min() >= 201 and out.timesteps.max() <= 501


def test_preserve_distribution_shape_rejects_out_of_range():
    cfg = T.TimestepConfig(sampling="shift", discrete_flow_shift=3.0, min_timestep=100, max_timestep=300, preserve_distribution_shape=True)
    out = T.sample_timesteps(cfg, 50, gen(10)).sigmas
    assert out.shape == (50,)
    assert out.min() >= 0.1 and out.max() <= 0.3
    # re-derive: draw batches of 50, keep in-range values in order
    g, kept = gen(10), []
    while len(kept) < 50:
        t = shifted(torch.sigmoid(torch.randn((50,), generator=g)), 3.0)
        kept += [v for v in t.tolist() if 0.1 <= v <= 0.3][: 50 - len(kept)]
    assert out.tolist() == pytest.approx(kept, abs=0)


def test_preserve_shape_keeps_shape_where_scaling_distorts():
    base = dict(sampling="uniform", min_timestep=400, max_timestep=600)
    kept = T.sample_timesteps(T.TimestepConfig(**base, preserve_distribution_shape=True), 20000, gen(11)).sigmas
    # Uniform stays uniform inside the window: a quarter of it lands in its first quarter.
    assert ((kept < 0.45).float().mean().item()) == pytest.approx(0.25, abs=0.02)
    sig = dict(sampling="sigmoid", sigmoid_scale=4.0, min_timestep=0, max_timestep=500)
    scaled = T.sample_timesteps(T.TimestepConfig(**sig), 20000, gen(12)).sigmas
    rejected = T.sample_timesteps(T.TimestepConfig(**sig, preserve_distribution_shape=True), 20000, gen(12)).sigmas
    # sigmoid(4z) piles up near 0 and 1. Restricted to [0, .5] little is left near .5; squeezed onto
    # [0, .5] the mass from near 1 lands there.
    assert (scaled > 0.4).float().mean() > 2 * (rejected > 0.4).float().mean()
    assert rejected.max() <= 0.5


def test_stratified_uniforms_replace_first_draw():
    u = torch.tensor([0.1, 0.5, 0.9, 0.25])
    out = T.sample_timesteps(T.TimestepConfig(sampling="uniform"), 4, gen(), uniform=u)
    assert torch.equal(out.sigmas, u)
    out = T.sample_timesteps(T.TimestepConfig(sampling="sigmoid"), 4, gen(), uniform=u).sigmas
    torch.testing.assert_close(out, torch.sigmoid(torch.special.ndtri(u)), rtol=1e-5, atol=1e-6)
    out = T.sample_timesteps(T.TimestepConfig(sampling="logsnr", logit_mean=-2.0, logit_std=3.0), 4, gen(), uniform=u).sigmas
    torch.testing.assert_close(out, torch.sigmoid(-(-2.0 + 3.0 * torch.special.ndtri(u)) / 2), rtol=1e-5, atol=1e-6)


def test_stratified_pool_fills_every_stratum():
    pool = T.stratified_timestep_pool(num_buckets=5, num_batches=8, batch_size=5, gen=gen(13))
    assert pool.shape == (8, 5)
    assert torch.bincount((pool.reshape(-1) * 5).long(), minlength=5).tolist() == [8] * 5
    again = T.stratified_timestep_pool(5, 8, 5, gen(13))
    assert torch.equal(pool, again)


def test_noisy_input_and_target():
    latents = torch.randn(3, 4, 2, 5, 5)
    noise = torch.randn(3, 4, 2, 5, 5)
    sigmas = torch.tensor([0.0, 0.25, 1.0])
    noisy = T.noisy_model_input(latents, noise, sigmas)
    assert torch.equal(noisy[0], latents[0])
    assert torch.equal(noisy[2], noise[2])
    assert torch.equal(noisy[1], 0.75 * latents[1] + 0.25 * noise[1])
    assert torch.equal(T.flow_matching_target(latents, noise), noise - latents)
    image = T.noisy_model_input(latents[:, :, 0], noise[:, :, 0], sigmas)
    assert image.shape == (3, 4, 5, 5)


def test_loss_weighting_values():
    ts = torch.tensor([1000.0, 500.0, 1.0, 500.4, 500.5])
    sqrt = T.compute_loss_weighting("sigma_sqrt", ts, 4)
    assert sqrt.shape == (5, 1, 1, 1)
    sig = torch.linspace(1, 0, 1001)
    # nearest table entry; on a tie the first (larger) timestep wins
    expected_sigma = sig[torch.tensor([0, 500, 999, 500, 499])]
    assert torch.equal(sqrt.reshape(-1), expected_sigma**-2.0)
    assert sqrt[1].item() == pytest.approx(4.0)
    cos = T.compute_loss_weighting("cosmap", ts, 5).reshape(-1)
    assert cos[1].item() == pytest.approx(4 / math.pi, rel=1e-6)
    assert torch.equal(cos, 2 / (math.pi * (1 - 2 * expected_sigma + 2 * expected_sigma**2)))
    for scheme in ("none", "logit_normal", "mode"):
        assert torch.equal(T.compute_loss_weighting(scheme, ts, 3), torch.ones(5, 1, 1))


def test_console_histogram():
    text = T.timestep_histogram(T.TimestepConfig(sampling="uniform", min_timestep=500), gen(14), num_samples=4000)
    lines = text.splitlines()
    assert lines[0].startswith("Sampled timesteps")
    assert len(lines) == 2 + 2 * 40
    bars = [line.split(": ", 1)[1] for line in lines[1:41]]
    assert all("#" not in b for b in bars[:20])  # nothing below 500
    assert all(b.count("#") > 40 for b in bars[20:])
    weights = T.timestep_histogram(T.TimestepConfig(weighting_scheme="cosmap"), gen(), num_samples=1000)
    assert "Sampled loss weighting: max weighting=" in weights


def test_sample_noisy_input_from_flags():
    args = add_common_training_arguments(argparse.ArgumentParser()).parse_args(["--timestep_sampling", "uniform"])
    latents, noise = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    noisy, timesteps, sigmas = T.sample_noisy_input(args, latents, noise, gen(15))
    u = torch.rand((4,), generator=gen(15))
    assert torch.equal(sigmas, u) and torch.equal(timesteps, u * 1000 + 1)
    assert torch.equal(noisy, T.noisy_model_input(latents, noise, u))
    assert T.compute_loss_weighting("sigma_sqrt", timesteps).shape == (4,)
