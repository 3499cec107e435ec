"""HunyuanVideoArchitecture: predict against a hand-driven diffusers forward, SkyReels I2V conditioning, the
guidance the reference feeds when training and generating, video to video, flags checked before models load."""

from __future__ import annotations

import argparse

import pytest
import torch

from musubi_tuner.architectures import get_architecture
from musubi_tuner.architectures.hunyuan_video.tiny import tiny_hv_dit
from musubi_tuner.errors import UserError
from musubi_tuner.inference.generate_cli import add_generation_arguments
from musubi_tuner.inference.schedulers import make_flow_scheduler
from musubi_tuner.inference.video_to_video import noised_source, steps_for_strength

ARCH = get_architecture("hunyuan_video")


def _batch(b: int = 1, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, 256, dtype=torch.int64)
    mask[:, :7] = 1
    return {"llm": torch.randn(b, 256, 32, generator=g), "llm_mask": mask, "clipL": torch.randn(b, 32, generator=g)}


def _by_hand(dit, hidden, t, batch, guidance):
    with torch.no_grad():
        return dit(hidden_states=hidden, timestep=t, encoder_hidden_states=batch["llm"],
                   encoder_attention_mask=batch["llm_mask"], pooled_projections=batch["clipL"],
                   guidance=guidance, return_dict=False)[0]


def test_predict_equals_the_diffusers_forward_with_guidance_x1000():
    dit = tiny_hv_dit(seed=1).float()
    x = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([637.5])
    batch = {**_batch(), "guidance": torch.tensor([6.0])}
    with torch.no_grad():
        got = ARCH.predict(dit, batch, x, t)
    assert torch.equal(got, _by_hand(dit, x, t, batch, torch.tensor([6000.0])))
    # without a request's guidance (training-side callers): the reference trainer's default, 1.0 as is
    with torch.no_grad():
        assert torch.equal(ARCH.predict(dit, _batch(), x, t), _by_hand(dit, x, t, _batch(), torch.tensor([1.0])))
    # a different guidance must change the output (the embedder is really driven)
    with torch.no_grad():
        assert not torch.allclose(ARCH.predict(dit, {**_batch(), "guidance": torch.tensor([1.0])}, x, t), got)


def test_training_feeds_guidance_scale_as_is_like_the_reference():
    dit = tiny_hv_dit(seed=1).float()
    args = argparse.Namespace(guidance_scale=1.0)
    extras = ARCH.training_conditioning(args)
    x, t = torch.randn(2, 16, 1, 4, 4), torch.tensor([100.0, 900.0])
    batch = {**_batch(2), **extras}
    with torch.no_grad():
        got = ARCH.predict(dit, batch, x, t)
    assert torch.equal(got, _by_hand(dit, x, t, batch, torch.tensor([1.0, 1.0])))


def test_the_text_mask_limits_attention_to_the_prompt_tokens():
    dit = tiny_hv_dit(seed=1).float()
    x, t = torch.randn(1, 16, 1, 4, 4), torch.tensor([500.0])
    a, b = _batch(), _batch()
    b["llm"][:, 7:] += 5.0  # padding positions differ only
    with torch.no_grad():
        assert torch.allclose(ARCH.predict(dit, a, x, t), ARCH.predict(dit, b, x, t), atol=1e-6)


def test_skyreels_i2v_concatenates_image_latents_and_trains_on_each_clips_first_frame():
    dit = tiny_hv_dit(seed=2, in_channels=32).float()
    x, t = torch.randn(1, 16, 3, 4, 4), torch.tensor([400.0])
    cached = torch.randn(1, 16, 3, 4, 4)
    batch = {**_batch(), "latents": cached, "guidance_input": torch.tensor([1.0])}
    condition = torch.zeros_like(cached)
    condition[:, :, :1] = cached[:, :, :1] * 0.476986  # scaled like the training target
    with torch.no_grad():
        got = ARCH.predict(dit, batch, x, t)
        expected = _by_hand(dit, torch.cat([x, condition], dim=1), t, batch, torch.tensor([1.0]))
    assert got.shape == x.shape and torch.equal(got, expected)
    with pytest.raises(UserError, match="--image_path"):
        ARCH.predict(dit, _batch(), x, t)


def test_video_to_video_starts_where_the_strength_says():
    assert steps_for_strength(50, 0.8) == 40 and steps_for_strength(10, 0.25) == 2
    with pytest.raises(UserError, match="--strength"):
        steps_for_strength(10, 0.05)
    with pytest.raises(UserError, match="--strength"):
        steps_for_strength(10, 1.5)
    scheduler = make_flow_scheduler("vanilla", 7.0)
    timesteps = scheduler.set_timesteps(10)
    noise, source = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 16, 2, 4, 4)
    latents, start = noised_source(scheduler, 10, 0.8, noise, source)
    assert start == 2  # 8 of 10 steps run, from the 3rd timestep (timesteps[-8])
    t = float(timesteps[-8]) / 1000
    assert torch.allclose(latents, noise * t + source * (1 - t))


def _generate_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_generation_arguments(parser)
    ARCH.add_arguments(parser, "generate")
    args = parser.parse_args(list(argv))
    ARCH.validate_arguments(args, "generate")
    return args


@pytest.mark.parametrize("argv, message", [
    (["--video_length", "10"], "4N\\+1"),
    (["--video_size", "100", "64"], "multiples of 16"),
    (["--dit_in_channels", "24"], "--dit_in_channels 24"),
    (["--image_path", "x.png", "--dit_in_channels", "16"], "SkyReels"),
    (["--image_path", "missing.png"], "missing.png"),
    (["--dit_in_channels", "32", "--prompt", "p"], "--image_path"),
    (["--video_path", "missing.mp4"], "missing.mp4"),
    (["--vae_chunk_size", "0"], "--vae_chunk_size"),
    (["--dit_dtype", "half-ish"], "--dit_dtype"),
])
def test_bad_generation_flags_fail_before_any_model_loads(argv, message):
    with pytest.raises(UserError, match=message):
        _generate_args(*argv)


def test_generation_defaults_are_the_reference_ones_and_exclude_single_blocks_filters_loras():
    d = ARCH.generation_defaults
    assert (d.width, d.height, d.frames, d.fps, d.infer_steps) == (256, 256, 129, 24.0, 50)
    assert (d.guidance_scale, d.embedded_guidance, d.flow_shift, d.sample_solver) == (1.0, 6.0, 7.0, "vanilla")
    args = _generate_args("--exclude_single_blocks", "--prompt", "p")
    assert args.strength == 0.8
    from musubi_tuner.inference.lora_merge import filter_lora_modules

    sd = {"lora_unet_single_blocks_0_linear1.lora_down.weight": 1, "lora_unet_double_blocks_0_img_attn_qkv.alpha": 2,
          "diffusion_model.single_blocks.1.linear2.lora_A.weight": 3}
    assert filter_lora_modules(sd, None, args.exclude_patterns) == {"lora_unet_double_blocks_0_img_attn_qkv.alpha": 2}
