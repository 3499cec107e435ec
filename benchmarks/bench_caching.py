"""Latent caching throughput (items/s) through the real caching driver (`caching.run_latent_caching`).

For each VAE size (the tiny test preset and a mid-size one; `--vae_base_dims`) and each item kind (images,
9-frame and 17-frame clips), a synthetic dataset is written (PNG images / H.264 mp4 clips of moving shapes
with captions), then `run_latent_caching` caches it exactly as `wan_cache_latents.py` would: decode media
in worker threads, encode with the Wan VAE, write `*_wan.safetensors` files. The VAE load is timed apart,
so items/s is the steady throughput of decode + encode + write.

The published Wan2.1 VAE has base width 96 (`--vae_base_dims 8 32 96` to include it; slow on CPU).

Usage: python benchmarks/bench_caching.py [--size 128] [--items 8] [--vae_base_dims 8 32] [--device cpu]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_util import machine_description, offline_environment, print_table, stopwatch  # noqa: E402

KINDS = {"image": 1, "9-frame clip": 9, "17-frame clip": 17}


def write_media(root: Path, kind: str, frames: int, items: int, size: int) -> Path:
    """`items` images or clips with captions in `root`; returns the folder."""
    from PIL import Image

    from musubi_tuner.demo_data import COLORS, SHAPES, moving_clip
    from musubi_tuner.inference.outputs import save_video_mp4

    root.mkdir(parents=True)
    colors = list(COLORS.items())
    for i in range(items):
        name, color = colors[i % len(colors)]
        shape = SHAPES[i % len(SHAPES)]
        stem = f"{kind.split('-')[0].replace(' ', '_')}_{i:03d}_{name}_{shape}"
        clip = moving_clip(size, frames, shape, color, phase=0.7 * i)
        if frames == 1:
            Image.fromarray(clip[0]).save(root / f"{stem}.png")
        else:
            save_video_mp4(clip, root / f"{stem}.mp4", 16.0)
        (root / f"{stem}.txt").write_text(f"a {name} {shape}")
    return root


def write_toml(path: Path, media: Path, cache: Path, frames: int, size: int, batch_size: int) -> Path:
    source = "image_directory" if frames == 1 else "video_directory"
    video = "" if frames == 1 else f'target_frames = [{frames}]\nframe_extraction = "head"\n'
    path.write_text(f'[general]\nresolution = [{size}, {size}]\ncaption_extension = ".txt"\n'
                    f'batch_size = {batch_size}\nenable_bucket = true\n\n'
                    f'[[datasets]]\n{source} = "{media.as_posix()}"\ncache_directory = "{cache.as_posix()}"\n{video}')
    return path


def write_vae(path: Path, base_dim: int) -> None:
    import torch
    from diffusers import AutoencoderKLWan

    from musubi_tuner.architectures.wan.vae_files import save_wan_vae_original

    torch.manual_seed(0)
    save_wan_vae_original(AutoencoderKLWan.from_config({"base_dim": base_dim, "z_dim": 16}), path)


def caching_args(toml: Path, vae: Path, device: str, dtype: str) -> argparse.Namespace:
    """The namespace `wan_cache_latents.py` would parse."""
    from musubi_tuner.architectures import get_architecture
    from musubi_tuner.caching import add_common_caching_arguments

    parser = argparse.ArgumentParser()
    add_common_caching_arguments(parser)
    parser.add_argument("--vae")
    parser.add_argument("--vae_dtype")
    get_architecture("wan").add_arguments(parser, "cache_latents")
    return parser.parse_args(["--dataset_config", str(toml), "--vae", str(vae), "--vae_dtype", dtype,
                              "--device", device])


def run_one(toml: Path, vae: Path, device: str, dtype: str) -> tuple[int, float, float]:
    """(items written, seconds without the VAE load, VAE load seconds)."""
    from musubi_tuner.architectures.wan.architecture import WanArchitecture
    from musubi_tuner.caching import run_latent_caching

    class TimedWan(WanArchitecture):
        load_seconds = 0.0

        def load_latent_encoders(self, args, device):
            with stopwatch() as elapsed:
                encoders = super().load_latent_encoders(args, device)
            TimedWan.load_seconds = elapsed[0]
            return encoders

    arch = TimedWan()
    args = caching_args(toml, vae, device, dtype)
    arch.validate_arguments(args, "cache_latents")
    with stopwatch() as total:
        summary = run_latent_caching(arch, args)
    return summary.written, total[0] - TimedWan.load_seconds, TimedWan.load_seconds


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=128, help="media side in pixels (multiple of 16)")
    parser.add_argument("--items", type=int, default=4, help="items per kind")
    parser.add_argument("--vae_base_dims", type=int, nargs="+", default=[8, 32],
                        help="VAE base widths (8 = tiny preset, 96 = published Wan2.1 VAE)")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--vae_dtype", default=None, help="default: bfloat16 on a GPU, float32 on CPU")
    parser.add_argument("--work_dir", type=Path, default=None, help="default: a temp folder, removed afterwards")
    args = parser.parse_args(argv)
    offline_environment()
    logging.basicConfig(level=logging.WARNING)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.vae_dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    start = time.perf_counter()
    rows, results = [], []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        root = Path(tmp)
        tomls = {}
        for kind in args.kinds:
            frames = KINDS[kind]
            media = write_media(root / "media" / kind.replace(" ", "_"), kind, frames, args.items, args.size)
            tomls[kind] = (frames, media)
        for base_dim in args.vae_base_dims:
            vae = root / f"wan_vae_base{base_dim}.safetensors"
            write_vae(vae, base_dim)
            if not results:  # warm-up (first-call costs: lazy imports, allocator, decoder start-up), not timed
                frames, media = next(iter(tomls.values()))
                run_one(write_toml(root / "warmup.toml", media, root / "cache" / "warmup", frames, args.size, 1),
                        vae, device, dtype)
            for kind, (frames, media) in tomls.items():
                cache = root / "cache" / f"{base_dim}_{kind.replace(' ', '_')}"
                toml = write_toml(root / f"{base_dim}_{frames}.toml", media, cache, frames, args.size, args.batch_size)
                written, seconds, load_s = run_one(toml, vae, device, dtype)
                result = {"vae_base_dim": base_dim, "kind": kind, "items": written, "seconds": seconds,
                          "items_per_s": written / seconds, "frames_per_s": written * frames / seconds,
                          "load_s": load_s}
                results.append(result)
                rows.append([f"base {base_dim}" + (" (tiny)" if base_dim == 8 else " (published)" if base_dim == 96
                                                   else ""), kind, written, seconds, result["items_per_s"],
                             result["frames_per_s"], load_s])
    print(f"# bench_caching: Wan latent caching via run_latent_caching, {args.size}x{args.size} px, "
          f"batch size {args.batch_size}, {device} {dtype}")
    print(f"# machine: {machine_description()}")
    print_table(["VAE", "items", "n", "seconds", "items/s", "frames/s", "VAE load s"], rows)
    print(f"(bench_caching took {time.perf_counter() - start:.0f} s)")
    return results


if __name__ == "__main__":
    main()
