"""Wan one-frame training and inference: option parsing, the frame layout, RoPE time positions, and the CLIs."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from musubi_tuner import wan_cache_latents, wan_cache_text_encoder_outputs, wan_generate_video, wan_train_network
from musubi_tuner.architectures.wan import WanArchitecture
from musubi_tuner.architectures.wan.one_frame import (
    FrameLayout,
    condition_latents,
    parse_one_frame_options,
    rope_time_positions,
    training_latents,
)
from musubi_tuner.architectures.wan.tiny import make_tiny_dit, write_tiny_wan_files
from musubi_tuner.architectures.wan.tiny_encoders import write_tiny_wan_encoder_files
from musubi_tuner.demo_data import COLORS, moving_clip
from musubi_tuner.errors import UserError
from wan_fixtures import eval_flow_loss, run


# ---- layout ---------------------------------------------------------------------------------------------
def test_options_give_sorted_frame_positions_and_the_target_position():
    layout = parse_one_frame_options("control_index=0;2, target_index=1, no_2x")  # FramePack words are ignored
    assert layout == FrameLayout(1, (0, 2)) and layout.f_indices == [0, 1, 2] and layout.target_position == 1
    late = parse_one_frame_options("target_index=9,control_index=0")
    assert late.f_indices == [0, 9] and late.target_position == 1
    assert parse_one_frame_options("").f_indices == [0]  # the reference's defaults: target 0, no control


@pytest.mark.parametrize("text, needle", [
    ("target_index=x", "integers"), ("target_index=1,control_index=1", "differ"),
    ("target_index=-1", ">= 0"), ("target_index=5,control_index=0;1;2", "at most 2"),
])
def test_bad_options_name_the_flag(text, needle):
    with pytest.raises(UserError, match=f"--one_frame_inference.*{needle}"):
        parse_one_frame_options(text)


def test_condition_and_training_latents_follow_the_time_order():
    # as the reference: control images fill the control positions in ascending time order, whatever order
    # control_index lists them in (here the first image goes to 0, the second to 2)
    layout = FrameLayout(1, (2, 0))
    a, b = torch.full((3, 1, 2, 2), 1.0), torch.full((3, 1, 2, 2), 2.0)
    blank, target = torch.full((3, 1, 2, 2), -1.0), torch.full((3, 1, 2, 2), 7.0)
    y = condition_latents(layout, [a, b], blank)
    assert y.shape == (7, 3, 2, 2)
    assert torch.equal(y[:4, :, 0, 0], torch.tensor([[1.0, 0.0, 1.0]] * 4))  # mask: controls 1, target 0
    assert torch.equal(y[4:, :, 0, 0], torch.tensor([[1.0, -1.0, 2.0]] * 3))  # positions 0, 1, 2 = a, blank, b
    x = training_latents(layout, [a, b], target)
    assert torch.equal(x[:, :, 0, 0], torch.tensor([[1.0, 7.0, 2.0]] * 3))


def test_rope_positions_are_those_of_the_chosen_frames_of_a_longer_video():
    dit = make_tiny_dit("i2v-14B")
    long = torch.zeros(1, 36, 10, 4, 4)
    cos10, sin10 = dit.rope(long)  # frames 0..9, 2x2 tokens each
    tokens = 4
    pick = torch.cat([torch.arange(0, tokens), torch.arange(9 * tokens, 10 * tokens)])
    with rope_time_positions(dit, [0, 9]):
        cos, sin = dit.rope(torch.zeros(1, 36, 2, 4, 4))
    assert torch.equal(cos, cos10[:, pick]) and torch.equal(sin, sin10[:, pick])
    cos_plain, _ = dit.rope(torch.zeros(1, 36, 2, 4, 4))  # restored afterwards
    assert torch.equal(cos_plain, cos10[:, :2 * tokens])


def test_predict_uses_the_batch_frame_positions():
    dit, arch = make_tiny_dit("i2v-14B"), WanArchitecture()
    gen = torch.Generator().manual_seed(0)
    batch = {"t5": [torch.randn(5, 32, generator=gen)], "latents_image": torch.randn(1, 20, 2, 4, 4, generator=gen),
             "clip": torch.randn(1, 1, 17, 32, generator=gen)}  # one-frame caches: one CLIP row per control image
    noisy, t = torch.randn(1, 16, 2, 4, 4, generator=gen), torch.tensor([500.0])
    seen = []
    hook = dit.rope.register_forward_hook(lambda module, args, out: seen.append(out[0]))
    with torch.no_grad():
        far = arch.predict(dit, {**batch, "f_indices": torch.tensor([[0, 9]], dtype=torch.int32)}, noisy, t)
        near = arch.predict(dit, {**batch, "f_indices": torch.tensor([[0, 1]], dtype=torch.int32)}, noisy, t)
        plain = arch.predict(dit, batch, noisy, t)
    hook.remove()
    cos10, _ = dit.rope(torch.zeros(1, 36, 10, 4, 4))
    assert torch.equal(seen[0], torch.cat([cos10[:, :4], cos10[:, 36:40]], dim=1))
    torch.testing.assert_close(near, plain, rtol=0, atol=0)  # positions 0, 1 are the plain video's
    assert not torch.allclose(far, plain)


# ---- through the CLIs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_frame")
    i2v = write_tiny_wan_files(root / "i2v", "i2v-14B")
    enc = write_tiny_wan_encoder_files(root / "enc")
    images, controls = root / "images", root / "controls"
    images.mkdir()
    controls.mkdir()
    for i, name in enumerate(("red", "green")):  # the target: the dot moved on; the control: where it started
        Image.fromarray(moving_clip(32, 1, "circle", COLORS[name], 3.0 + i)[0]).save(images / f"{name}.png")
        Image.fromarray(moving_clip(32, 1, "circle", COLORS[name], 0.0 + i)[0]).save(controls / f"{name}.png")
        (images / f"{name}.txt").write_text(f"the {name} dot moves right")
    toml = root / "one_frame.toml"
    toml.write_text(f'[general]\nresolution = [32, 32]\ncaption_extension = ".txt"\nbatch_size = 1\n\n[[datasets]]\n'
                    f'image_directory = "{images.as_posix()}"\ncontrol_directory = "{controls.as_posix()}"\n'
                    f'cache_directory = "{(root / "cache").as_posix()}"\nfp_1f_clean_indices = [0]\n'
                    f'fp_1f_target_index = 1\n')
    vae = ["--vae", str(i2v["vae"]), "--vae_dtype", "float32"]
    t5 = ["--t5", str(enc["t5"]), "--t5_tokenizer", str(enc["tokenizer"]), "--text_encoder_dtype", "float32"]
    assert run(wan_cache_latents.main, ["--dataset_config", str(toml), *vae, "--clip", str(enc["clip"]), "--one_frame"]) == 0
    assert run(wan_cache_text_encoder_outputs.main, ["--dataset_config", str(toml), *t5]) == 0
    return {"root": root, "dit": i2v["dit"], "clip": enc["clip"], "toml": toml, "vae": vae, "t5": t5,
            "control": controls / "red.png"}


def test_one_frame_caches_hold_the_reference_keys_and_layout(files):
    cache = files["root"] / "cache" / "red_0032x0032_wan.safetensors"
    with safe_open(str(cache), "pt") as f:
        assert sorted(f.keys()) == ["clip_float16", "f_indices_int32", "latents_2x4x4_float32",
                                    "latents_image_2x4x4_float32"]
        assert f.get_tensor("f_indices_int32").tolist() == [0, 1]
        assert f.get_tensor("clip_float16").shape == (1, 17, 32)  # one row per control image
        x, y = f.get_tensor("latents_2x4x4_float32"), f.get_tensor("latents_image_2x4x4_float32")
    assert torch.all(y[:4, 0] == 1) and torch.all(y[:4, 1] == 0)
    assert torch.equal(x[:, 0], y[4:, 0])  # the control frame is trained on its own latents
    assert not torch.equal(x[:, 1], y[4:, 1])  # the target: its latents vs the blank frame's


def test_one_frame_caching_needs_clip(files, capsys):
    assert run(wan_cache_latents.main, ["--dataset_config", str(files["toml"]), *files["vae"], "--one_frame"]) == 2
    assert "--one_frame needs --clip" in capsys.readouterr().err


def test_one_frame_caching_without_control_images_names_the_key(files, tmp_path, capsys):
    toml = tmp_path / "no_controls.toml"
    toml.write_text(files["toml"].read_text().replace("control_directory", "# control_directory")
                    .replace((files["root"] / "cache").as_posix(), (tmp_path / "cache").as_posix()))
    argv = ["--dataset_config", str(toml), *files["vae"], "--clip", str(files["clip"]), "--one_frame"]
    assert run(wan_cache_latents.main, argv) == 2
    assert "needs 1 control image(s) per image" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_one_frame_training_learns_and_generation_is_seeded(files, tmp_path):
    out = tmp_path / "lora"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"the red dot moves right --w 32 --h 32 --s 2 --d 1 --i {files['control']} "
                       f"--of target_index=1,control_index=0 --ci {files['control']}\n")
    train = ["--task", "i2v-14B", "--dit", str(files["dit"]), "--dataset_config", str(files["toml"]), *files["vae"],
             *files["t5"], "--one_frame", "--mixed_precision", "no", "--network_dim", "8", "--network_alpha", "8",
             "--learning_rate", "1e-2", "--max_train_steps", "16", "--seed", "1", "--output_dir", str(out),
             "--output_name", "one_frame", "--clip", str(files["clip"]), "--sample_prompts", str(prompts),
             "--sample_every_n_steps", "16"]
    assert run(wan_train_network.main, train) == 0
    lora = out / "one_frame.safetensors"
    (sample,) = (out / "sample").glob("*.png")  # the sample at the last step is one image
    assert Image.open(sample).size == (32, 32)
    cache = files["root"] / "cache"
    caches = [(cache / f"{n}_0032x0032_wan.safetensors", cache / f"{n}_wan_te.safetensors") for n in ("red", "green")]
    before, after = eval_flow_loss(files["dit"], None, caches), eval_flow_loss(files["dit"], lora, caches)
    print(f"one-frame eval loss before {before:.4f} after {after:.4f}")
    assert after < 0.8 * before, (before, after)

    def generate(seed, folder):
        argv = ["--task", "i2v-14B", "--dit", str(files["dit"]), *files["vae"], *files["t5"], "--clip", str(files["clip"]),
                "--lora_weight", str(lora), "--image_path", str(files["control"]), "--prompt", "the red dot moves right",
                "--one_frame_inference", "target_index=1,control_index=0", "--control_image_path", str(files["control"]),
                "--video_size", "32", "32", "--infer_steps", "3", "--seed", str(seed), "--save_path", str(folder),
                "--output_type", "latent_images"]
        assert run(wan_generate_video.main, argv) == 0
        assert len(list(folder.glob("*.png"))) == 1  # one frame: one image
        (latent,) = folder.glob("*_latent.safetensors")
        return load_file(str(latent))["latent"]

    a, b, c = generate(4, tmp_path / "a"), generate(4, tmp_path / "b"), generate(5, tmp_path / "c")
    assert a.shape == (16, 1, 4, 4)  # only the target frame is kept
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_one_frame_training_checks_its_sample_prompts_first(files, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a dot --w 32 --h 32\n")
    train = ["--task", "i2v-14B", "--dit", str(tmp_path / "missing.safetensors"), "--dataset_config",
             str(files["toml"]), "--one_frame", "--sample_prompts", str(prompts), "--max_train_steps", "1",
             "--output_dir", str(tmp_path / "o")]
    assert run(wan_train_network.main, train) == 2
    err = capsys.readouterr().err
    assert "need --of" in err and "p.txt line 1" in err and "missing.safetensors" not in err


@pytest.mark.parametrize("extra, needle", [
    (["--one_frame_inference", "target_index=1,control_index=0"], "1 control_index value(s) but 0 control image"),
    (["--control_image_path", "CONTROL"], "--control_image_path/--ci is for one-frame inference"),
    (["--one_frame_inference", "target_index=1,control_index=0", "--control_image_path", "CONTROL", "--task",
      "t2v-1.3B"], "needs --task i2v-14B or flf2v-14B"),
])
def test_one_frame_request_errors_come_before_any_model_loads(files, tmp_path, capsys, extra, needle):
    extra = [str(files["control"]) if e == "CONTROL" else e for e in extra]
    argv = ["--task", "i2v-14B", "--dit", str(tmp_path / "missing.safetensors"), "--prompt", "x", "--video_size", "32",
            "32", "--save_path", str(tmp_path), *extra]
    assert run(wan_generate_video.main, argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "missing.safetensors" not in err
