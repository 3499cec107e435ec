"""Trainer step time against a bare forward + backward + AdamW step of the same model, LoRA and batch.

Builds (in a temp folder) a small-but-not-tiny Wan DiT in the original single-file layout and a latent +
text-encoder cache that the real trainer reads, then:

1. runs `NetworkTrainer` (the code behind `wan_train_network.py`) for warm-up + N steps and times each step
   from the end of one to the end of the next (batch loading, noise and timestep sampling, forward, loss,
   backward, optimizer and scheduler step, progress bar: everything the loop does);
2. runs a bare loop on the same DiT file, LoRA rank/alpha and one cached batch held in memory: forward,
   MSE loss, backward, `torch.optim.AdamW` step, `zero_grad`.

It prints the median step times and the overhead ratio (trainer / bare); 1.00 means no overhead.
`--bare_only` times the bare loop alone.

`--arch hunyuan_video --bare_only` times the bare loop on a HunyuanVideo DiT at its released widths with
`--hv_blocks` blocks (random bf16 weights in ComfyUI's layout, loaded by `load_hv_dit`), random LLM/CLIP text
features and embedded guidance 1.0; the LoRA covers the reference's targets (the block Linears but modulation).

Usage: python benchmarks/bench_train_overhead.py [--dim 512 --layers 4 --size 256 --frames 1 --steps 12 ...]
       python benchmarks/bench_train_overhead.py --arch hunyuan_video --bare_only [--hv_blocks 1 2 --size 128 ...]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported inside the functions so that --help stays fast
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_util import machine_description, median, offline_environment, print_table, stopwatch  # noqa: E402


# ---- inputs -----------------------------------------------------------------------------------------------------
def write_dit(path: Path, args: argparse.Namespace) -> dict:
    """A seeded WanTransformer3DModel of the requested size, saved in the original layout (bf16)."""
    import torch
    from diffusers import WanTransformer3DModel

    from musubi_tuner.architectures.wan.dit_files import HEAD_DIM, _diffusers_config, save_wan_dit_original

    config = _diffusers_config(dim=args.dim, num_heads=args.dim // HEAD_DIM, num_layers=args.layers,
                               ffn_dim=args.ffn_dim or 4 * args.dim, in_dim=16, mode="t2v", text_dim=args.text_dim)
    torch.manual_seed(0)
    model = WanTransformer3DModel.from_config(config)
    save_wan_dit_original(model, path, dtype=torch.bfloat16)
    return config


def write_dataset(root: Path, args: argparse.Namespace) -> Path:
    """Random latent and text caches named as the caching scripts name them, and the TOML that points at them."""
    import torch

    from musubi_tuner.architectures.wan.architecture import WanArchitecture
    from musubi_tuner.dataset.cache_files import latent_cache_name, latent_metadata, text_cache_name, write_cache

    traits = WanArchitecture.traits
    images, cache = root / "images", root / "cache"
    images.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    latent_frames = (args.frames - 1) // 4 + 1
    shape = (16, latent_frames, args.size // 8, args.size // 8)
    for i in range(args.items):
        stem = f"item{i:03d}"
        latents = torch.randn(shape, generator=generator).to(torch.bfloat16)
        write_cache(cache / latent_cache_name(stem, (args.size, args.size), traits.cache_code), {"latents": latents},
                    traits, latent_metadata((args.size, args.size), None))
        t5 = torch.randn(args.text_tokens, args.text_dim, generator=generator).to(torch.bfloat16)
        write_cache(cache / text_cache_name(stem, traits.cache_code), {"varlen_t5": t5}, traits,
                    {"caption1": f"caption {i}"})
    toml = root / "dataset.toml"
    toml.write_text(f'[general]\nresolution = [{args.size}, {args.size}]\nbatch_size = {args.batch_size}\n'
                    'caption_extension = ".txt"\n\n'
                    f'[[datasets]]\nimage_directory = "{images.as_posix()}"\ncache_directory = "{cache.as_posix()}"\n')
    return toml


def training_argv(dit: Path, toml: Path, out: Path, args: argparse.Namespace, steps: int) -> list[str]:
    argv = ["--task", "t2v-1.3B", "--dit", str(dit), "--dataset_config", str(toml), "--sdpa",
            "--mixed_precision", args.mixed_precision, "--network_module", "networks.lora_wan",
            "--network_dim", str(args.network_dim), "--network_alpha", str(args.network_dim),
            "--optimizer_type", "adamw", "--learning_rate", "1e-4", "--max_train_steps", str(steps),
            "--timestep_sampling", "shift", "--discrete_flow_shift", "3.0", "--seed", "0",
            "--output_dir", str(out), "--output_name", "bench"]
    if args.gradient_checkpointing:
        argv.append("--gradient_checkpointing")
    if args.fp8_base:
        argv.append("--fp8_base")
    return argv


# ---- the two loops ------------------------------------------------------------------------------------------------
def run_trainer(argv: list[str]) -> tuple[list[float], float]:
    """Per-step seconds (end of step to end of step; the first from the end of set-up) and the total wall time."""
    from musubi_tuner.architectures import get_architecture
    from musubi_tuner.training.cli import parse_training_args
    from musubi_tuner.training.trainer import NetworkTrainer

    class TimedTrainer(NetworkTrainer):
        """Records when each step ends; the loop itself is untouched."""

        def _run_epochs(self) -> None:
            self.step_ends = [time.perf_counter()]
            super()._run_epochs()

        def _after_step(self, loss: float) -> None:
            super()._after_step(loss)
            self.step_ends.append(time.perf_counter())

    arch = get_architecture("wan")
    trainer = TimedTrainer(arch, parse_training_args(arch, argv))
    with stopwatch() as total:
        trainer.train()
    ends = trainer.step_ends
    return [b - a for a, b in zip(ends, ends[1:])], total[0]


def bare_precision(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)


def wan_bare_inputs(dit_path: Path, toml: Path, args: argparse.Namespace) -> tuple:
    """(DiT, latents, forward(noisy, t)) for Wan: the first cached batch of the dataset, held in memory."""
    import torch

    from musubi_tuner.architectures import get_architecture
    from musubi_tuner.architectures.wan.architecture import pad_text_embeddings
    from musubi_tuner.architectures.wan.dit_files import load_wan_dit
    from musubi_tuner.dataset.batches import CachedBatches
    from musubi_tuner.dataset.config import load_dataset_config

    traits = get_architecture("wan").traits
    device, dtype = bare_precision(args)
    dit = load_wan_dit(dit_path, device=device, dtype=dtype)
    batches = CachedBatches(load_dataset_config(toml, traits), traits, seed=0)
    batch = batches.load_batch(batches.batches_for_epoch(0)[0])
    latents = batch["latents"].to(device, torch.float32)
    context = pad_text_embeddings([t.to(device) for t in batch["t5"]]).to(dtype)

    def forward(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return dit(hidden_states=noisy.to(dtype), timestep=t * 1000, encoder_hidden_states=context,
                   return_dict=False)[0]

    return dit, latents, forward


def hv_bare_inputs(dit_path: Path, args: argparse.Namespace) -> tuple:
    """(DiT, latents, forward(noisy, t)) for HunyuanVideo: random latents and text-encoder outputs of the widths
    the file has (released: LLM 4096, CLIP pooled 768), every text token valid, embedded guidance 1.0 as the
    reference trains."""
    import torch

    from musubi_tuner.architectures.hunyuan_video.dit_files import load_hv_dit

    device, dtype = bare_precision(args)
    dit = load_hv_dit(dit_path, device=device, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    b = args.batch_size
    config = dit.config
    latents = torch.randn(b, config.in_channels, (args.frames - 1) // 4 + 1, args.size // 8, args.size // 8,
                          generator=generator)
    text = torch.randn(b, args.text_tokens, config.text_embed_dim, generator=generator).to(device, dtype)
    text_mask = torch.ones(b, args.text_tokens, dtype=torch.bool, device=device)
    pooled = torch.randn(b, config.pooled_projection_dim, generator=generator).to(device, dtype)
    guidance = torch.full((b,), 1000.0, device=device, dtype=dtype)  # --guidance_scale 1.0, x1000 as the reference

    def forward(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return dit(hidden_states=noisy.to(dtype), timestep=t * 1000, encoder_hidden_states=text,
                   encoder_attention_mask=text_mask, pooled_projections=pooled, guidance=guidance,
                   return_dict=False)[0]

    return dit, latents.to(device), forward


def attach_lora(arch_name: str, dit, args: argparse.Namespace):
    """fp8 storage and gradient checkpointing as the trainer applies them, then a LoRA of rank and alpha
    --network_dim on the family's default targets; returns the network (in training mode)."""
    from musubi_tuner.architectures import get_architecture
    from musubi_tuner.memory.fp8 import store_dit_in_fp8
    from musubi_tuner.networks import lora

    arch = get_architecture(arch_name)
    if args.fp8_base:
        store_dit_in_fp8(dit, arch.fp8_targets, scaled=False)
    if args.gradient_checkpointing:
        dit.enable_gradient_checkpointing()
    network = lora.create_network(arch, dit, args.network_dim, args.network_dim)
    network.to(bare_precision(args)[0])
    network.apply_to()
    network.train()
    return network


def run_bare(network, latents, forward, args: argparse.Namespace, steps: int) -> list[float]:
    """forward + MSE + backward + AdamW on `network`'s parameters, one batch held in memory; per-step seconds."""
    import torch

    device, dtype = bare_precision(args)
    optimizer = torch.optim.AdamW(network.prepare_optimizer_params(1e-4), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        noise = torch.randn_like(latents)
        t = torch.rand(latents.shape[0], device=device)
        noisy = (1 - t.view(-1, 1, 1, 1, 1)) * latents + t.view(-1, 1, 1, 1, 1) * noise
        with autocast:
            pred = forward(noisy, t)
        loss = torch.nn.functional.mse_loss(pred.float(), noise - latents)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the trainer reads the loss every step, which also waits for the GPU
        times.append(time.perf_counter() - start)
    return times


# ---- main -----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="wan", choices=("wan", "hunyuan_video"),
                        help="wan: a Wan DiT sized by --dim/--layers/--ffn_dim/--text_dim; hunyuan_video: the "
                             "released widths with --hv_blocks blocks (bare loop only, needs --bare_only)")
    parser.add_argument("--bare_only", action="store_true", help="time only the bare loop, not the trainer")
    parser.add_argument("--dim", type=int, default=512, help="Wan DiT width (a multiple of 128)")
    parser.add_argument("--layers", type=int, default=4, help="Wan DiT blocks")
    parser.add_argument("--ffn_dim", type=int, default=None, help="Wan FFN width; default 4 x dim")
    parser.add_argument("--text_dim", type=int, default=4096, help="umT5 width (4096 as in the real model)")
    parser.add_argument("--hv_blocks", type=int, nargs=2, default=[1, 2], metavar=("DOUBLE", "SINGLE"),
                        help="HunyuanVideo double and single blocks (released: 20 40)")
    parser.add_argument("--text_tokens", type=int, default=64,
                        help="prompt length (Wan: before padding to 512; HunyuanVideo: all valid, no padding)")
    parser.add_argument("--size", type=int, default=256, help="image/video side in pixels (latent side = size/8)")
    parser.add_argument("--frames", type=int, default=1, help="4N+1 frames per item")
    parser.add_argument("--items", type=int, default=8, help="cached items")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--network_dim", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12, help="measured steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--mixed_precision", default=None, choices=("no", "bf16", "fp16"),
                        help="default: bf16 on a GPU, no (fp32) on CPU")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--fp8_base", action="store_true")
    parser.add_argument("--work_dir", type=Path, default=None, help="default: a temp folder, removed afterwards")
    args = parser.parse_args(argv)
    if args.mixed_precision is None:
        import torch

        args.mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    if args.dim % 128 or (args.frames - 1) % 4 or args.size % 16:
        parser.error("--dim must be a multiple of 128, --frames 4N+1, --size a multiple of 16")
    if args.arch == "hunyuan_video" and not args.bare_only:
        parser.error("--arch hunyuan_video: the trainer loop cannot be timed for this family yet; add --bare_only")
    if min(args.hv_blocks) < 1:
        parser.error("--hv_blocks needs at least one double and one single block")
    return args


def describe_run(args: argparse.Namespace, model: str) -> str:
    tokens = ((args.frames - 1) // 4 + 1) * (args.size // 16) ** 2
    extras = ", fp8_base" if args.fp8_base else ""
    extras += ", gradient checkpointing" if args.gradient_checkpointing else ""
    return (f"# bench_train_overhead: {model}; {args.batch_size} x {args.frames}f {args.size}px ({tokens} video "
            f"tokens); LoRA rank {args.network_dim}; mixed_precision {args.mixed_precision}{extras}")


def step_row(label: str, times: list[float], warmup: int) -> list:
    steady = times[warmup:]
    return [label, times[0], median(steady), statistics.mean(steady), statistics.pstdev(steady), len(steady)]


def main_hunyuan_video(args: argparse.Namespace, root: Path) -> dict:
    """Bare loop only: the HunyuanVideo DiT at its released widths, written with random weights."""
    from _bench_models import bench_dit, write_random_checkpoint

    spec = bench_dit("hunyuan_video", tuple(args.hv_blocks))
    path = root / spec.file_name
    write_random_checkpoint(spec.original_shapes(), path, prefix=spec.key_prefix)
    dit, latents, forward = hv_bare_inputs(path, args)
    params = sum(p.numel() for p in dit.parameters())
    times = run_bare(attach_lora("hunyuan_video", dit, args), latents, forward, args, args.warmup + args.steps)
    print(describe_run(args, f"{spec.title} ({params / 1e6:.0f} M parameters); {args.text_tokens} text tokens"))
    print(f"# machine: {machine_description()}")
    print_table(["loop", "first step s", "median step s", "mean step s", "stdev s", "steps"],
                [step_row("bare fwd+bwd+AdamW", times, args.warmup)])
    return {"bare_s": median(times[args.warmup:])}


def main_wan(args: argparse.Namespace, root: Path) -> dict:
    config = write_dit(root / "dit.safetensors", args)
    toml = write_dataset(root / "data", args)
    total_steps = args.warmup + args.steps
    trainer_times, trainer_wall = [], 0.0
    if not args.bare_only:
        trainer_times, trainer_wall = run_trainer(training_argv(root / "dit.safetensors", toml, root / "out", args,
                                                                total_steps))
    dit, latents, forward = wan_bare_inputs(root / "dit.safetensors", toml, args)
    bare_times = run_bare(attach_lora("wan", dit, args), latents, forward, args, total_steps)
    print(describe_run(args, f"Wan DiT dim {args.dim}, {args.layers} layers, ffn {config['ffn_dim']}, "
                             f"text {args.text_dim}"))
    print(f"# machine: {machine_description()}")
    rows = [] if args.bare_only else [step_row("trainer (NetworkTrainer)", trainer_times, args.warmup)]
    print_table(["loop", "first step s", "median step s", "mean step s", "stdev s", "steps"],
                rows + [step_row("bare fwd+bwd+AdamW", bare_times, args.warmup)])
    result = {"bare_s": median(bare_times[args.warmup:])}
    if not args.bare_only:
        result["trainer_s"] = median(trainer_times[args.warmup:])
        result["ratio"] = result["trainer_s"] / result["bare_s"]
        startup = trainer_wall - sum(trainer_times)
        print(f"overhead ratio (trainer / bare, median): {result['ratio']:.3f}")
        print(f"trainer wall {trainer_wall:.1f} s for {total_steps} steps, of which set-up + final save "
              f"{startup:.1f} s")
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    offline_environment()
    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        run = main_hunyuan_video if args.arch == "hunyuan_video" else main_wan
        result = run(args, Path(tmp))
    print(f"(bench_train_overhead took {time.perf_counter() - start:.0f} s)")
    return result


if __name__ == "__main__":
    main()
