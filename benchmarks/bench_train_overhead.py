"""Trainer step time against a bare forward + backward + AdamW step of the same model, LoRA and batch.

Builds (in a temp folder) a DiT in the original single-file layout and a latent + text-encoder cache that the
real trainer reads, then:

1. runs `NetworkTrainer` (the code behind `wan_train_network.py` / `hv_train_network.py`) for warm-up + N steps
   and times each step from the end of one to the end of the next (batch loading, noise and timestep sampling,
   forward, loss, backward, optimizer and scheduler step, progress bar: everything the loop does);
2. runs a bare loop on the same DiT file, training flags, LoRA rank/alpha and one cached batch held in memory:
   forward (the family's `predict`), MSE loss, backward, `torch.optim.AdamW` step, `zero_grad`.

It prints the median step times and the overhead ratio (trainer / bare); 1.00 means no overhead.
`--bare_only` times the bare loop alone.

`--arch wan` (default): a small-but-not-tiny Wan DiT sized by `--dim`/`--layers`. `--arch hunyuan_video`: a
HunyuanVideo DiT at its released widths with `--hv_blocks` blocks (random bf16 weights in ComfyUI's layout), LLM
caches of 256 tokens with `--text_tokens` valid, CLIP-L pooled 768, embedded guidance as the trainer feeds it;
the LoRA covers the reference's targets (the block Linears but modulation).

Usage: python benchmarks/bench_train_overhead.py [--dim 512 --layers 4 --size 256 --frames 1 --steps 12 ...]
       python benchmarks/bench_train_overhead.py --arch hunyuan_video [--bare_only] [--hv_blocks 1 1 --size 64 ...]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # torch is imported inside the functions so that --help stays fast
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_util import machine_description, median, offline_environment, print_table, stopwatch  # noqa: E402


# ---- inputs -----------------------------------------------------------------------------------------------------
HV_LLM_TOKENS = 256
"""HunyuanVideo's LLM cache is always 256 tokens long, masked after the prompt (as the reference caches it)."""


@dataclass(frozen=True)
class DitFile:
    path: Path
    title: str
    text_dims: tuple[int, ...]
    """Widths of the text-encoder outputs this DiT takes (Wan: umT5; HunyuanVideo: LLM, CLIP pooled)."""


def write_wan_dit(root: Path, args: argparse.Namespace) -> DitFile:
    """A seeded WanTransformer3DModel sized by --dim/--layers/--ffn_dim/--text_dim, original layout (bf16)."""
    import torch
    from diffusers import WanTransformer3DModel

    from musubi_tuner.architectures.wan.dit_files import HEAD_DIM, _diffusers_config, save_wan_dit_original

    ffn_dim = args.ffn_dim or 4 * args.dim
    config = _diffusers_config(dim=args.dim, num_heads=args.dim // HEAD_DIM, num_layers=args.layers,
                               ffn_dim=ffn_dim, in_dim=16, mode="t2v", text_dim=args.text_dim)
    torch.manual_seed(0)
    path = root / "dit.safetensors"
    save_wan_dit_original(WanTransformer3DModel.from_config(config), path, dtype=torch.bfloat16)
    return DitFile(path, f"Wan DiT dim {args.dim}, {args.layers} layers, ffn {ffn_dim}, text {args.text_dim}",
                   (args.text_dim,))


def write_hv_dit(root: Path, args: argparse.Namespace) -> DitFile:
    """HunyuanVideo at its released widths with --hv_blocks blocks: random bf16 weights in ComfyUI's layout."""
    from math import prod

    from _bench_models import bench_dit, write_random_checkpoint

    spec = bench_dit("hunyuan_video", tuple(args.hv_blocks))
    shapes = spec.original_shapes()
    write_random_checkpoint(shapes, root / spec.file_name, prefix=spec.key_prefix)
    params = sum(prod(shape) for shape in shapes.values())
    return DitFile(root / spec.file_name, f"{spec.title} ({params / 1e6:.0f} M parameters)", (4096, 768))


def wan_text_cache(args: argparse.Namespace, text_dims: tuple[int, ...], generator) -> dict:
    """What wan_cache_text_encoder_outputs.py writes for one caption (random): umT5 states, unpadded."""
    import torch

    return {"varlen_t5": torch.randn(args.text_tokens, text_dims[0], generator=generator).to(torch.bfloat16)}


def hv_text_cache(args: argparse.Namespace, text_dims: tuple[int, ...], generator) -> dict:
    """What cache_text_encoder_outputs.py writes for one caption (random): LLM states padded to 256 with the
    first --text_tokens valid, and the CLIP-L pooled vector."""
    import torch

    llm_dim, clip_dim = text_dims
    mask = torch.zeros(HV_LLM_TOKENS, dtype=torch.int64)
    mask[: args.text_tokens] = 1
    return {"llm": torch.randn(HV_LLM_TOKENS, llm_dim, generator=generator).to(torch.bfloat16), "llm_mask": mask,
            "clipL": torch.randn(clip_dim, generator=generator).to(torch.bfloat16),
            "clipL_mask": torch.ones(77, dtype=torch.int64)}


@dataclass(frozen=True)
class Family:
    """What differs between the families here; everything else (dataset, loops, timing) is shared."""

    write_dit: Callable[[Path, argparse.Namespace], DitFile]
    text_cache: Callable[[argparse.Namespace, tuple[int, ...], Any], dict]
    training_flags: tuple[str, ...]
    """The family's own training flags (the reference's network module; the flow shift each family uses)."""


FAMILIES = {
    "wan": Family(write_wan_dit, wan_text_cache,
                  ("--task", "t2v-1.3B", "--network_module", "networks.lora_wan", "--discrete_flow_shift", "3.0")),
    "hunyuan_video": Family(write_hv_dit, hv_text_cache,
                            ("--network_module", "networks.lora", "--discrete_flow_shift", "7.0")),
}


def write_dataset(root: Path, args: argparse.Namespace, dit: DitFile) -> Path:
    """Random latent and text caches named as the caching scripts name them, and the TOML that points at them."""
    import torch

    from musubi_tuner.architectures import get_architecture
    from musubi_tuner.dataset.cache_files import latent_cache_name, latent_metadata, text_cache_name, write_cache

    traits = get_architecture(args.arch).traits
    text_cache = FAMILIES[args.arch].text_cache
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
        write_cache(cache / text_cache_name(stem, traits.cache_code), text_cache(args, dit.text_dims, generator),
                    traits, {"caption1": f"caption {i}"})
    toml = root / "dataset.toml"
    toml.write_text(f'[general]\nresolution = [{args.size}, {args.size}]\nbatch_size = {args.batch_size}\n'
                    'caption_extension = ".txt"\n\n'
                    f'[[datasets]]\nimage_directory = "{images.as_posix()}"\ncache_directory = "{cache.as_posix()}"\n')
    return toml


def training_argv(dit: Path, toml: Path, out: Path, args: argparse.Namespace, steps: int) -> list[str]:
    argv = [*FAMILIES[args.arch].training_flags, "--dit", str(dit), "--dataset_config", str(toml), "--sdpa",
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


def bare_precision(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)


def bare_inputs(arch_name: str, argv: list[str], toml: Path, args: argparse.Namespace) -> tuple:
    """(DiT, latents, forward(noisy, t)) as the trainer sees them: the DiT loaded from the training flags, the
    first cached batch held in memory with the family's training conditioning, and the family's `predict`."""
    import torch

    from musubi_tuner.architectures import get_architecture
    from musubi_tuner.dataset.batches import CachedBatches
    from musubi_tuner.dataset.config import load_dataset_config
    from musubi_tuner.training.cli import parse_training_args

    arch = get_architecture(arch_name)
    flags = parse_training_args(arch, argv)
    device, dtype = bare_precision(args)
    dit = arch.load_dit(flags, device, dtype)
    batches = CachedBatches(load_dataset_config(toml, arch.traits), arch.traits, seed=0)
    batch = {**batches.load_batch(batches.batches_for_epoch(0)[0]), **arch.training_conditioning(flags)}
    latents = arch.latents_from_cache(batch["latents"].to(device, torch.float32))

    def forward(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return arch.predict(dit, batch, noisy, t * 1000)

    return dit, latents, forward


def attach_lora(arch_name: str, dit, args: argparse.Namespace):
    """fp8 storage and gradient checkpointing as the trainer applies them, then a LoRA of rank and alpha
    --network_dim on the family's default targets; returns the network (in training mode)."""
    from musubi_tuner.architectures import get_architecture
    from musubi_tuner.memory.fp8 import store_dit_in_fp8
    from musubi_tuner.networks import lora

    arch = get_architecture(arch_name)
    if args.fp8_base:
        store_dit_in_fp8(dit, arch, scaled=False)
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
                             "released widths with --hv_blocks blocks")
    parser.add_argument("--bare_only", action="store_true", help="time only the bare loop, not the trainer")
    parser.add_argument("--dim", type=int, default=512, help="Wan DiT width (a multiple of 128)")
    parser.add_argument("--layers", type=int, default=4, help="Wan DiT blocks")
    parser.add_argument("--ffn_dim", type=int, default=None, help="Wan FFN width; default 4 x dim")
    parser.add_argument("--text_dim", type=int, default=4096, help="umT5 width (4096 as in the real model)")
    parser.add_argument("--hv_blocks", type=int, nargs=2, default=[1, 2], metavar=("DOUBLE", "SINGLE"),
                        help="HunyuanVideo double and single blocks (released: 20 40)")
    parser.add_argument("--text_tokens", type=int, default=64,
                        help="prompt length (Wan: before padding to 512; HunyuanVideo: valid tokens of 256)")
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
    if args.arch == "hunyuan_video" and not 1 <= args.text_tokens <= HV_LLM_TOKENS:
        parser.error(f"--text_tokens: HunyuanVideo takes 1 to {HV_LLM_TOKENS} (its LLM cache is {HV_LLM_TOKENS} long)")
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


def measure(args: argparse.Namespace, root: Path, dit: DitFile) -> dict:
    """Write the dataset for `dit`, run the trainer (unless --bare_only) and the bare loop, print the table."""
    toml = write_dataset(root / "data", args, dit)
    total_steps = args.warmup + args.steps
    argv = training_argv(dit.path, toml, root / "out", args, total_steps)
    trainer_times, trainer_wall = [], 0.0
    if not args.bare_only:
        trainer_times, trainer_wall = run_trainer(args.arch, argv)
    model, latents, forward = bare_inputs(args.arch, argv, toml, args)
    bare_times = run_bare(attach_lora(args.arch, model, args), latents, forward, args, total_steps)
    print(describe_run(args, f"{dit.title}; {args.text_tokens} text tokens"))
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
        root = Path(tmp)
        result = measure(args, root, FAMILIES[args.arch].write_dit(root, args))
    print(f"(bench_train_overhead took {time.perf_counter() - start:.0f} s)")
    return result


if __name__ == "__main__":
    main()
