"""FLUX.1 Kontext end to end through the command-line entry points, on the tiny preset and a control dataset.

cache latents -> cache text -> train (with a sample) -> generate with a control image -> merge; then the
artefacts are checked: cache names and keys, a lower loss after training, outputs, merged weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from musubi_tuner import (
    flux_kontext_cache_latents,
    flux_kontext_cache_text_encoder_outputs,
    flux_kontext_generate_image,
    flux_kontext_train_network,
    merge_lora,
)
from musubi_tuner.architectures import get_architecture
from musubi_tuner.architectures.flux_kontext.control import control_image_size, load_control_image
from musubi_tuner.architectures.flux_kontext.dit_files import load_flux_dit
from musubi_tuner.architectures.flux_kontext.tiny import write_tiny_flux_kontext_files
from musubi_tuner.dataset.cache_files import read_cache
from musubi_tuner.demo_data import make_edit_dataset

ARCH = get_architecture("flux_kontext")
STEPS = 60


def write_toml(path: Path, data: dict[str, Path], cache: Path, extra: str = "") -> Path:
    path.write_text(
        '[general]\nresolution = [64, 64]\ncaption_extension = ".txt"\nbatch_size = 1\nenable_bucket = true\n\n'
        f'[[datasets]]\nimage_directory = "{data["images"].as_posix()}"\n'
        f'control_directory = "{data["controls"].as_posix()}"\ncache_directory = "{cache.as_posix()}"\n{extra}'
    )
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Cache, cache text and train once; the tests below check what was written."""
    root = tmp_path_factory.mktemp("kontext")
    models = write_tiny_flux_kontext_files(root / "models", comfy_prefix=True)
    data = make_edit_dataset(root / "data")
    toml = write_toml(root / "dataset.toml", data, root / "cache")
    te = ["--text_encoder1", str(models["t5"]), "--text_encoder2", str(models["clip_l"]),
          "--t5_tokenizer", str(models["t5_tokenizer"]), "--clip_tokenizer", str(models["clip_tokenizer"]),
          "--text_encoder_dtype", "float32"]
    vae = ["--vae", str(models["ae"])]
    control = data["controls"] / "edit_00_circle.png"
    prompts = root / "prompts.txt"
    prompts.write_text(f"make the circle red --w 64 --h 64 --s 4 --d 3 --ci {control.as_posix()}\n")
    flux_kontext_cache_latents.main(["--dataset_config", str(toml), *vae, "--device", "cpu"])
    flux_kontext_cache_text_encoder_outputs.main(["--dataset_config", str(toml), *te, "--batch_size", "16",
                                                  "--device", "cpu"])
    out = root / "out"
    flux_kontext_train_network.main([
        "--dit", str(models["dit"]), "--dataset_config", str(toml), *vae, *te, "--sdpa", "--mixed_precision", "no",
        "--network_module", "networks.lora_flux", "--network_dim", "8", "--network_alpha", "8",
        "--optimizer_type", "adamw", "--learning_rate", "3e-3", "--max_train_steps", str(STEPS),
        "--timestep_sampling", "flux_shift", "--weighting_scheme", "none", "--seed", "42",
        "--output_dir", str(out), "--output_name", "kontext", "--sample_prompts", str(prompts),
        "--sample_every_n_steps", str(STEPS),
    ])
    return {"root": root, "models": models, "data": data, "toml": toml, "te": te, "vae": vae, "control": control,
            "lora": out / "kontext.safetensors", "out": out}


def test_cache_files_have_the_reference_names_and_keys(run):
    cache = run["root"] / "cache"
    names = sorted(p.name for p in cache.iterdir())
    assert "edit_00_circle_0064x0064_fk.safetensors" in names and "edit_00_circle_fk_te.safetensors" in names
    assert len(names) == 8
    with safe_open(str(cache / "edit_00_circle_0064x0064_fk.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert f.metadata()["architecture"] == "flux_kontext"
    assert shapes == {"latents_1x8x8_float32": (16, 8, 8), "latents_control_1x8x8_float32": (16, 8, 8)}
    with safe_open(str(cache / "edit_00_circle_fk_te.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert f.metadata()["caption1"] == "make the circle red"
    assert shapes == {"t5_vec_float32": (512, 32), "clip_l_pooler_float32": (32,)}


def _eval_loss(dit, cache: Path) -> float:
    """Flow-matching loss on every cached pair at fixed timesteps and noise (no sampling randomness)."""
    losses = []
    gen = torch.Generator().manual_seed(0)
    for latent_path in sorted(cache.glob("*_fk.safetensors")):
        batch = {**read_cache(latent_path)[0], **read_cache(latent_path.with_name(
            latent_path.name.split("_0064x")[0] + "_fk_te.safetensors"))[0]}
        batch = {k: v[None].float() for k, v in batch.items()}
        for t in (250.0, 500.0, 750.0):
            noise = torch.randn(batch["latents"].shape, generator=gen)
            noisy = (1 - t / 1000) * batch["latents"] + t / 1000 * noise
            with torch.no_grad():
                pred = ARCH.predict(dit, batch, noisy, torch.tensor([t]))
            losses.append(torch.nn.functional.mse_loss(pred, noise - batch["latents"]).item())
    return sum(losses) / len(losses)


def test_training_lowers_the_loss_and_merge_lora_bakes_it_in(run):
    merged = run["root"] / "merged.safetensors"
    merge_lora.main(["--dit", str(run["models"]["dit"]), "--lora_weight", str(run["lora"]),
                     "--save_merged_model", str(merged)])
    with safe_open(str(merged), "pt") as f:
        assert all(k.startswith("model.diffusion_model.") for k in f.keys())  # the input's ComfyUI layout kept
    base = _eval_loss(load_flux_dit(run["models"]["dit"], dtype=torch.float32), run["root"] / "cache")
    trained = _eval_loss(load_flux_dit(merged, dtype=torch.float32), run["root"] / "cache")
    print(f"eval loss: base {base:.4f} -> trained {trained:.4f}")
    assert trained < base * 0.95, (base, trained)


def test_lora_file_and_training_sample(run):
    with safe_open(str(run["lora"]), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_1_linear1.lora_up.weight" in keys
    assert not any("mod_lin" in k or "modulation" in k for k in keys)
    assert meta["ss_network_module"] == "networks.lora_flux"
    assert meta["modelspec.architecture"] == "Flux.1-dev/lora"
    samples = list((run["out"] / "sample").glob("kontext_*.png"))
    assert len(samples) == 1 and Image.open(samples[0]).size == (64, 64)


def test_generate_with_control_and_lora_then_decode_the_latent(run):
    save = run["root"] / "generated"
    common = ["--dit", str(run["models"]["dit"]), *run["vae"], *run["te"], "--device", "cpu", "--save_path", str(save)]
    flux_kontext_generate_image.main([
        *common, "--lora_weight", str(run["lora"]), "--lora_multiplier", "1.0", "--prompt", "make the circle red",
        "--control_image_path", str(run["control"]), "--no_resize_control", "--image_size", "64", "64",
        "--infer_steps", "4", "--embedded_cfg_scale", "2.5", "--flow_shift", "3.0", "--seed", "7",
        "--output_type", "latent_images",
    ])
    pngs, latents = sorted(save.glob("*_7_000.png")), sorted(save.glob("*_7_latent.safetensors"))
    assert len(pngs) == 1 and len(latents) == 1
    assert Image.open(pngs[0]).size == (64, 64)
    with safe_open(str(latents[0]), "pt") as f:
        assert tuple(f.get_slice("latent").get_shape()) == (16, 8, 8)
    decoded = run["root"] / "decoded"
    flux_kontext_generate_image.main([*common[:-1], str(decoded), "--latent_path", str(latents[0])])
    again = sorted(decoded.glob("*.png"))
    assert len(again) == 1
    assert np.array_equal(np.asarray(Image.open(again[0])), np.asarray(Image.open(pngs[0])))


def test_save_merged_model_from_the_generate_script_matches_merge_lora(run):
    a, b = run["root"] / "gen_merged.safetensors", run["root"] / "tool_merged.safetensors"
    flux_kontext_generate_image.main(["--dit", str(run["models"]["dit"]), "--lora_weight", str(run["lora"]),
                                      "--save_merged_model", str(a)])
    merge_lora.main(["--dit", str(run["models"]["dit"]), "--lora_weight", str(run["lora"]),
                     "--save_merged_model", str(b)])
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert set(fa.keys()) == set(fb.keys())
        for key in fa.keys():
            assert torch.equal(fa.get_tensor(key), fb.get_tensor(key)), key


def test_missing_control_is_skipped_by_name_and_fatal_with_strict(run, tmp_path, capsys):
    data = make_edit_dataset(tmp_path / "data", count=2)
    (data["controls"] / "edit_01_square.png").unlink()
    toml = write_toml(tmp_path / "dataset.toml", data, tmp_path / "cache")
    flux_kontext_cache_latents.main(["--dataset_config", str(toml), *run["vae"], "--device", "cpu"])
    assert "edit_01_square.png" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["edit_00_circle_0064x0064_fk.safetensors"]
    with pytest.raises(SystemExit) as exc:
        flux_kontext_cache_latents.main(["--dataset_config", str(toml), *run["vae"], "--device", "cpu", "--strict"])
    assert exc.value.code == 2
    assert "edit_01_square.png" in capsys.readouterr().err


def test_no_resize_control_and_control_resolution_from_the_dataset(run, tmp_path):
    data = make_edit_dataset(tmp_path / "data", count=1)
    control = data["controls"] / "edit_00_circle.png"
    Image.open(control).resize((100, 72)).save(control)  # a control at its own, non-bucket size
    toml = write_toml(tmp_path / "dataset.toml", data, tmp_path / "cache", "no_resize_control = true\n")
    flux_kontext_cache_latents.main(["--dataset_config", str(toml), *run["vae"], "--device", "cpu"])
    (cache,) = (tmp_path / "cache").iterdir()
    with safe_open(str(cache), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    # 100x72 rounded down to 96x64 pixels -> 12x8 latents; the target stays at its 64x64 bucket
    assert shapes == {"latents_1x8x8_float32": (16, 8, 8), "latents_control_1x8x12_float32": (16, 8, 12)}


def test_control_image_sizing_at_generation(tmp_path):
    assert control_image_size(1000, 1000, True) == (1024, 1024)
    assert control_image_size(1600, 700, True) == (1568, 672)
    assert control_image_size(100, 70, False) == (96, 64)
    path = tmp_path / "c.png"
    Image.new("RGB", (100, 70), (10, 20, 30)).save(path)
    assert tuple(load_control_image(path, resize_to_preferred=False).shape) == (64, 96, 3)
    assert tuple(load_control_image(path, resize_to_preferred=True).shape) == (832, 1248, 3)  # 1.43: 1248x832


@pytest.mark.parametrize("flags, message", [
    (["--output_type", "video"], "makes images"),
    (["--image_size", "60", "64"], "--image_size HEIGHT: must be a positive multiple of 16, got 60"),
])
def test_generate_flag_errors(run, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        flux_kontext_generate_image.main(["--dit", "x", "--save_path", "y", "--prompt", "p", *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
