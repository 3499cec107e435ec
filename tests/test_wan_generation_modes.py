"""Wan generation modes on the tiny preset: CFG skipping, skip-layer guidance (block skipping checked with hooks),
video to video and --ckpt_dir, each against a hand-written expectation; then through wan_generate_video.py."""

from __future__ import annotations

import argparse
import shutil

import pytest
import torch
from safetensors.torch import load_file

from musubi_tuner import wan_generate_video
from musubi_tuner.architectures import get_architecture
from musubi_tuner.architectures.wan.architecture import WanArchitecture, WanLatentEncoders
from musubi_tuner.architectures.wan.ckpt_dir import fill_from_ckpt_dir
from musubi_tuner.architectures.wan.tiny import TINY_TEXT_DIM, make_tiny_dit, make_tiny_vae
from musubi_tuner.errors import UserError
from musubi_tuner.inference.denoise import denoise, initial_noise
from musubi_tuner.inference.generate import RenderSettings, render
from musubi_tuner.inference.guidance import GuidanceOptions, GuidancePlan, SkipLayerGuidance, step_velocity
from musubi_tuner.inference.prompts import PromptSpec
from musubi_tuner.inference.schedulers import make_flow_scheduler
from wan_fixtures import make_workspace, run

WAN = get_architecture("wan")
SHAPE = (1, 16, 2, 4, 4)  # 5 frames of 32x32


@pytest.fixture(scope="module")
def dit():
    return make_tiny_dit("t2v-1.3B")


def _conditions(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cond = {"t5": [torch.randn(7, TINY_TEXT_DIM, generator=g)]}
    uncond = {"t5": [torch.randn(5, TINY_TEXT_DIM, generator=g)]}
    return cond, uncond


def _predict(dit):
    return lambda x, t, c: WAN.predict(dit, c, x, t)


def test_skipped_blocks_pass_their_input_through_and_only_those(dit):
    captured = {}

    def hook(index):
        def record(module, args, kwargs, output):
            captured[index] = (args, kwargs, output)
        return record

    handles = [block.register_forward_hook(hook(i), with_kwargs=True) for i, block in enumerate(dit.blocks)]
    x, t = torch.randn(SHAPE), torch.tensor([500.0])
    cond, _ = _conditions()
    try:
        with torch.no_grad():
            plain = WAN.predict(dit, cond, x, t)
            plain_out = {i: out for i, (_, _, out) in captured.items()}
            with WAN.block_skipper(dit)([1]):
                skipped = WAN.predict(dit, cond, x, t)
            skip_io = dict(captured)
            again = WAN.predict(dit, cond, x, t)
    finally:
        for handle in handles:
            handle.remove()
    args0, _, out0 = skip_io[0]
    args1, _, out1 = skip_io[1]
    assert torch.equal(out0, plain_out[0])  # block 0 runs as before
    assert torch.equal(out1, args1[0]) and not torch.equal(out1, plain_out[1])  # block 1 passes its input through
    assert not torch.equal(skipped, plain)
    assert torch.equal(again, plain)  # leaving the context restores the block
    with pytest.raises(UserError, match="--slg_layers 2"):
        with WAN.block_skipper(dit)([2]):
            pass


@pytest.mark.parametrize("mode", ["original", "uncond"])
def test_slg_prediction_is_the_reference_formula_on_the_tiny_dit(dit, mode):
    x, t = torch.randn(SHAPE), torch.tensor([700.0])
    cond, uncond = _conditions()
    predict = _predict(dit)
    skipper = WAN.block_skipper(dit)
    with torch.no_grad():
        c, u = predict(x, t, cond), predict(x, t, uncond)
        with skipper([0]):
            s = predict(x, t, uncond)
        options = GuidanceOptions(slg=SkipLayerGuidance(layers=(0,), scale=2.5, end=1.0, mode=mode))
        got = step_velocity(lambda conditioning: predict(x, t, conditioning), cond, uncond, 4.0,
                            GuidancePlan.for_steps(options, 1), 0, skipper)
    if mode == "original":  # SD3.5: CFG, plus slg_scale * (cond - skip-layer uncond)
        expected = u + 4.0 * (c - u) + 2.5 * (c - s)
    else:  # Wan2GP: the skip-layer prediction is the negative one
        expected = s + 4.0 * (c - s)
    assert torch.equal(got, expected)


def test_cfg_skip_steps_are_unguided_euler_steps_on_the_tiny_dit(dit):
    cond, uncond = _conditions(1)
    predict = _predict(dit)
    noise = initial_noise(SHAPE, 3, "cpu")
    options = GuidanceOptions(cfg_skip_mode="early", cfg_apply_ratio=0.5)  # 2 steps: S A
    sched = make_flow_scheduler("vanilla", 5.0)
    with torch.no_grad():
        got = denoise(predict, noise, sched, 2, cond, uncond, 5.0, progress=False, guidance=options)
        # by hand: Euler on sigma, the positive prediction alone on the skipped steps
        timesteps = sched.set_timesteps(2)
        sigmas = sched.sigmas
        x = noise.clone()
        for i, apply in enumerate([False, True]):
            t = timesteps[i].expand(1)
            v = predict(x, t, cond)
            if apply:
                v_u = predict(x, t, uncond)
                v = v_u + 5.0 * (v - v_u)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        full = denoise(predict, noise, sched, 2, cond, uncond, 5.0, progress=False)
    torch.testing.assert_close(got, x, rtol=0, atol=1e-5)
    assert not torch.allclose(got, full, atol=1e-4)  # the skipped steps did change the result


class RecordingWan(WanArchitecture):
    """The Wan architecture, recording each prediction's timestep and input latents."""

    def __init__(self):
        self.seen = []

    def predict(self, dit, batch, noisy_latents, timesteps):
        self.seen.append((float(timesteps[0]), noisy_latents.clone()))
        return super().predict(dit, batch, noisy_latents, timesteps)


def test_video_to_video_strength_1_is_plain_generation_and_strength_s_starts_at_its_step(dit):
    arch = RecordingWan()
    vae = make_tiny_vae()
    encoders = WanLatentEncoders(vae=vae, clip=None)
    cond, _ = _conditions(2)
    spec = PromptSpec(prompt="p", width=32, height=32, frames=5, seed=4, steps=4, guidance_scale=1.0,
                      flow_shift=5.0)
    settings = RenderSettings(solver="vanilla", progress=False)
    source = torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(9))

    def source_latents(encoders_, request, latent_shape, args):
        return (source, args.strength) if args.strength is not None else None

    arch.generation_source_latents = source_latents
    with torch.no_grad():
        plain = render(arch, dit, encoders, spec, cond, None, settings, argparse.Namespace(task="t2v-1.3B", strength=None))
        plain_seen = list(arch.seen)
        arch.seen.clear()
        full = render(arch, dit, encoders, spec, cond, None, settings, argparse.Namespace(task="t2v-1.3B", strength=1.0))
        assert torch.equal(full, plain)
        arch.seen.clear()
        half = render(arch, dit, encoders, spec, cond, None, settings, argparse.Namespace(task="t2v-1.3B", strength=0.5))
    # int(4 * 0.5) = 2 steps run: the last two timesteps, from noise * t + source * (1 - t) at the first of them
    assert [t for t, _ in arch.seen] == [t for t, _ in plain_seen[2:]]
    t = plain_seen[2][0] / 1000
    noise = initial_noise(SHAPE, 4, "cpu")
    torch.testing.assert_close(arch.seen[0][1], noise * t + source[None] * (1 - t), rtol=0, atol=1e-6)
    assert not torch.allclose(half, plain, atol=1e-3)


def test_wan_source_latents_are_the_vae_latents_of_the_first_frames(tmp_path):
    from musubi_tuner.demo_data import COLORS, moving_clip
    from musubi_tuner.inference.outputs import save_video_mp4

    video = tmp_path / "src.mp4"
    save_video_mp4(moving_clip(32, 9, "square", COLORS["red"], 0.0), video, 16)
    vae = make_tiny_vae()
    encoders = WanLatentEncoders(vae=vae, clip=None)
    latents, strength = WAN.generation_source_latents(encoders, None, (16, 2, 4, 4),
                                                      argparse.Namespace(video_path=str(video), strength=0.3))
    from musubi_tuner.architectures.common import pixels_to_model_range
    from musubi_tuner.inference.images import load_video_resized

    pixels = load_video_resized(video, 5, 32, 32)  # 2 latent frames = the first 5 frames
    expected = WAN._encode_video(vae, pixels_to_model_range(pixels[None], vae.device, vae.dtype)).float()
    assert strength == 0.3 and latents.shape == (1, 16, 2, 4, 4) and torch.equal(latents, expected)
    assert WAN.generation_source_latents(encoders, None, (16, 2, 4, 4), argparse.Namespace()) is None


def _official_folder(root, ws, *, sharded: bool = False):
    folder = root / "Wan2.1-T2V-1.3B"
    (folder / "google").mkdir(parents=True)
    shutil.copytree(ws.tokenizer, folder / "google" / "umt5-xxl")
    shutil.copy(ws.t5, folder / "models_t5_umt5-xxl-enc-bf16.pth")
    torch.save(load_file(str(ws.vae)), folder / "Wan2.1_VAE.pth")  # the official VAE is a .pth of the same keys
    name = "diffusion_pytorch_model-00001-of-00001.safetensors" if sharded else "diffusion_pytorch_model.safetensors"
    shutil.copy(ws.dit, folder / name)
    return folder


def test_ckpt_dir_fills_the_flags_not_given(tmp_path):
    folder = tmp_path / "w"
    (folder / "google" / "umt5-xxl").mkdir(parents=True)
    for name in ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth",
                 "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
                 "diffusion_pytorch_model-00001-of-00002.safetensors"):
        (folder / name).write_bytes(b"x")
    args = argparse.Namespace(ckpt_dir=str(folder), vae=None, t5="mine.pth", t5_tokenizer=None, clip=None, dit=None)
    fill_from_ckpt_dir(args, needs_clip=False)
    assert args.vae == str(folder / "Wan2.1_VAE.pth") and args.t5 == "mine.pth"  # a given flag wins
    assert args.t5_tokenizer == str(folder / "google" / "umt5-xxl") and args.clip is None  # T2V: no CLIP
    assert args.dit == str(folder / "diffusion_pytorch_model-00001-of-00002.safetensors")
    fill_from_ckpt_dir(args, needs_clip=True)
    assert args.clip == str(folder / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    (tmp_path / "empty").mkdir()
    for missing in (tmp_path / "nope", tmp_path / "empty"):
        with pytest.raises(UserError, match="--ckpt_dir"):
            fill_from_ckpt_dir(argparse.Namespace(ckpt_dir=str(missing), vae=None), needs_clip=False)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("wan_modes"))


def _latent(folder):
    (path,) = folder.glob("*_latent.safetensors")
    return load_file(str(path))["latent"]


def test_generate_cli_modes_end_to_end(ws, tmp_path):
    folder = _official_folder(tmp_path, ws, sharded=True)
    base = ["--task", "t2v-1.3B", "--ckpt_dir", str(folder), "--vae_dtype", "float32", "--text_encoder_dtype",
            "float32", "--prompt", "a blue square moving", "--video_size", "32", "32", "--video_length", "5",
            "--infer_steps", "2", "--seed", "5", "--output_type", "latent", "--device", "cpu"]
    explicit = ["--task", "t2v-1.3B", "--dit", str(ws.dit), *ws.vae_args, *ws.t5_args, *base[8:]]
    assert run(wan_generate_video.main, [*base, "--save_path", str(tmp_path / "dir")]) == 0
    assert run(wan_generate_video.main, [*explicit, "--save_path", str(tmp_path / "plain")]) == 0
    plain = _latent(tmp_path / "plain")
    assert torch.equal(_latent(tmp_path / "dir"), plain)  # --ckpt_dir finds the same files

    source = next((ws.root / "data" / "videos").glob("*.mp4"))
    v2v = [*explicit, "--video_path", str(source), "--strength", "0.5"]  # strength 1.0: see the render test
    assert run(wan_generate_video.main, [*v2v, "--save_path", str(tmp_path / "s05")]) == 0
    assert not torch.allclose(_latent(tmp_path / "s05"), plain, atol=1e-3)

    guided = [*explicit, "--cfg_skip_mode", "alternate", "--cfg_apply_ratio", "0.5", "--slg_layers", "1",
              "--slg_mode", "original", "--slg_end", "1.0"]
    assert run(wan_generate_video.main, [*guided, "--save_path", str(tmp_path / "g")]) == 0
    assert not torch.allclose(_latent(tmp_path / "g"), plain, atol=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["--video_path", "missing.mp4"], "missing.mp4"),
    (["--video_path", "{video}", "--strength", "0.1", "--infer_steps", "4"], "--strength"),
    (["--ckpt_dir", "no_such_folder"], "--ckpt_dir"),
    (["--slg_layers", "a,b", "--slg_mode", "uncond"], "--slg_layers"),
    (["--dit", "{dit}", "--slg_layers", "1,2", "--slg_mode", "original"], "--slg_layers 2: --dit"),  # 2 blocks
    # --trim_tail_frames against each request's frames, also the task's default 81 and an in-line --f
    (["--trim_tail_frames", "81"], "--trim_tail_frames 81 would remove all 81 frames"),
    (["--prompt", "p --f 5", "--trim_tail_frames", "5"], "--trim_tail_frames 5 would remove all 5 frames"),
    # the strength against each request's own steps (an in-line --s)
    (["--prompt", "p --s 2", "--video_path", "{video}", "--strength", "0.4"], "--strength 0.4 with 2 steps"),
])
def test_bad_mode_flags_fail_before_any_model_loads(ws, tmp_path, capsys, argv, message):
    source = next((ws.root / "data" / "videos").glob("*.mp4"))
    argv = [a.replace("{video}", str(source)).replace("{dit}", str(ws.dit)) for a in argv]
    # no model file at all: the run must stop on the flag before trying to load one
    assert run(wan_generate_video.main, ["--task", "t2v-1.3B", "--prompt", "p", "--save_path", str(tmp_path / "o"),
                                         *argv]) == 2
    assert message in capsys.readouterr().err
