"""Samples during training run in every precision training runs in (no, bf16, fp16; here on the CPU)."""

from __future__ import annotations

import pytest
from PIL import Image

from musubi_tuner import wan_cache_latents, wan_cache_text_encoder_outputs, wan_train_network
from wan_fixtures import make_workspace, run


@pytest.fixture(scope="module")
def wan_ws(tmp_path_factory):
    ws = make_workspace(tmp_path_factory.mktemp("wan_precision"))
    assert run(wan_cache_latents.main, ["--dataset_config", str(ws.toml), *ws.vae_args, "--device", "cpu"]) == 0
    assert run(wan_cache_text_encoder_outputs.main, ["--dataset_config", str(ws.toml), *ws.t5_args, "--device", "cpu"]) == 0
    return ws


@pytest.mark.parametrize("precision", ["bf16"])  # fp16 also passes on CPU, but takes minutes there
def test_wan_training_samples_in_mixed_precision_on_cpu(wan_ws, tmp_path, precision, fresh_accelerate_state):
    prompts = tmp_path / "samples.txt"
    prompts.write_text("a red dot --w 32 --h 32 --f 1 --s 2 --d 1\na blue square --w 32 --h 32 --f 5 --s 2 --d 2\n")
    out = tmp_path / "out"
    argv = wan_ws.train_args(out, 1, "--sample_prompts", str(prompts), "--sample_at_first")
    argv[argv.index("--mixed_precision") + 1] = precision
    assert run(wan_train_network.main, argv) == 0
    images = sorted((out / "sample").glob("*.png"))
    videos = sorted((out / "sample").glob("*.mp4"))
    assert len(images) == 1 and len(videos) == 1
    assert Image.open(images[0]).size == (32, 32)


def test_flux_kontext_training_samples_in_bf16_on_cpu(tmp_path, fresh_accelerate_state):
    from musubi_tuner import (
        flux_kontext_cache_latents,
        flux_kontext_cache_text_encoder_outputs,
        flux_kontext_train_network,
    )
    from musubi_tuner.architectures.flux_kontext.tiny import write_tiny_flux_kontext_files
    from musubi_tuner.demo_data import make_edit_dataset

    models = write_tiny_flux_kontext_files(tmp_path / "models")
    data = make_edit_dataset(tmp_path / "data", count=1)
    toml = tmp_path / "dataset.toml"
    toml.write_text('[general]\nresolution = [32, 32]\ncaption_extension = ".txt"\nbatch_size = 1\n\n'
                    f'[[datasets]]\nimage_directory = "{data["images"].as_posix()}"\n'
                    f'control_directory = "{data["controls"].as_posix()}"\n'
                    f'cache_directory = "{(tmp_path / "cache").as_posix()}"\n')
    te = ["--text_encoder1", str(models["t5"]), "--text_encoder2", str(models["clip_l"]), "--t5_tokenizer",
          str(models["t5_tokenizer"]), "--clip_tokenizer", str(models["clip_tokenizer"]), "--text_encoder_dtype", "float32"]
    vae = ["--vae", str(models["ae"])]
    assert run(flux_kontext_cache_latents.main, ["--dataset_config", str(toml), *vae, "--device", "cpu"]) == 0
    assert run(flux_kontext_cache_text_encoder_outputs.main, ["--dataset_config", str(toml), *te, "--device", "cpu"]) == 0
    control = next(data["controls"].iterdir())
    prompts = tmp_path / "samples.txt"
    prompts.write_text(f"make it red --w 32 --h 32 --s 2 --d 3 --ci {control.as_posix()}\n")
    out = tmp_path / "out"
    argv = ["--dit", str(models["dit"]), "--dataset_config", str(toml), *vae, *te, "--mixed_precision", "bf16",
            "--network_module", "networks.lora_flux", "--network_dim", "4", "--optimizer_type", "adamw",
            "--learning_rate", "1e-3", "--max_train_steps", "1", "--seed", "1", "--output_dir", str(out),
            "--sample_prompts", str(prompts), "--sample_at_first"]
    assert run(flux_kontext_train_network.main, argv) == 0
    (image,) = (out / "sample").glob("*.png")
    assert Image.open(image).size == (32, 32)
