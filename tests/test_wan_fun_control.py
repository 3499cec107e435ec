"""Wan2.1 Fun-Control: the DiT's input channels, control caches, training and generation through the CLIs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from musubi_tuner import wan_cache_latents, wan_cache_text_encoder_outputs, wan_generate_video, wan_train_network
from musubi_tuner.architectures.wan import WanArchitecture
from musubi_tuner.architectures.wan.fun_control import USES_START_IMAGE
from musubi_tuner.architectures.wan.tiny import make_tiny_dit, write_tiny_wan_files
from musubi_tuner.architectures.wan.tiny_encoders import write_tiny_wan_encoder_files
from musubi_tuner.demo_data import COLORS, moving_clip
from musubi_tuner.inference.outputs import save_video_mp4
from wan_fixtures import eval_flow_loss, run


def _capture_inputs(dit):
    """Record what the DiT is called with (hidden states, CLIP image tokens)."""
    seen = {}
    original = dit.forward

    def forward(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None, **kw):
        seen.update(hidden=hidden_states.clone(), image=encoder_hidden_states_image)
        return original(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image, **kw)

    dit.forward = forward
    return seen


@pytest.mark.parametrize("uses_start_image", [False, True])
def test_inputs_are_noisy_then_control_then_start_frame_latents(uses_start_image):
    dit, arch = make_tiny_dit("t2v-1.3B-FC"), WanArchitecture()
    assert dit.config.in_channels == 48
    gen = torch.Generator().manual_seed(0)
    noisy, control = torch.randn(1, 16, 3, 4, 4, generator=gen), torch.randn(1, 16, 3, 4, 4, generator=gen)
    image = torch.randn(1, 20, 3, 4, 4, generator=gen)  # an I2V cache's conditioning: 4 mask + 16 latents
    clip = torch.randn(1, 17, 32, generator=gen)
    batch = {"t5": [torch.randn(5, 32, generator=gen)], "latents_control": control, "latents_image": image,
             "clip": clip, USES_START_IMAGE: uses_start_image}
    seen = _capture_inputs(dit)
    with torch.no_grad():
        arch.predict(dit, batch, noisy, torch.tensor([300.0]))
    expected_image = torch.zeros(1, 16, 3, 4, 4)
    if uses_start_image:  # i2v-14B-FC: the start frame's latents without the mask; later frames zeroed
        expected_image[:, :, 0] = image[:, 4:, 0]
    assert torch.equal(seen["hidden"], torch.cat([noisy, control, expected_image], dim=1))
    if uses_start_image:
        assert torch.equal(seen["image"], clip)
    else:  # T2V Fun-Control: an all-zero CLIP context for the image branch
        assert torch.equal(seen["image"], torch.zeros(1, 1, 32))


def test_predict_without_control_latents_is_a_clear_error():
    dit = make_tiny_dit("t2v-1.3B-FC")
    with pytest.raises(Exception, match="control latents.*control_directory.*--control_path"):
        WanArchitecture().predict(dit, {"t5": [torch.zeros(3, 32)]}, torch.zeros(1, 16, 1, 4, 4), torch.tensor([1.0]))


# ---- through the CLIs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fc")
    fc = write_tiny_wan_files(root / "fc", "t2v-1.3B-FC")
    enc = write_tiny_wan_encoder_files(root / "enc")
    videos, controls = root / "videos", root / "controls"
    videos.mkdir()
    (controls / "blue_square").mkdir(parents=True)
    save_video_mp4(moving_clip(32, 5, "square", COLORS["blue"], 0.0), videos / "blue_square.mp4", 16)
    (videos / "blue_square.txt").write_text("a blue square moving")
    for i, frame in enumerate(moving_clip(32, 5, "circle", (255, 255, 255), 0.0)):  # control: a folder of frames
        Image.fromarray(frame).save(controls / "blue_square" / f"{i:03d}.png")
    control_video = root / "pose.mp4"
    save_video_mp4(moving_clip(32, 5, "circle", (255, 255, 255), 0.0), control_video, 16)
    other_control = root / "other.mp4"
    save_video_mp4(moving_clip(32, 5, "circle", (255, 255, 255), 3.0), other_control, 16)
    toml = root / "fc.toml"
    toml.write_text(f'[general]\nresolution = [32, 32]\ncaption_extension = ".txt"\nbatch_size = 1\n\n[[datasets]]\n'
                    f'video_directory = "{videos.as_posix()}"\ncontrol_directory = "{controls.as_posix()}"\n'
                    f'cache_directory = "{(root / "cache").as_posix()}"\ntarget_frames = [5]\n')
    vae = ["--vae", str(fc["vae"]), "--vae_dtype", "float32"]
    t5 = ["--t5", str(enc["t5"]), "--t5_tokenizer", str(enc["tokenizer"]), "--text_encoder_dtype", "float32"]
    assert run(wan_cache_latents.main, ["--dataset_config", str(toml), *vae]) == 0
    assert run(wan_cache_text_encoder_outputs.main, ["--dataset_config", str(toml), *t5]) == 0
    start = root / "start.png"
    Image.fromarray(moving_clip(32, 1, "square", COLORS["blue"], 0.0)[0]).save(start)
    return {"root": root, "dit": fc["dit"], "vae_file": fc["vae"], "toml": toml, "vae": vae, "t5": t5,
            "clip": enc["clip"], "start": start,
            "control": control_video, "other_control": other_control, "control_frames": controls / "blue_square"}


def test_control_videos_are_cached_as_latents_control(files):
    from musubi_tuner.architectures.wan.vae_files import load_wan_vae
    from musubi_tuner.architectures.common import pixels_to_model_range

    (cache,) = (files["root"] / "cache").glob("blue_square_00000-005_0032x0032_wan.safetensors")
    with safe_open(str(cache), "pt") as f:
        assert sorted(f.keys()) == ["latents_2x4x4_float32", "latents_control_2x4x4_float32"]
        control = f.get_tensor("latents_control_2x4x4_float32")
    frames = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB")))
                          for p in sorted(files["control_frames"].iterdir())])
    vae = load_wan_vae(files["vae_file"], device="cpu", dtype=torch.float32)
    expected = WanArchitecture()._encode_video(vae, pixels_to_model_range(frames[None], vae.device, vae.dtype))[0]
    torch.testing.assert_close(control, expected, rtol=0, atol=1e-5)


def test_fun_control_training_learns_and_generation_follows_the_control(files, tmp_path):
    out = tmp_path / "lora"
    train = ["--task", "t2v-1.3B-FC", "--dit", str(files["dit"]), "--dataset_config", str(files["toml"]),
             *files["vae"], *files["t5"], "--mixed_precision", "no", "--network_dim", "8", "--network_alpha", "8",
             "--learning_rate", "1e-2", "--max_train_steps", "12", "--seed", "1", "--output_dir", str(out),
             "--output_name", "fc"]
    assert run(wan_train_network.main, train) == 0
    lora = out / "fc.safetensors"
    cache = files["root"] / "cache"
    caches = [(cache / "blue_square_00000-005_0032x0032_wan.safetensors", cache / "blue_square_wan_te.safetensors")]
    before, after = eval_flow_loss(files["dit"], None, caches), eval_flow_loss(files["dit"], lora, caches)
    print(f"Fun-Control eval loss before {before:.4f} after {after:.4f}")
    assert after < 0.8 * before, (before, after)

    def generate(seed, control, folder):
        argv = ["--task", "t2v-1.3B-FC", "--dit", str(files["dit"]), *files["vae"], *files["t5"], "--lora_weight",
                str(lora), "--prompt", "a blue square moving", "--control_path", str(control), "--video_size", "32",
                "32", "--video_length", "5", "--infer_steps", "3", "--seed", str(seed), "--save_path", str(folder),
                "--output_type", "latent"]
        assert run(wan_generate_video.main, argv) == 0
        (latent,) = folder.glob("*_latent.safetensors")
        return load_file(str(latent))["latent"]

    a, b = generate(4, files["control"], tmp_path / "a"), generate(4, files["control"], tmp_path / "b")
    c = generate(4, files["other_control"], tmp_path / "c")
    assert a.shape == (16, 2, 4, 4) and torch.equal(a, b)
    assert not torch.equal(a, c)  # the control video steers the result


def test_i2v_fun_control_generates_from_a_start_image_and_a_control(files, tmp_path):
    def generate(image, folder):
        argv = ["--task", "i2v-14B-FC", "--dit", str(files["dit"]), *files["vae"], *files["t5"], "--clip",
                str(files["clip"]), "--image_path", str(image), "--control_path", str(files["control"]), "--prompt",
                "a blue square moving", "--video_size", "32", "32", "--video_length", "5", "--infer_steps", "2",
                "--seed", "7", "--save_path", str(folder), "--output_type", "latent"]
        assert run(wan_generate_video.main, argv) == 0
        (latent,) = folder.glob("*_latent.safetensors")
        return load_file(str(latent))["latent"]

    a, b = generate(files["start"], tmp_path / "a"), generate(files["start"], tmp_path / "b")
    other = tmp_path / "other.png"
    Image.fromarray(moving_clip(32, 1, "circle", COLORS["red"], 2.0)[0]).save(other)
    assert torch.equal(a, b) and not torch.equal(a, generate(other, tmp_path / "c"))  # the start image counts


@pytest.mark.parametrize("extra, frames, needle", [
    ([], "5", "needs a control video: --control_path"),
    (["--control_path", "CONTROL"], "9", "has 5 frames; the video needs 9"),
    (["--control_path", "CONTROL", "--task", "t2v-1.3B"], "5", "--control_path/--cn needs a Fun-Control --task"),
])
def test_control_errors_name_the_flag(files, tmp_path, capsys, extra, frames, needle):
    extra = [str(files["control"]) if e == "CONTROL" else e for e in extra]
    argv = ["--task", "t2v-1.3B-FC", "--dit", str(tmp_path / "missing.safetensors"), "--prompt", "x",
            "--video_size", "32", "32", "--video_length", frames, "--infer_steps", "1", "--save_path", str(tmp_path),
            *extra]
    assert run(wan_generate_video.main, argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "missing.safetensors" not in err  # before any model loads


def test_training_on_caches_without_control_names_the_file(files, tmp_path, capsys):
    bare = tmp_path / "bare.toml"
    bare.write_text(files["toml"].read_text().replace("control_directory", "# control_directory")
                    .replace(str((files["root"] / "cache").as_posix()), str((tmp_path / "cache").as_posix())))
    assert run(wan_cache_latents.main, ["--dataset_config", str(bare), *files["vae"]]) == 0
    assert run(wan_cache_text_encoder_outputs.main, ["--dataset_config", str(bare), *files["t5"]]) == 0
    train = ["--task", "t2v-1.3B-FC", "--dit", str(tmp_path / "missing.safetensors"), "--dataset_config", str(bare),
             "--mixed_precision", "no", "--max_train_steps", "1", "--output_dir", str(tmp_path / "o")]
    assert run(wan_train_network.main, train) == 2
    err = capsys.readouterr().err
    assert "has no latents_control" in err and "control_directory" in err and "missing.safetensors" not in err
