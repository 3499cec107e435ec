"""Wan I2V / FLF2V through the CLIs: caching with --i2v --clip, training on those caches, generation from images."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from musubi_tuner import wan_cache_latents, wan_cache_text_encoder_outputs, wan_generate_video, wan_train_network
from musubi_tuner.architectures.wan.tiny import write_tiny_wan_files
from musubi_tuner.architectures.wan.tiny_encoders import write_tiny_wan_encoder_files
from musubi_tuner.demo_data import COLORS, moving_clip
from wan_fixtures import run, write_clip_dataset




@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("i2v")
    i2v = write_tiny_wan_files(root / "i2v", "i2v-14B")
    flf2v = write_tiny_wan_files(root / "flf2v", "flf2v-14B")
    enc = write_tiny_wan_encoder_files(root / "enc")
    toml = write_clip_dataset(root / "data")
    start = root / "start.png"
    Image.fromarray(moving_clip(40, 1, "circle", COLORS["red"], 0.0)[0]).save(start)
    end = root / "end.png"
    Image.fromarray(moving_clip(40, 1, "circle", COLORS["red"], 2.0)[0]).save(end)
    common = ["--vae", str(i2v["vae"]), "--vae_dtype", "float32", "--t5", str(enc["t5"]), "--t5_tokenizer",
              str(enc["tokenizer"]), "--text_encoder_dtype", "float32"]
    return {"root": root, "i2v": i2v["dit"], "flf2v": flf2v["dit"], "clip": enc["clip"], "toml": toml,
            "start": start, "end": end, "vae": common[:4], "t5": common[4:]}


def test_i2v_caches_train_and_generate(files, tmp_path):
    toml = str(files["toml"])
    assert run(wan_cache_latents.main, ["--dataset_config", toml, *files["vae"], "--clip", str(files["clip"])]) == 0
    assert run(wan_cache_text_encoder_outputs.main, ["--dataset_config", toml, *files["t5"]]) == 0
    (cache,) = (files["root"] / "data" / "cache_vid").glob("*_0032x0032_wan.safetensors")
    with safe_open(str(cache), "pt") as f:
        keys = sorted(f.keys())
        assert keys == ["clip_float16", "latents_2x4x4_float32", "latents_image_2x4x4_float32"]
        y = f.get_tensor("latents_image_2x4x4_float32")
        assert y.shape == (20, 2, 4, 4)
        assert torch.all(y[:4, 0] == 1) and torch.all(y[:4, 1] == 0)  # mask: the first frame is given
        assert f.get_tensor("clip_float16").shape == (17, 32)

    out = tmp_path / "lora"
    train = ["--task", "i2v-14B", "--dit", str(files["i2v"]), "--dataset_config", toml, *files["vae"], *files["t5"],
             "--mixed_precision", "no", "--network_dim", "4", "--learning_rate", "1e-3", "--max_train_steps", "3",
             "--seed", "1", "--output_dir", str(out), "--output_name", "i2v"]
    assert run(wan_train_network.main, train) == 0
    sd = load_file(str(out / "i2v.safetensors"))
    assert "lora_unet_blocks_0_cross_attn_k_img.lora_down.weight" in sd
    assert sd["lora_unet_blocks_0_cross_attn_k_img.lora_up.weight"].abs().sum() > 0  # the image branch trained

    gen = ["--task", "i2v-14B", "--dit", str(files["i2v"]), *files["vae"], *files["t5"], "--clip", str(files["clip"]),
           "--lora_weight", str(out / "i2v.safetensors"), "--image_path", str(files["start"]), "--prompt", "a red dot",
           "--video_size", "32", "32", "--video_length", "5", "--infer_steps", "3", "--seed", "3",
           "--save_path", str(tmp_path / "gen"), "--output_type", "latent"]
    assert run(wan_generate_video.main, gen) == 0
    (latent,) = (tmp_path / "gen").glob("*_latent.safetensors")
    assert load_file(str(latent))["latent"].shape == (16, 2, 4, 4)


def test_i2v_without_an_image_is_a_clear_error(files, tmp_path, capsys):
    gen = ["--task", "i2v-14B", "--dit", str(files["i2v"]), *files["vae"], *files["t5"], "--clip", str(files["clip"]),
           "--prompt", "x", "--video_size", "32", "32", "--video_length", "5", "--save_path", str(tmp_path)]
    assert run(wan_generate_video.main, gen) == 2
    assert "--image_path" in capsys.readouterr().err


def test_flf2v_generates_from_start_and_end_images(files, tmp_path):
    gen = ["--task", "flf2v-14B", "--dit", str(files["flf2v"]), *files["vae"], *files["t5"], "--clip", str(files["clip"]),
           "--image_path", str(files["start"]), "--end_image_path", str(files["end"]), "--prompt", "a red dot",
           "--video_size", "32", "32", "--video_length", "5", "--infer_steps", "2", "--seed", "3",
           "--save_path", str(tmp_path), "--output_type", "both"]
    assert run(wan_generate_video.main, gen) == 0
    assert len(list(tmp_path.glob("*.mp4"))) == 1


def test_decode_only_from_a_latent_file(files, tmp_path):
    gen = ["--task", "i2v-14B", "--dit", str(files["i2v"]), *files["vae"], *files["t5"], "--clip", str(files["clip"]),
           "--image_path", str(files["start"]), "--prompt", "a red dot", "--video_size", "32", "32",
           "--video_length", "5", "--infer_steps", "2", "--seed", "4", "--save_path", str(tmp_path / "a"),
           "--output_type", "latent"]
    assert run(wan_generate_video.main, gen) == 0
    (latent,) = (tmp_path / "a").glob("*_latent.safetensors")
    dec = ["--task", "i2v-14B", *files["vae"], "--latent_path", str(latent), "--save_path", str(tmp_path / "b"),
           "--output_type", "images"]
    assert run(wan_generate_video.main, dec) == 0
    assert len(list((tmp_path / "b").rglob("*.png"))) == 5


def test_task_and_caches_must_match_before_the_dit_loads(files, tmp_path, capsys):
    from musubi_tuner.architectures.wan.tiny import write_tiny_wan_files

    toml = write_clip_dataset(tmp_path / "data")
    assert run(wan_cache_latents.main, ["--dataset_config", str(toml), *files["vae"]]) == 0  # T2V caches
    assert run(wan_cache_text_encoder_outputs.main, ["--dataset_config", str(toml), *files["t5"]]) == 0

    def train(task, dit):
        return run(wan_train_network.main, [
            "--task", task, "--dit", str(dit), "--dataset_config", str(toml), "--mixed_precision", "no",
            "--max_train_steps", "1", "--output_dir", str(tmp_path / task), "--output_name", "x"])

    assert train("i2v-14B", tmp_path / "never_loaded.safetensors") == 2
    err = capsys.readouterr().err
    assert "latents_image" in err and "--i2v --clip" in err and "never_loaded" not in err
    assert train("flf2v-14B", tmp_path / "never_loaded.safetensors") == 2
    assert "FLF2V training" in capsys.readouterr().err

    # --skip_existing re-encodes the T2V caches, which lack what --clip asks for
    assert run(wan_cache_latents.main, ["--dataset_config", str(toml), *files["vae"], "--clip", str(files["clip"]),
                                        "--skip_existing"]) == 0
    assert "3 written, 0 already cached" in capsys.readouterr().out
    # I2V caches also train a T2V model: the image conditioning is simply not used
    t2v = write_tiny_wan_files(tmp_path / "t2v", "t2v-1.3B")["dit"]
    assert train("t2v-1.3B", t2v) == 0
