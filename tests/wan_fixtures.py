"""Shared set-up for Wan end-to-end tests: tiny model files in the real layouts and a small dataset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from musubi_tuner.architectures.wan.tiny import write_tiny_wan_files
from musubi_tuner.architectures.wan.tiny_encoders import write_tiny_wan_encoder_files
from musubi_tuner.demo_data import COLORS, moving_clip


def run(main, argv: list[str]) -> int:
    """Run a CLI `main`; its exit code (0 on success, 2 for a user error)."""
    try:
        main(argv)
    except SystemExit as exc:
        return exc.code or 0
    return 0


@dataclass
class WanWorkspace:
    root: Path
    dit: Path
    vae: Path
    t5: Path
    tokenizer: Path
    toml: Path

    @property
    def vae_args(self) -> list[str]:
        return ["--vae", str(self.vae), "--vae_dtype", "float32"]

    @property
    def t5_args(self) -> list[str]:
        return ["--t5", str(self.t5), "--t5_tokenizer", str(self.tokenizer), "--text_encoder_dtype", "float32"]

    def train_args(self, output_dir: Path, steps: int, *extra: str) -> list[str]:
        return ["--task", "t2v-1.3B", "--dit", str(self.dit), "--dataset_config", str(self.toml), *self.vae_args,
                *self.t5_args, "--mixed_precision", "no", "--network_dim", "4", "--network_alpha", "4",
                "--optimizer_type", "adamw", "--learning_rate", "1e-3", "--max_train_steps", str(steps),
                "--seed", "123", "--output_dir", str(output_dir), "--output_name", "lora", *extra]


def write_clip_dataset(root: Path, n_images: int = 2, clip_frames: int = 5) -> Path:
    """Images + one short clip with captions, and the TOML for them; returns the TOML path."""
    from PIL import Image

    from musubi_tuner.inference.outputs import save_video_mp4

    images, videos = root / "images", root / "videos"
    images.mkdir(parents=True)
    videos.mkdir(parents=True)
    for i, (name, color) in enumerate(list(COLORS.items())[:n_images]):
        Image.fromarray(moving_clip(32, 1, "circle", color, phase=i)[0]).save(images / f"{name}_dot.png")
        (images / f"{name}_dot.txt").write_text(f"a {name} dot")
    save_video_mp4(moving_clip(32, clip_frames, "square", COLORS["blue"], 0.0), videos / "blue_square.mp4", 16)
    (videos / "blue_square.txt").write_text("a blue square moving")
    toml = root / "dataset.toml"
    toml.write_text(
        '[general]\nresolution = [32, 32]\ncaption_extension = ".txt"\nbatch_size = 1\nenable_bucket = true\n\n'
        f'[[datasets]]\nimage_directory = "{images.as_posix()}"\ncache_directory = "{(root / "cache_img").as_posix()}"\n\n'
        f'[[datasets]]\nvideo_directory = "{videos.as_posix()}"\ncache_directory = "{(root / "cache_vid").as_posix()}"\n'
        f'target_frames = [{clip_frames}]\nframe_extraction = "head"\n'
    )
    return toml


def make_workspace(root: Path) -> WanWorkspace:
    models = write_tiny_wan_files(root / "models", "t2v-1.3B")
    encoders = write_tiny_wan_encoder_files(root / "models")
    toml = write_clip_dataset(root / "data")
    return WanWorkspace(root=root, dit=models["dit"], vae=models["vae"], t5=encoders["t5"],
                        tokenizer=encoders["tokenizer"], toml=toml)


def make_cached_workspace(root: Path) -> WanWorkspace:
    """`make_workspace` with the latent and text caches written through the CLIs."""
    from musubi_tuner import wan_cache_latents, wan_cache_text_encoder_outputs

    ws = make_workspace(root)
    assert run(wan_cache_latents.main, ["--dataset_config", str(ws.toml), *ws.vae_args, "--device", "cpu"]) == 0
    assert run(wan_cache_text_encoder_outputs.main, ["--dataset_config", str(ws.toml), *ws.t5_args, "--device", "cpu"]) == 0
    return ws


def eval_flow_loss(dit_path: Path, lora_path: Path | None, caches: list[tuple[Path, Path]],
                   timesteps: tuple[float, ...] = (0.3, 0.6, 0.9)) -> float:
    """Flow-matching loss of DiT(+LoRA) over (latent cache, text cache) pairs at fixed timesteps and seeded noise;
    every cached entry (control latents, one-frame layout ...) goes into the batch as training gives it."""
    import torch

    from musubi_tuner.architectures.wan import WanArchitecture
    from musubi_tuner.architectures.wan.dit_files import load_wan_dit
    from musubi_tuner.dataset.cache_files import read_cache
    from musubi_tuner.inference.lora_merge import merge_loras_into_dit

    arch = WanArchitecture()
    dit = load_wan_dit(dit_path, dtype=torch.float32)
    if lora_path is not None:
        merge_loras_into_dit(arch, dit, [str(lora_path)], [1.0])
    losses, gen = [], torch.Generator().manual_seed(0)
    for latent_cache, text_cache in caches:
        cache, _ = read_cache(latent_cache)
        text, _ = read_cache(text_cache)
        batch = {k: v[None] for k, v in cache.items()} | {"t5": [text["t5"]]}
        x0 = batch["latents"].float()
        for t in timesteps:
            noise = torch.randn(x0.shape, generator=gen)
            with torch.no_grad():
                pred = arch.predict(dit, batch, (1 - t) * x0 + t * noise, torch.tensor([t * 1000.0]))
            losses.append(torch.mean((pred - (noise - x0)) ** 2).item())
    return sum(losses) / len(losses)
