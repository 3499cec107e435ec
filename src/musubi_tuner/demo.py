"""`make demo`: the whole workflow on a tiny built-in model and a synthetic dataset, in a few minutes on CPU.

cache latents -> cache text encoder outputs -> train a LoRA (with samples) -> generate with it -> merge it
into the DiT. Every stage runs through the same command-line entry points a user runs; the tiny model files
are written in the real on-disk layouts (ComfyUI/BFL DiT, official HunyuanVideo .pt DiT and VAE, original VAE,
official umT5 .pth, ComfyUI text encoders) and loaded by the real loaders.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

DEMO_ARCHS = ("wan", "flux_kontext", "hunyuan_video", "framepack")
GENERAL = '[general]\nresolution = [64, 64]\ncaption_extension = ".txt"\nbatch_size = 1\nenable_bucket = true\n'


@dataclass
class Workflow:
    """One architecture's demo: the five stages' entry points and flags, and where the outputs go."""

    out: Path
    scripts: dict[str, Callable]
    """stage -> the script's `main` (cache_latents, cache_text, train, generate)."""
    dit: Path
    vae_args: list[str]
    text_args: list[str]
    train_args: list[str]
    generate_args: list[str]
    generated: str = "generated video"
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def toml(self) -> Path:
        return self.out / "dataset.toml"

    @property
    def lora(self) -> Path:
        return self.out / "lora" / "demo_lora.safetensors"


def run_step(title: str, main, argv: list[str]) -> float:
    print(f"\n=== {title} ===\n$ {main.__module__.split('.')[-1]}.py {' '.join(argv)}", flush=True)
    start = time.time()
    try:
        main(argv)
    except SystemExit as exc:  # run_cli exits non-zero on errors; the demo stops there
        if exc.code:
            raise
    return time.time() - start


def read_losses(logging_dir: Path, tag: str = "loss/current") -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses: list[float] = []
    for event_file in sorted(logging_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            losses += [e.value for e in acc.Scalars(tag)]
    return losses


def common_train_args(out: Path, steps: int, prompts: Path | None) -> list[str]:
    """prompts: sample prompts made at the last step; None: no samples during training."""
    samples = ["--sample_prompts", str(prompts), "--sample_every_n_steps", str(steps)] if prompts else []
    return ["--sdpa", "--mixed_precision", "no", "--network_dim", "8", "--network_alpha", "8",
            "--optimizer_type", "adamw", "--learning_rate", "2e-3", "--max_train_steps", str(steps), "--seed", "42",
            "--save_every_n_steps", str(max(1, steps // 2)), "--save_state", "--output_dir", str(out / "lora"),
            "--output_name", "demo_lora", "--log_with", "tensorboard", "--logging_dir", str(out / "logs"), *samples]


def run_workflow(w: Workflow) -> dict[str, Path]:
    from musubi_tuner import merge_lora

    dataset = ["--dataset_config", str(w.toml)]
    merged = w.out / "merged" / "tiny_merged.safetensors"
    stages = [
        ("cache latents", w.scripts["cache_latents"], [*dataset, *w.vae_args, "--device", "cpu"]),
        ("cache text encoder outputs", w.scripts["cache_text"], [*dataset, *w.text_args, "--device", "cpu"]),
        ("train a LoRA", w.scripts["train"], ["--dit", str(w.dit), *dataset, *w.vae_args, *w.text_args, *w.train_args]),
    ]
    if "generate" in w.scripts:
        stages.append(("generate with the LoRA", w.scripts["generate"],
                       ["--dit", str(w.dit), *w.vae_args, *w.text_args, "--lora_weight", str(w.lora), *w.generate_args,
                        "--seed", "7", "--save_path", str(w.out / "generated"), "--device", "cpu"]))
    stages.append(("merge the LoRA into the DiT", merge_lora.main,
                   ["--dit", str(w.dit), "--lora_weight", str(w.lora), "--lora_multiplier", "1.0",
                    "--save_merged_model", str(merged)]))
    for number, (title, main, argv) in enumerate(stages, start=1):
        w.timings[title] = run_step(f"{number}/{len(stages)} {title}", main, argv)
    outputs = {"dataset config": w.toml, "latent/text caches": w.out / "cache", "LoRA": w.lora,
               "checkpoints and states": w.lora.parent, "samples during training": w.lora.parent / "sample",
               w.generated: w.out / "generated", "merged DiT": merged, "TensorBoard logs": w.out / "logs",
               "tiny model files": w.out / "models"}
    outputs = {what: path for what, path in outputs.items() if path.exists()}
    print_summary(read_losses(w.out / "logs"), w.timings, outputs, read_losses(w.out / "logs", "loss/validation"))
    return outputs


def print_summary(losses: list[float], timings: dict[str, float], outputs: dict[str, Path],
                  validation: list[float] | None = None) -> None:
    window = max(1, min(10, len(losses) // 4))
    print("\n=== done ===")
    if losses:
        print(f"loss: first {window} steps {sum(losses[:window]) / window:.4f} -> "
              f"last {window} steps {sum(losses[-window:]) / window:.4f} ({len(losses)} steps)")
    if validation:
        print(f"validation loss ([[validation_datasets]], fixed noise and timesteps): {validation[0]:.4f} -> "
              f"{validation[-1]:.4f} ({len(validation)} evaluations)")
    for stage, seconds in timings.items():
        print(f"  {stage:<28} {seconds:6.1f} s")
    for what, path in outputs.items():
        print(f"  {what:<24} {path}")


def write_image_and_video_toml(out: Path, data: dict[str, Path]) -> None:
    """`dataset.toml` for `make_demo_dataset`'s images (10 % caption dropout) and clips (1- and 9-frame windows from
    each clip's head), plus held-out images as `[[validation_datasets]]`."""
    from musubi_tuner.demo_data import make_validation_images

    held_out = make_validation_images(out / "data" / "validation")
    (out / "dataset.toml").write_text(
        f'{GENERAL}\n[[datasets]]\nimage_directory = "{data["images"].as_posix()}"\n'
        f'cache_directory = "{(out / "cache" / "images").as_posix()}"\ncaption_dropout_rate = 0.1\n\n'
        f'[[datasets]]\nvideo_directory = "{data["videos"].as_posix()}"\n'
        f'cache_directory = "{(out / "cache" / "videos").as_posix()}"\ntarget_frames = [1, 9]\nframe_extraction = "head"\n\n'
        f'[[validation_datasets]]\nimage_directory = "{held_out.as_posix()}"\n'
        f'cache_directory = "{(out / "cache" / "validation").as_posix()}"\n')


def wan_demo(out: Path, steps: int) -> dict[str, Path]:
    """Wan: images and short clips of moving shapes; generate a 9-frame clip."""
    from musubi_tuner import wan_cache_latents, wan_cache_text_encoder_outputs, wan_generate_video, wan_train_network
    from musubi_tuner.architectures.wan.tiny import write_tiny_wan_files
    from musubi_tuner.architectures.wan.tiny_encoders import write_tiny_wan_encoder_files
    from musubi_tuner.demo_data import make_demo_dataset

    models = write_tiny_wan_files(out / "models", "t2v-1.3B")
    encoders = write_tiny_wan_encoder_files(out / "models")
    data = make_demo_dataset(out / "data")
    write_image_and_video_toml(out, data)
    prompts = out / "sample_prompts.txt"
    prompts.write_text("a red circle on a white background --w 64 --h 64 --f 1 --s 8 --d 1 --l 1.0\n")
    task = ["--task", "t2v-1.3B"]
    return run_workflow(Workflow(
        out=out, dit=models["dit"],
        scripts={"cache_latents": wan_cache_latents.main, "cache_text": wan_cache_text_encoder_outputs.main,
                 "train": wan_train_network.main, "generate": wan_generate_video.main},
        vae_args=["--vae", str(models["vae"]), "--vae_dtype", "float32"],
        text_args=["--t5", str(encoders["t5"]), "--t5_tokenizer", str(encoders["tokenizer"]),
                   "--text_encoder_dtype", "float32"],
        train_args=[*task, "--network_module", "networks.lora_wan", "--timestep_sampling", "shift",
                    "--discrete_flow_shift", "3.0", *common_train_args(out, steps, prompts),
                    "--validate_every_n_steps", str(max(1, steps // 4))],
        generate_args=[*task, "--prompt", "a red circle moving in a circle", "--video_size", "64", "64",
                       "--video_length", "9", "--infer_steps", "10", "--guidance_scale", "3.0", "--output_type", "both"],
    ))


def flux_kontext_demo(out: Path, steps: int) -> dict[str, Path]:
    """Kontext: learn the edit "make the <shape> red" from control/target pairs, then edit a control image."""
    from musubi_tuner import (
        flux_kontext_cache_latents,
        flux_kontext_cache_text_encoder_outputs,
        flux_kontext_generate_image,
        flux_kontext_train_network,
    )
    from musubi_tuner.architectures.flux_kontext.tiny import write_tiny_flux_kontext_files
    from musubi_tuner.demo_data import make_edit_dataset

    models = write_tiny_flux_kontext_files(out / "models", comfy_prefix=True)
    data = make_edit_dataset(out / "data")
    (out / "dataset.toml").write_text(
        f'{GENERAL}\n[[datasets]]\nimage_directory = "{data["images"].as_posix()}"\n'
        f'control_directory = "{data["controls"].as_posix()}"\ncache_directory = "{(out / "cache").as_posix()}"\n')
    control = sorted(data["controls"].iterdir())[0]
    prompts = out / "sample_prompts.txt"
    prompts.write_text(f"make the circle red --w 64 --h 64 --s 8 --d 1 --ci {control.as_posix()}\n")
    return run_workflow(Workflow(
        out=out, dit=models["dit"], generated="edited image",
        scripts={"cache_latents": flux_kontext_cache_latents.main, "cache_text": flux_kontext_cache_text_encoder_outputs.main,
                 "train": flux_kontext_train_network.main, "generate": flux_kontext_generate_image.main},
        vae_args=["--vae", str(models["ae"])],
        text_args=["--text_encoder1", str(models["t5"]), "--text_encoder2", str(models["clip_l"]),
                   "--t5_tokenizer", str(models["t5_tokenizer"]), "--clip_tokenizer", str(models["clip_tokenizer"]),
                   "--text_encoder_dtype", "float32"],
        train_args=["--network_module", "networks.lora_flux", "--timestep_sampling", "flux_shift",
                    "--weighting_scheme", "none", *common_train_args(out, steps, prompts)],
        generate_args=["--prompt", "make the circle red", "--control_image_path", str(control), "--no_resize_control",
                       "--image_size", "64", "64", "--infer_steps", "10", "--embedded_cfg_scale", "2.5",
                       "--output_type", "latent_images"],
    ))


def hunyuan_video_demo(out: Path, steps: int) -> dict[str, Path]:
    """HunyuanVideo: the official `.pt` DiT and VAE layouts, LLaVA-LLaMA-3 + CLIP-L; generate a 9-frame clip."""
    from musubi_tuner import cache_latents, cache_text_encoder_outputs, hv_generate_video, hv_train_network
    from musubi_tuner.architectures.hunyuan_video.tiny import write_tiny_hv_dit
    from musubi_tuner.demo_data import make_demo_dataset
    from musubi_tuner.models.hunyuan_video.tiny_text import write_tiny_hunyuan_text_files
    from musubi_tuner.models.hunyuan_video.tiny_vae import write_tiny_hv_vae

    dit = write_tiny_hv_dit(out / "models", "official_pt")
    vae = write_tiny_hv_vae(out / "models" / "vae", "official_pt")
    text = write_tiny_hunyuan_text_files(out / "models" / "text")
    data = make_demo_dataset(out / "data", fps=24.0)
    write_image_and_video_toml(out, data)
    prompts = out / "sample_prompts.txt"
    prompts.write_text("a red circle on a white background --w 64 --h 64 --f 1 --s 8 --d 1 --fs 7.0\n")
    return run_workflow(Workflow(
        out=out, dit=dit,
        scripts={"cache_latents": cache_latents.main, "cache_text": cache_text_encoder_outputs.main,
                 "train": hv_train_network.main, "generate": hv_generate_video.main},
        vae_args=["--vae", str(vae), "--vae_dtype", "float32", "--vae_chunk_size", "32", "--vae_tiling"],
        text_args=["--text_encoder1", str(text["llm"]), "--text_encoder2", str(text["clip_l"]),
                   "--llm_tokenizer", str(text["llm_tokenizer"]), "--clip_tokenizer", str(text["clip_tokenizer"]),
                   "--text_encoder_dtype", "float32"],
        train_args=["--network_module", "networks.lora", "--timestep_sampling", "shift", "--discrete_flow_shift", "7.0",
                    *common_train_args(out, steps, prompts), "--validate_every_n_steps", str(max(1, steps // 4))],
        generate_args=["--prompt", "a red circle moving in a circle", "--video_size", "64", "64", "--video_length", "9",
                       "--infer_steps", "10", "--embedded_cfg_scale", "6.0", "--output_type", "both"],
    ))


def framepack_demo(out: Path, steps: int) -> dict[str, Path]:
    """FramePack: lllyasviel's 3-shard DiT layout, the HunyuanVideo VAE and text encoders, a ComfyUI SigLIP file;
    17-frame clips cut into per-section caches (fp_latent_window_size 2: 2 sections each). Image-to-video: the
    sample during training and the generated video start from the first clip's first frame."""
    from PIL import Image

    from musubi_tuner import (
        fpack_cache_latents,
        fpack_cache_text_encoder_outputs,
        fpack_generate_video,
        fpack_train_network,
    )
    from musubi_tuner.architectures.framepack.tiny import save_tiny_framepack
    from musubi_tuner.demo_data import make_demo_dataset
    from musubi_tuner.models.hunyuan_video.tiny_text import write_tiny_hunyuan_text_files
    from musubi_tuner.models.hunyuan_video.tiny_vae import write_tiny_hv_vae
    from musubi_tuner.models.siglip_files import save_tiny_siglip

    dit = save_tiny_framepack(out / "models" / "dit", "shards")
    vae = write_tiny_hv_vae(out / "models" / "vae", "official_pt")
    siglip = save_tiny_siglip(out / "models" / "image_encoder", "comfy")
    text = write_tiny_hunyuan_text_files(out / "models" / "text")
    data = make_demo_dataset(out / "data", frames=17, fps=30.0)
    (out / "dataset.toml").write_text(
        f'{GENERAL}\n[[datasets]]\nvideo_directory = "{data["videos"].as_posix()}"\n'
        f'cache_directory = "{(out / "cache").as_posix()}"\ntarget_frames = [17]\nframe_extraction = "head"\n'
        'fp_latent_window_size = 2\n')
    start = out / "data" / "start_frame.png"
    Image.open(min(data["images"].glob("*.png"))).save(start)
    prompts = out / "sample_prompts.txt"
    # --f 9 at --latent_window_size 2: one section (9 frames), as the reference trainer counts sections
    prompts.write_text(f"a red circle moving in a circle --i {start.as_posix()} --w 64 --h 64 --f 9 --s 8 --d 1\n")
    return run_workflow(Workflow(
        out=out, dit=dit,
        scripts={"cache_latents": fpack_cache_latents.main, "cache_text": fpack_cache_text_encoder_outputs.main,
                 "train": fpack_train_network.main, "generate": fpack_generate_video.main},
        vae_args=["--vae", str(vae), "--vae_dtype", "float32", "--vae_chunk_size", "32", "--image_encoder",
                  str(siglip)],
        text_args=["--text_encoder1", str(text["llm"]), "--text_encoder2", str(text["clip_l"]),
                   "--llm_tokenizer", str(text["llm_tokenizer"]), "--clip_tokenizer", str(text["clip_tokenizer"]),
                   "--text_encoder_dtype", "float32"],
        train_args=["--network_module", "networks.lora_framepack", "--timestep_sampling", "shift",
                    "--discrete_flow_shift", "3.0", "--weighting_scheme", "none", "--latent_window_size", "2",
                    *common_train_args(out, steps, prompts)],
        generate_args=["--prompt", "a red circle moving in a circle", "--image_path", str(start),
                       "--video_size", "64", "64", "--latent_window_size", "2", "--video_sections", "1",
                       "--infer_steps", "8", "--output_type", "both"],
    ))


DEMO_MARKER = ".musubi_tuner_demo"
"""Written into every demo output folder: only a folder holding it is replaced by the next demo run."""


def prepare_output_dir(out: Path) -> None:
    """A fresh folder for the demo. A previous demo's folder is replaced (and the replacement is said); any other
    non-empty folder is refused rather than deleted: it may hold the user's data."""
    from musubi_tuner.errors import UserError

    if out.is_file():
        raise UserError(f"--output_dir {out} is a file; give a folder")
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).exists():
            raise UserError(f"--output_dir {out} is not empty and was not written by the demo; nothing was deleted. "
                            "Give an empty or new folder")
        print(f"replacing the previous demo output in {out}")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by `python -m musubi_tuner.demo`; the next demo run replaces this folder\n")


def run_demo(args: argparse.Namespace) -> None:
    out = Path(args.output_dir).resolve()
    prepare_output_dir(out)
    demos = {"wan": wan_demo, "flux_kontext": flux_kontext_demo, "hunyuan_video": hunyuan_video_demo,
             "framepack": framepack_demo}
    demos[args.arch](out, args.steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the tiny end-to-end demo")
    parser.add_argument("--arch", default="wan", choices=DEMO_ARCHS)
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--steps", type=int, default=160, help="training steps")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from musubi_tuner.cli import run_cli

    run_cli(lambda _: run_demo(args), [])


if __name__ == "__main__":
    sys.exit(main())
