"""FramePack one-frame inference layouts (docs/framepack_1f.md of the reference) and MagCache's skip rule."""

import numpy as np
import pytest
import torch
from fp_gen_fixtures import section_image, text_condition

from musubi_tuner.architectures.framepack import one_frame
from musubi_tuner.architectures.framepack.magcache import MagCache, parse_mag_ratios, resample_ratios
from musubi_tuner.architectures.framepack.packed_forward import packed_forward
from musubi_tuner.architectures.framepack.sampling import SamplerSettings
from musubi_tuner.architectures.framepack.tiny import tiny_framepack_dit
from musubi_tuner.errors import UserError


@pytest.fixture(scope="module")
def dit():
    return tiny_framepack_dit()


def test_parse_one_frame_options():
    opts = one_frame.parse_one_frame_options("no_2x, no_4x,target_index=1,control_index=0;10,no_post")
    assert (opts.no_2x, opts.no_4x, opts.no_post, opts.target_index, opts.control_indices) == \
        (True, True, True, 1, (0, 10))
    assert one_frame.parse_one_frame_options("default") == one_frame.OneFrameOptions()
    with pytest.raises(UserError, match="unknown option 'no_8x'"):
        one_frame.parse_one_frame_options("no_8x")
    with pytest.raises(UserError, match="target_index='a'"):
        one_frame.parse_one_frame_options("target_index=a")


def test_default_layout_one_control_image():
    control = torch.ones(1, 16, 1, 2, 2)
    inputs = one_frame.one_frame_inputs(one_frame.OneFrameOptions(), [control], [], 9, 2, 2)
    assert inputs.latent_indices.tolist() == [9]
    assert inputs.clean_latent_indices.tolist() == [0, 10]  # control at 0, zero post latent at window + 1
    assert torch.equal(inputs.latents_clean[:, :, 0], control[:, :, 0])
    assert not inputs.latents_clean[:, :, 1].any()
    assert inputs.clean_latent_2x_indices.tolist() == [11, 12]
    assert inputs.clean_latent_4x_indices.tolist() == list(range(13, 29))


def test_kisekaeichi_layout_and_masks():
    # the reference's kisekaeichi example: two controls at 0 and 10, the target at 1, no post latent, no 2x/4x
    opts = one_frame.parse_one_frame_options("target_index=1,control_index=0;10,no_post,no_2x,no_4x")
    controls = [torch.ones(1, 16, 1, 2, 2), 2 * torch.ones(1, 16, 1, 2, 2)]
    mask = one_frame.latent_mask(np.array([[255, 0], [0, 255]], dtype=np.uint8), 2, 2)
    inputs = one_frame.one_frame_inputs(opts, controls, [None, mask], 9, 2, 2)
    assert inputs.clean_latent_indices.tolist() == [0, 10]
    assert inputs.latent_indices.tolist() == [1]
    assert inputs.latents_clean_2x is None and inputs.latents_clean_4x is None
    assert inputs.latents_clean[0, 0, 1].tolist() == [[2.0, 0.0], [0.0, 2.0]]
    assert inputs.latents_clean[0, 0, 0].tolist() == [[1.0, 1.0], [1.0, 1.0]]


def test_one_frame_samples_without_history(dit):
    opts = one_frame.parse_one_frame_options("no_2x,no_4x")
    inputs = one_frame.one_frame_inputs(opts, [section_image(1).latent], [], 9, 4, 4)
    settings = SamplerSettings(steps=2, dtype=torch.float32, progress=False)
    out = one_frame.sample_one_frame(dit, inputs, text_condition(1), text_condition(2), section_image(1), settings,
                                     torch.Generator().manual_seed(0), 32, 32)
    assert out.shape == (1, 16, 1, 4, 4) and torch.isfinite(out).all()


def test_mag_ratio_parsing_and_resampling():
    assert parse_mag_ratios("0") is None
    assert parse_mag_ratios("1.0,1.1") == (1.0, 1.1)
    with pytest.raises(UserError, match="--magcache_mag_ratios"):
        parse_mag_ratios("1.0,x")
    assert resample_ratios((1, 2, 3, 4, 5), 3).tolist() == [1, 3, 5]
    assert resample_ratios((1, 2, 3, 4, 5), 1).tolist() == [5]
    assert resample_ratios((1, 2, 3, 4, 5), 4).tolist() == [1, 2, 4, 5]  # round(0, 1.33, 2.67, 4)


def _call(dit, x, t=500.0):
    cond = text_condition(3)
    image = section_image(4)
    return lambda: packed_forward(dit, hidden_states=x, timestep=torch.tensor([t]),
                                  encoder_hidden_states=cond.llama_vec, encoder_attention_mask=cond.llama_attention_mask,
                                  pooled_projections=cond.clip_l_pooler, image_embeddings=image.image_embeddings,
                                  latent_indices=torch.arange(1), latents_clean=image.latent,
                                  clean_latent_indices=torch.tensor([0]), guidance=torch.tensor([10000.0]))


def _count_block_runs(dit):
    runs = []
    handle = dit.transformer_blocks[0].register_forward_pre_hook(lambda *a: runs.append(1))
    return runs, handle


def test_skip_rule_counts_as_the_reference(dit):
    # ratios all 1: the error never grows, so after the retained 2 of 10 steps up to K=6 calls in a row are skipped,
    # the 7th runs (and resets), and the last step always runs: 4 of 10 run
    cache = MagCache(mag_ratios=(1.0,) * 10, retention_ratio=0.2, threshold=0.24, k=6)
    cache.start(10)
    runs, handle = _count_block_runs(dit)
    x = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            for _ in range(10):
                cache.run(dit, "positive", _call(dit, x))
    finally:
        handle.remove()
    assert cache.skipped == 6 and len(runs) == 4
    assert len(dit.transformer_blocks) == 2  # the block lists are put back


def test_a_skipped_call_reuses_the_residual_exactly(dit):
    x = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    cache = MagCache(mag_ratios=(1.0, 1.0, 1.0), retention_ratio=0.0)
    cache.start(3)
    with torch.no_grad():
        full = cache.run(dit, "positive", _call(dit, x))
        skipped = cache.run(dit, "positive", _call(dit, x))  # same input: the cached residual is the true one
    assert cache.skipped == 1
    assert torch.allclose(full, skipped, atol=1e-5)
    high_error = MagCache(mag_ratios=(1.0, 2.0, 2.0), retention_ratio=0.0)
    high_error.start(3)
    with torch.no_grad():
        high_error.run(dit, "positive", _call(dit, x))
        high_error.run(dit, "positive", _call(dit, x))
    assert high_error.skipped == 0  # |1 - 2| > 0.24


def test_calibration_records_norm_ratios(dit):
    x = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    cache = MagCache(calibrate=True)
    cache.start(3)
    with torch.no_grad():
        for _ in range(3):
            cache.run(dit, "positive", _call(dit, x))
    ratios = cache.finish()
    assert cache.skipped == 0
    assert ratios == [[1.0, pytest.approx(1.0, abs=1e-4), pytest.approx(1.0, abs=1e-4)]]
