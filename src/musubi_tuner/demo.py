"""`make demo`: the whole workflow on a tiny built-in model and a synthetic dataset, in a few minutes on CPU.

cache latents -> cache text encoder outputs -> train a LoRA -> generate with it -> merge it into the DiT.
Every stage runs through the same command-line entry points a user runs; the tiny model files are
written in the real on-disk layouts (ComfyUI DiT, original VAE, official umT5 .pth) and loaded by the
real loaders.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

DEMO_ARCHS = ("wan", "flux_kontext")


def write_toml(path: Path, data_dirs: dict[str, Path], cache_root: Path) -> None:
    path.write_text(
        "[general]\n"
        "resolution = [64, 64]\n"
        'caption_extension = ".txt"\n'
        "batch_size = 1\n"
        "enable_bucket = true\n\n"
        "[[datasets]]\n"
        f'image_directory = "{data_dirs["images"].as_posix()}"\n'
        f'cache_directory = "{(cache_root / "images").as_posix()}"\n'
        "num_repeats = 1\n\n"
        "[[datasets]]\n"
        f'video_directory = "{data_dirs["videos"].as_posix()}"\n'
        f'cache_directory = "{(cache_root / "videos").as_posix()}"\n'
        "target_frames = [1, 9]\n"
        'frame_extraction = "head"\n'
    )


def run_step(title: str, main, argv: list[str]) -> float:
    print(f"\n=== {title} ===\n$ {main.__module__.split('.')[-1]}.py {' '.join(argv)}", flush=True)
    start = time.time()
    try:
        main(argv)
    except SystemExit as exc:  # run_cli exits non-zero on errors; the demo stops there
        if exc.code:
            raise
    return time.time() - start


def read_losses(logging_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses: list[float] = []
    for event_file in sorted(logging_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        if "loss/current" in acc.Tags().get("scalars", []):
            losses += [e.value for e in acc.Scalars("loss/current")]
    return losses


def wan_demo(out: Path, steps: int) -> dict[str, Path]:
    from musubi_tuner import merge_lora, wan_cache_latents, wan_cache_text_encoder_outputs, wan_generate_video, wan_train_network
    from musubi_tuner.architectures.wan.tiny import write_tiny_wan_files
    from musubi_tuner.architectures.wan.tiny_encoders import write_tiny_wan_encoder_files
    from musubi_tuner.demo_data import make_demo_dataset

    models = write_tiny_wan_files(out / "models", "t2v-1.3B")
    encoders = write_tiny_wan_encoder_files(out / "models")
    data = make_demo_dataset(out / "data")
    toml = out / "dataset.toml"
    write_toml(toml, data, out / "cache")
    prompts = out / "sample_prompts.txt"
    prompts.write_text("a red circle on a white background --w 64 --h 64 --f 1 --s 8 --d 1 --l 1.0\n")
    t5 = ["--t5", str(encoders["t5"]), "--t5_tokenizer", str(encoders["tokenizer"]), "--text_encoder_dtype", "float32"]
    vae = ["--vae", str(models["vae"]), "--vae_dtype", "float32"]
    lora_dir = out / "lora"
    timings = {}
    timings["cache latents"] = run_step("1/5 cache latents", wan_cache_latents.main,
                                        ["--dataset_config", str(toml), *vae, "--device", "cpu"])
    timings["cache text"] = run_step("2/5 cache text encoder outputs", wan_cache_text_encoder_outputs.main,
                                     ["--dataset_config", str(toml), *t5, "--device", "cpu"])
    timings["train"] = run_step("3/5 train a LoRA", wan_train_network.main, [
        "--task", "t2v-1.3B", "--dit", str(models["dit"]), "--dataset_config", str(toml), *vae, *t5,
        "--sdpa", "--mixed_precision", "no", "--network_module", "networks.lora_wan", "--network_dim", "8",
        "--network_alpha", "8", "--optimizer_type", "adamw", "--learning_rate", "2e-3", "--max_train_steps", str(steps),
        "--timestep_sampling", "shift", "--discrete_flow_shift", "3.0", "--seed", "42",
        "--save_every_n_steps", str(max(1, steps // 2)), "--save_state",
        "--output_dir", str(lora_dir), "--output_name", "demo_lora", "--log_with", "tensorboard",
        "--logging_dir", str(out / "logs"), "--sample_prompts", str(prompts), "--sample_every_n_steps", str(steps),
    ])
    lora = lora_dir / "demo_lora.safetensors"
    timings["generate"] = run_step("4/5 generate a clip with the LoRA", wan_generate_video.main, [
        "--task", "t2v-1.3B", "--dit", str(models["dit"]), *vae, *t5, "--lora_weight", str(lora),
        "--prompt", "a red circle moving in a circle", "--video_size", "64", "64", "--video_length", "9",
        "--infer_steps", "10", "--guidance_scale", "3.0", "--seed", "7", "--save_path", str(out / "generated"),
        "--output_type", "both", "--device", "cpu",
    ])
    merged = out / "merged" / "wan_tiny_merged.safetensors"
    timings["merge"] = run_step("5/5 merge the LoRA into the DiT", merge_lora.main, [
        "--dit", str(models["dit"]), "--lora_weight", str(lora), "--lora_multiplier", "1.0",
        "--save_merged_model", str(merged),
    ])
    outputs = {"dataset config": toml, "latent/text caches": out / "cache", "LoRA": lora,
               "checkpoints and states": lora_dir, "samples during training": lora_dir / "sample",
               "generated video": out / "generated", "merged DiT": merged, "TensorBoard logs": out / "logs",
               "tiny model files": out / "models"}
    print_summary(read_losses(out / "logs"), timings, outputs)
    return outputs


def write_kontext_toml(path: Path, data_dirs: dict[str, Path], cache_root: Path) -> None:
    path.write_text(
        "[general]\n"
        "resolution = [64, 64]\n"
        'caption_extension = ".txt"\n'
        "batch_size = 1\n"
        "enable_bucket = true\n\n"
        "[[datasets]]\n"
        f'image_directory = "{data_dirs["images"].as_posix()}"\n'
        f'control_directory = "{data_dirs["controls"].as_posix()}"\n'
        f'cache_directory = "{cache_root.as_posix()}"\n'
        "num_repeats = 1\n"
    )


def print_summary(losses: list[float], timings: dict[str, float], outputs: dict[str, Path]) -> None:
    window = max(1, min(10, len(losses) // 4))
    print("\n=== done ===")
    if losses:
        print(f"loss: first {window} steps {sum(losses[:window]) / window:.4f} -> "
              f"last {window} steps {sum(losses[-window:]) / window:.4f} ({len(losses)} steps)")
    for stage, seconds in timings.items():
        print(f"  {stage:<14} {seconds:6.1f} s")
    for what, path in outputs.items():
        print(f"  {what:<24} {path}")


def flux_kontext_demo(out: Path, steps: int) -> dict[str, Path]:
    """Kontext: learn the edit "make the <shape> red" from control/target pairs, then edit a new image."""
    from musubi_tuner import (
        flux_kontext_cache_latents,
        flux_kontext_cache_text_encoder_outputs,
        flux_kontext_generate_image,
        flux_kontext_train_network,
        merge_lora,
    )
    from musubi_tuner.architectures.flux_kontext.tiny import write_tiny_flux_kontext_files
    from musubi_tuner.demo_data import make_edit_dataset

    models = write_tiny_flux_kontext_files(out / "models", comfy_prefix=True)
    data = make_edit_dataset(out / "data")
    toml = out / "dataset.toml"
    write_kontext_toml(toml, data, out / "cache")
    control = sorted(data["controls"].iterdir())[0]
    prompts = out / "sample_prompts.txt"
    prompts.write_text(f"make the circle red --w 64 --h 64 --s 8 --d 1 --ci {control.as_posix()}\n")
    te = ["--text_encoder1", str(models["t5"]), "--text_encoder2", str(models["clip_l"]),
          "--t5_tokenizer", str(models["t5_tokenizer"]), "--clip_tokenizer", str(models["clip_tokenizer"]),
          "--text_encoder_dtype", "float32"]
    vae = ["--vae", str(models["ae"])]
    lora_dir = out / "lora"
    timings = {}
    timings["cache latents"] = run_step("1/5 cache latents", flux_kontext_cache_latents.main,
                                        ["--dataset_config", str(toml), *vae, "--device", "cpu"])
    timings["cache text"] = run_step("2/5 cache text encoder outputs", flux_kontext_cache_text_encoder_outputs.main,
                                     ["--dataset_config", str(toml), *te, "--batch_size", "16", "--device", "cpu"])
    timings["train"] = run_step("3/5 train a LoRA", flux_kontext_train_network.main, [
        "--dit", str(models["dit"]), "--dataset_config", str(toml), *vae, *te,
        "--sdpa", "--mixed_precision", "no", "--network_module", "networks.lora_flux", "--network_dim", "8",
        "--network_alpha", "8", "--optimizer_type", "adamw", "--learning_rate", "2e-3", "--max_train_steps", str(steps),
        "--timestep_sampling", "flux_shift", "--weighting_scheme", "none", "--seed", "42",
        "--save_every_n_steps", str(max(1, steps // 2)), "--save_state",
        "--output_dir", str(lora_dir), "--output_name", "demo_lora", "--log_with", "tensorboard",
        "--logging_dir", str(out / "logs"), "--sample_prompts", str(prompts), "--sample_every_n_steps", str(steps),
    ])
    lora = lora_dir / "demo_lora.safetensors"
    timings["generate"] = run_step("4/5 edit an image with the LoRA", flux_kontext_generate_image.main, [
        "--dit", str(models["dit"]), *vae, *te, "--lora_weight", str(lora), "--prompt", "make the circle red",
        "--control_image_path", str(control), "--no_resize_control", "--image_size", "64", "64",
        "--infer_steps", "10", "--embedded_cfg_scale", "2.5", "--seed", "7", "--save_path", str(out / "generated"),
        "--output_type", "latent_images", "--device", "cpu",
    ])
    merged = out / "merged" / "flux_kontext_tiny_merged.safetensors"
    timings["merge"] = run_step("5/5 merge the LoRA into the DiT", merge_lora.main, [
        "--dit", str(models["dit"]), "--lora_weight", str(lora), "--lora_multiplier", "1.0",
        "--save_merged_model", str(merged),
    ])
    outputs = {"dataset config": toml, "latent/text caches": out / "cache", "LoRA": lora,
               "checkpoints and states": lora_dir, "samples during training": lora_dir / "sample",
               "edited image": out / "generated", "merged DiT": merged, "TensorBoard logs": out / "logs",
               "tiny model files": out / "models"}
    print_summary(read_losses(out / "logs"), timings, outputs)
    return outputs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the tiny end-to-end demo")
    parser.add_argument("--arch", default="wan", choices=DEMO_ARCHS)
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--steps", type=int, default=160, help="training steps")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.output_dir).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    from musubi_tuner.cli import setup_logging

    setup_logging()
    {"wan": wan_demo, "flux_kontext": flux_kontext_demo}[args.arch](out, args.steps)


if __name__ == "__main__":
    sys.exit(main())
