"""Trainer step time against a bare forward + backward + AdamW step of the same model, LoRA and batch.

Builds (in a temp folder) a small-but-not-tiny DiT in the original single-file layout and a latent +
text-encoder cache that the real trainer reads: Wan (`--arch wan`: `--dim`, `--layers`) or HunyuanVideo
(`--arch hunyuan_video`: 24 heads of 128 = width 3072 as released, text 4096 x 256 tokens + CLIP-L 768, 2 refiner
layers, `--hv_double` double and `--hv_single` single blocks), then:

1. runs `NetworkTrainer` (the code behind `wan_train_network.py` / `hv_train_network.py`) for warm-up + N steps and times each step
   from the end of one to the end of the next (batch loading, noise and timestep sampling, forward, loss,
   backward, optimizer and scheduler step, progress bar: everything the loop does);
2. runs a bare loop on the same DiT file, LoRA rank/alpha and one cached batch held in memory: forward (the
   architecture's `predict`: input casting and the model call), MSE loss, backward, `torch.optim.AdamW` step,
   `zero_grad`.

It prints the median step times and the overhead ratio (trainer / bare); 1.00 means no overhead.

Usage: python benchmarks/bench_train_overhead.py [--arch wan|hunyuan_video] [--dim 512 --layers 4 --size 256
       --frames 1 --steps 12 --hv_double 1 --hv_single 2 ...]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_util import machine_description, median, offline_environment, print_table, stopwatch  # noqa: E402


# ---- inputs -----------------------------------------------------------------------------------------------------
HV_TEXT_TOKENS = 256
"""HunyuanVideo's LLM states are always 256 long (masked after the prompt)."""


def write_dit(path: Path, args: argparse.Namespace) -> str:
    """A seeded DiT of the requested size, saved in the original layout (bf16); returns a description."""
    import torch

    torch.manual_seed(0)
    if args.arch == "hunyuan_video":
        from diffusers import HunyuanVideoTransformer3DModel

        from musubi_tuner.architectures.hunyuan_video.dit_files import save_hv_dit_original

        # diffusers' defaults are the released widths; only the block counts change
        model = HunyuanVideoTransformer3DModel.from_config({"num_layers": args.hv_double,
                                                            "num_single_layers": args.hv_single})
        save_hv_dit_original(model, path, dtype=torch.bfloat16)
        return (f"HunyuanVideo DiT width 3072 (24 heads), {args.hv_double} double + {args.hv_single} single blocks, "
                f"text 4096 x {HV_TEXT_TOKENS}")
    from diffusers import WanTransformer3DModel

    from musubi_tuner.architectures.wan.dit_files import HEAD_DIM, _diffusers_config, save_wan_dit_original

    config = _diffusers_config(dim=args.dim, num_heads=args.dim // HEAD_DIM, num_layers=args.layers,
                               ffn_dim=args.ffn_dim or 4 * args.dim, in_dim=16, mode="t2v", text_dim=args.text_dim)
    model = WanTransformer3DModel.from_config(config)
    save_wan_dit_original(model, path, dtype=torch.bfloat16)
    return f"Wan DiT dim {args.dim}, {args.layers} layers, ffn {config['ffn_dim']}, text {args.text_dim}"


def text_cache_contents(args: argparse.Namespace, generator) -> dict:
    """What the text caching script writes for one caption, random."""
    import torch

    if args.arch == "hunyuan_video":
        mask = torch.zeros(HV_TEXT_TOKENS, dtype=torch.int64)
        mask[: args.text_tokens] = 1
        return {"llm": torch.randn(HV_TEXT_TOKENS, 4096, generator=generator).to(torch.bfloat16), "llm_mask": mask,
                "clipL": torch.randn(768, generator=generator).to(torch.bfloat16),
                "clipL_mask": torch.ones(77, dtype=torch.int64)}
    return {"varlen_t5": torch.randn(args.text_tokens, args.text_dim, generator=generator).to(torch.bfloat16)}


def write_dataset(root: Path, args: argparse.Namespace) -> Path:
    """Random latent and text caches named as the caching scripts name them, and the TOML that points at them."""
    import torch

    from musubi_tuner.architectures import get_architecture
    from musubi_tuner.dataset.cache_files import latent_cache_name, latent_metadata, text_cache_name, write_cache

    traits = get_architecture(args.arch).traits
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
        write_cache(cache / text_cache_name(stem, traits.cache_code), text_cache_contents(args, generator), traits,
                    {"caption1": f"caption {i}"})
    toml = root / "dataset.toml"
    toml.write_text(f'[general]\nresolution = [{args.size}, {args.size}]\nbatch_size = {args.batch_size}\n'
                    'caption_extension = ".txt"\n\n'
                    f'[[datasets]]\nimage_directory = "{images.as_posix()}"\ncache_directory = "{cache.as_posix()}"\n')
    return toml


def training_argv(dit: Path, toml: Path, out: Path, args: argparse.Namespace, steps: int) -> list[str]:
    if args.arch == "hunyuan_video":
        family = ["--network_module", "networks.lora", "--discrete_flow_shift", "7.0"]
    else:
        family = ["--task", "t2v-1.3B", "--network_module", "networks.lora_wan", "--discrete_flow_shift", "3.0"]
    argv = [*family, "--dit", str(dit), "--dataset_config", str(toml), "--sdpa",
            "--mixed_precision", args.mixed_precision,
            "--network_dim", str(args.network_dim), "--network_alpha", str(args.network_dim),
            "--optimizer_type", "adamw", "--learning_rate", "1e-4", "--max_train_steps", str(steps),
            "--timestep_sampling", "shift", "--seed", "0",
            "--output_dir", str(out), "--output_name", "bench"]
    if args.gradient_checkpointing:
        argv.append("--gradient_checkpointing")
    if args.fp8_base:
        argv.append("--fp8_base")
    return argv


# ---- the two loops ------------------------------------------------------------------------------------------------
def run_trainer(arch_name: str, argv: list[str]) -> tuple[list[float], float]:
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

    arch = get_architecture(arch_name)
    trainer = TimedTrainer(arch, parse_training_args(arch, argv))
    with stopwatch() as total:
        trainer.train()
    ends = trainer.step_ends
    return [b - a for a, b in zip(ends, ends[1:])], total[0]


def run_bare(argv: list[str], toml: Path, args: argparse.Namespace, steps: int) -> list[float]:
    """forward + MSE + backward + AdamW on the same DiT file, LoRA and one cached batch; per-step seconds."""
    import torch

    from musubi_tuner.architectures import get_architecture
    from musubi_tuner.dataset.batches import CachedBatches
    from musubi_tuner.dataset.config import load_dataset_config
    from musubi_tuner.memory.fp8 import cast_linear_weights_to_fp8
    from musubi_tuner.networks import lora
    from musubi_tuner.training.cli import parse_training_args

    arch = get_architecture(args.arch)
    flags = parse_training_args(arch, argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)
    dit = arch.load_dit(flags, device, dtype)
    if args.fp8_base:
        cast_linear_weights_to_fp8(dit, include=arch.fp8_targets, skip_patterns=dit._skip_layerwise_casting_patterns)
    if args.gradient_checkpointing:
        dit.enable_gradient_checkpointing()
    network = lora.create_network(arch, dit, args.network_dim, args.network_dim)
    network.to(device)
    network.apply_to()
    network.train()
    optimizer = torch.optim.AdamW(network.prepare_optimizer_params(1e-4), lr=1e-4)

    batches = CachedBatches(load_dataset_config(toml, arch.traits), arch.traits, seed=0)
    batch = {**batches.load_batch(batches.batches_for_epoch(0)[0]), **arch.training_conditioning(flags)}
    latents = arch.latents_from_cache(batch["latents"].to(device, torch.float32))
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        noise = torch.randn_like(latents)
        t = torch.rand(latents.shape[0], device=device)
        noisy = (1 - t.view(-1, 1, 1, 1, 1)) * latents + t.view(-1, 1, 1, 1, 1) * noise
        with autocast:
            pred = arch.predict(dit, batch, noisy, t * 1000)
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
    parser.add_argument("--arch", default="wan", choices=("wan", "hunyuan_video"))
    parser.add_argument("--hv_double", type=int, default=1, help="HunyuanVideo double blocks (20 released)")
    parser.add_argument("--hv_single", type=int, default=2, help="HunyuanVideo single blocks (40 released)")
    parser.add_argument("--dim", type=int, default=512, help="Wan DiT width (a multiple of 128)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ffn_dim", type=int, default=None, help="default 4 x dim")
    parser.add_argument("--text_dim", type=int, default=4096, help="umT5 width (4096 as in the real model)")
    parser.add_argument("--text_tokens", type=int, default=64,
                        help="prompt length before padding (to 512 for Wan, 256 for HunyuanVideo)")
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
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    offline_environment()
    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        root = Path(tmp)
        model = write_dit(root / "dit.safetensors", args)
        toml = write_dataset(root / "data", args)
        total_steps = args.warmup + args.steps
        argv = training_argv(root / "dit.safetensors", toml, root / "out", args, total_steps)
        trainer_times, trainer_wall = run_trainer(args.arch, argv)
        bare_times = run_bare(argv, toml, args, total_steps)
    trainer_steady, bare_steady = trainer_times[args.warmup:], bare_times[args.warmup:]
    tokens = ((args.frames - 1) // 4 + 1) * (args.size // 16) ** 2
    print(f"# bench_train_overhead: {model}; {args.batch_size} x {args.frames}f {args.size}px ({tokens} video tokens); "
          f"LoRA rank {args.network_dim}; mixed_precision {args.mixed_precision}"
          f"{', fp8_base' if args.fp8_base else ''}{', gradient checkpointing' if args.gradient_checkpointing else ''}")
    print(f"# machine: {machine_description()}")
    ratio = median(trainer_steady) / median(bare_steady)
    print_table(["loop", "first step s", "median step s", "mean step s", "stdev s", "steps"], [
        ["trainer (NetworkTrainer)", trainer_times[0], median(trainer_steady), statistics.mean(trainer_steady),
         statistics.pstdev(trainer_steady), len(trainer_steady)],
        ["bare fwd+bwd+AdamW", bare_times[0], median(bare_steady), statistics.mean(bare_steady),
         statistics.pstdev(bare_steady), len(bare_steady)],
    ])
    startup = trainer_wall - sum(trainer_times)
    print(f"overhead ratio (trainer / bare, median): {ratio:.3f}")
    print(f"trainer wall {trainer_wall:.1f} s for {total_steps} steps, of which set-up + final save {startup:.1f} s")
    print(f"(bench_train_overhead took {time.perf_counter() - start:.0f} s)")
    return {"trainer_s": median(trainer_steady), "bare_s": median(bare_steady), "ratio": ratio}


if __name__ == "__main__":
    main()
