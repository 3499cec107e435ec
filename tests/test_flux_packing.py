"""FLUX token layout: packing, ids, Kontext preferred resolutions, resolution-dependent shift."""

import math

import pytest
import torch
from diffusers.pipelines.flux import pipeline_flux_kontext as kontext

from musubi_tuner.architectures.flux_kontext.packing import (
    PREFERRED_KONTEXT_RESOLUTIONS,
    flux_shift_sigmas,
    flux_time_shift_mu,
    nearest_preferred_resolution,
    pack_latents,
    prepare_image_ids,
    prepare_text_ids,
    unpack_latents,
)


def test_pack_matches_diffusers_and_round_trips():
    latents = torch.randn(2, 16, 6, 10)
    packed = pack_latents(latents)
    assert packed.shape == (2, 15, 64)
    assert torch.equal(packed, kontext.FluxKontextPipeline._pack_latents(latents, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), latents)
    # one token = channel-major 2x2 patch
    assert torch.equal(packed[0, 0, :4], latents[0, 0, :2, :2].reshape(4))


def test_pack_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 16, 5, 4))


def test_image_ids_match_pipeline_and_control_index():
    ids = prepare_image_ids(3, 5)
    assert torch.equal(ids, kontext.FluxKontextPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32))
    control = prepare_image_ids(3, 5, index=1)
    assert torch.equal(control[:, 0], torch.ones(15)) and torch.equal(control[:, 1:], ids[:, 1:])
    assert control[7].tolist() == [1.0, 1.0, 2.0]  # token 7 = row 1, col 2
    assert torch.equal(prepare_text_ids(4), torch.zeros(4, 3))


def test_preferred_resolutions_are_the_bfl_list():
    assert list(PREFERRED_KONTEXT_RESOLUTIONS) == kontext.PREFERRED_KONTEXT_RESOLUTIONS
    assert len(PREFERRED_KONTEXT_RESOLUTIONS) == 17


@pytest.mark.parametrize(
    "size, expected",
    [
        ((1024, 1024), (1024, 1024)),
        ((512, 512), (1024, 1024)),
        ((1920, 1080), (1392, 752)),
        ((1080, 1920), (752, 1392)),
        ((100, 1000), (672, 1568)),
    ],
)
def test_nearest_preferred_resolution(size, expected):
    assert nearest_preferred_resolution(*size) == expected


def test_time_shift_mu_matches_diffusers_calculate_shift():
    assert flux_time_shift_mu(256) == pytest.approx(0.5)
    assert flux_time_shift_mu(4096) == pytest.approx(1.15)
    for n in (1024, 3600, 8192):
        assert flux_time_shift_mu(n) == pytest.approx(kontext.calculate_shift(n))


def test_shift_sigmas():
    t = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(flux_shift_sigmas(t, 0.0), t)
    mu = 1.15
    expected = torch.tensor([math.exp(mu) / (math.exp(mu) + (1 / x - 1)) for x in t.tolist()], dtype=torch.float64)
    assert torch.allclose(flux_shift_sigmas(t, mu), expected)
