"""Seconds per step, peak VRAM and model FLOP utilisation of LoRA training and generation steps on a GPU, per
architecture at its real shapes (random weights, nothing downloaded), for each memory/speed switch.

Architectures: Wan2.1-T2V-1.3B at 480x832x81, FLUX.1 Kontext [dev] at 1024x1024 (+ a 1024x1024 control image),
HunyuanVideo at 544x960x33. Variants: plain bf16, --fp8_base, --fp8_scaled, --gradient_checkpointing (+ CPU
offload), --blocks_to_swap N (overlapped CUDA-stream engine vs copies on the compute stream), --block_swap_h2d_only,
attention backends; generation adds --fp8 and --fp8_fast. Each variant builds a fresh model, runs `--warmup` untimed
steps and `--steps` timed ones.

MFU = model FLOPs per step / (seconds per step x the GPU's peak dense bf16 FLOP/s). Model FLOPs are counted once per
architecture with torch's FlopCounterMode on one forward; a training step counts 3 forwards (the usual convention:
checkpoint recompute is not model work), a generation step 1 (one DiT call, no CFG).

Without a GPU it says so and exits 0. `--smoke` runs the same code on the CPU with tiny models (for the tests).

`--quick` is the prepared command for a session with a lent GPU (about 7 minutes on an H200, estimated from the
models' FLOPs; never run yet): every switch once per family, each on top of --gradient_checkpointing for training
(the real shapes need it: without it the activations of Wan 1.3B at 480x832x81 alone are ~60 GB, HunyuanVideo's
~140 GB), 1 warm-up + 1 timed step, and a time budget after which the remaining rows say "not run (time budget)"
instead of running over. `--markdown FILE` also writes the tables, with the date, GPU and command, to FILE (atomic),
ready to paste into docs/benchmarks.md:

    python benchmarks/bench_gpu.py --quick --markdown docs/bench_gpu_results.md

Usage: python benchmarks/bench_gpu.py [--arch wan flux_kontext hunyuan_video] [--steps 3 --warmup 1]
       [--blocks_to_swap 10] [--only train|generate] [--peak_tflops 989] [--quick] [--time_budget_s S]
       [--markdown FILE]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_util import machine_description, markdown_table, offline_environment  # noqa: E402

# dense bf16 tensor-core peak, TFLOP/s (vendor datasheets, without sparsity)
PEAK_BF16_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L40": 181, "RTX 4090": 165,
                    "RTX 3090": 71, "A6000": 155, "RTX 6000 Ada": 364, "B200": 2250}


@dataclass(frozen=True)
class Variant:
    name: str
    fp8: bool = False
    fp8_scaled: bool = False
    fp8_fast: bool = False
    checkpointing: bool = False
    cpu_offload: bool = False
    swap: bool = False
    overlapped: bool = True
    h2d_only: bool = False
    offload_inputs: bool = False
    """--img_in_txt_in_offloading (families with input modules to offload; the others skip the row)."""
    attention: str = "sdpa"


TRAIN_VARIANTS = [
    Variant("bf16"), Variant("fp8_base", fp8=True), Variant("fp8_base + fp8_scaled", fp8=True, fp8_scaled=True),
    Variant("gradient_checkpointing", checkpointing=True),
    Variant("gradient_checkpointing + cpu_offload", checkpointing=True, cpu_offload=True),
    Variant("gc + blocks_to_swap (compute stream)", checkpointing=True, swap=True, overlapped=False),
    Variant("gc + blocks_to_swap (overlapped)", checkpointing=True, swap=True),
    Variant("gc + blocks_to_swap + h2d_only", checkpointing=True, swap=True, h2d_only=True),
    Variant("gc + blocks_to_swap + img_in_txt_in_offloading", checkpointing=True, swap=True, offload_inputs=True),
    Variant("gc + flash_attn", checkpointing=True, attention="flash_attn"),
    Variant("gc + xformers", checkpointing=True, attention="xformers"),
]
QUICK_TRAIN_VARIANTS = [
    Variant("gradient_checkpointing", checkpointing=True),
    Variant("gc + fp8_base", checkpointing=True, fp8=True),
    Variant("gc + fp8_base + fp8_scaled", checkpointing=True, fp8=True, fp8_scaled=True),
    Variant("gc + cpu_offload", checkpointing=True, cpu_offload=True),
    Variant("gc + blocks_to_swap (compute stream)", checkpointing=True, swap=True, overlapped=False),
    Variant("gc + blocks_to_swap (overlapped)", checkpointing=True, swap=True),
    Variant("gc + blocks_to_swap + img_in_txt_in_offloading", checkpointing=True, swap=True, offload_inputs=True),
    Variant("gc + flash_attn", checkpointing=True, attention="flash_attn"),
]
GENERATE_VARIANTS = [
    Variant("bf16"), Variant("fp8", fp8=True), Variant("fp8 + fp8_scaled", fp8=True, fp8_scaled=True),
    Variant("fp8 + fp8_fast", fp8=True, fp8_fast=True),
    Variant("blocks_to_swap (compute stream)", swap=True, overlapped=False),
    Variant("blocks_to_swap (overlapped)", swap=True),
    Variant("flash", attention="flash"), Variant("sageattn", attention="sageattn"),
]
QUICK_GENERATE_VARIANTS = [
    Variant("bf16"), Variant("fp8 + fp8_fast", fp8=True, fp8_fast=True),
    Variant("blocks_to_swap (compute stream)", swap=True, overlapped=False),
    Variant("blocks_to_swap (overlapped)", swap=True),
]
QUICK_TIME_BUDGET_S = 420.0
"""--quick stops starting variants after this many seconds, so the whole command ends within ~8 minutes."""


@dataclass
class Workload:
    """One architecture at its real (or, for --smoke, tiny) shapes."""

    arch: str
    label: str
    build: object  # () -> nn.Module on the current default device/dtype
    inputs: object  # (device, dtype) -> dict of DiT kwargs
    flops_per_forward: float = field(default=0.0)


def _wan(smoke: bool) -> Workload:
    from diffusers import WanTransformer3DModel

    from musubi_tuner.architectures.wan.dit_files import _diffusers_config
    from musubi_tuner.architectures.wan.tiny import tiny_dit_config

    config = tiny_dit_config("t2v-1.3B") if smoke else \
        _diffusers_config(dim=1536, num_heads=12, num_layers=30, ffn_dim=8960, in_dim=16, mode="t2v")
    frames, height, width, text, text_dim = (2, 8, 8, 12, 32) if smoke else (21, 60, 104, 512, 4096)  # 480x832x81

    def inputs(device, dtype):
        import torch

        return dict(hidden_states=torch.randn(1, 16, frames, height, width, device=device, dtype=dtype),
                    timestep=torch.tensor([500.0], device=device),
                    encoder_hidden_states=torch.randn(1, text, text_dim, device=device, dtype=dtype), return_dict=False)

    return Workload("wan", "Wan2.1-T2V-1.3B 480x832x81", lambda: WanTransformer3DModel.from_config(config), inputs)


def _flux(smoke: bool) -> Workload:
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

    from musubi_tuner.architectures.flux_kontext.packing import prepare_image_ids, prepare_text_ids
    from musubi_tuner.architectures.flux_kontext.tiny import TINY_DIT_CONFIG

    # the class defaults are FLUX.1's; the smoke model gets 4 single blocks so that --blocks_to_swap 1 (the
    # reference's split: 0 double + 3 single) leaves one on the device
    config = dict(TINY_DIT_CONFIG, num_single_layers=4) if smoke else dict(guidance_embeds=True)
    side, text = (2, 5) if smoke else (64, 512)  # packed 2x2 patches of a 1024x1024 image's 128x128 latent

    def inputs(device, dtype):
        import torch

        channels, text_dim = config.get("in_channels", 64), config.get("joint_attention_dim", 4096)
        pooled = config.get("pooled_projection_dim", 768)
        guidance = torch.tensor([2.5], device=device) if config.get("guidance_embeds") else None
        ids = torch.cat([prepare_image_ids(side, side, index=0), prepare_image_ids(side, side, index=1)])
        return dict(hidden_states=torch.randn(1, 2 * side * side, channels, device=device, dtype=dtype),
                    encoder_hidden_states=torch.randn(1, text, text_dim, device=device, dtype=dtype),
                    pooled_projections=torch.randn(1, pooled, device=device, dtype=dtype),
                    timestep=torch.tensor([0.7], device=device), img_ids=ids.to(device),
                    txt_ids=prepare_text_ids(text).to(device), guidance=guidance,
                    return_dict=False)

    return Workload("flux_kontext", "FLUX.1 Kontext 1024x1024 + control",
                    lambda: FluxTransformer2DModel.from_config(config), inputs)


def _hunyuan(smoke: bool) -> Workload:
    from diffusers import HunyuanVideoTransformer3DModel

    from musubi_tuner.architectures.hunyuan_video.tiny import tiny_hv_config

    # the class defaults are HunyuanVideo's 13B; 4 single blocks in the smoke model, as for FLUX
    config = dict(tiny_hv_config(), num_single_layers=4) if smoke else {}
    frames, height, width, text = (2, 8, 8, 6) if smoke else (9, 68, 120, 256)  # 544x960x33

    def inputs(device, dtype):
        import torch

        text_dim, pooled = config.get("text_embed_dim", 4096), config.get("pooled_projection_dim", 768)
        return dict(hidden_states=torch.randn(1, 16, frames, height, width, device=device, dtype=dtype),
                    timestep=torch.tensor([500], device=device),
                    encoder_hidden_states=torch.randn(1, text, text_dim, device=device, dtype=dtype),
                    encoder_attention_mask=torch.ones(1, text, device=device, dtype=torch.bool),
                    pooled_projections=torch.randn(1, pooled, device=device, dtype=dtype),
                    guidance=torch.tensor([6000.0], device=device), return_dict=False)

    return Workload("hunyuan_video", "HunyuanVideo 544x960x33",
                    lambda: HunyuanVideoTransformer3DModel.from_config(config), inputs)


WORKLOADS = {"wan": _wan, "flux_kontext": _flux, "hunyuan_video": _hunyuan}


# ---- one variant ------------------------------------------------------------------------------------------------
def build_model(workload: Workload, variant: Variant, device, dtype, blocks_to_swap: int, training: bool):
    """A random-weight DiT set up as the trainer / generate script would for `variant` (None if not applicable)."""
    import torch

    from musubi_tuner.architectures import get_architecture
    from musubi_tuner.memory.attention import apply_attention_backend
    from musubi_tuner.memory.block_swap import BlockSwapOptions, SyncEngine, enable_block_swap
    from musubi_tuner.memory.fp8 import store_dit_in_fp8

    arch = get_architecture(workload.arch)
    if variant.offload_inputs and not arch.offloaded_input_modules(_meta_dit(workload)):
        raise ValueError(f"{workload.arch} has no img_in/txt_in to offload")
    try:  # random init is far faster on the GPU; fp8/swap variants fall back to the CPU when bf16 does not fit
        build_device = device
        dit = _random_dit(workload, device, dtype)
    except torch.OutOfMemoryError:
        if not (variant.swap or variant.fp8):
            raise
        build_device = "cpu"
        gc.collect()
        torch.cuda.empty_cache()
        dit = _random_dit(workload, "cpu", dtype)
    dit.requires_grad_(False)
    if variant.fp8:
        store_dit_in_fp8(dit, arch, scaled=variant.fp8_scaled)
    if variant.fp8_fast:
        from musubi_tuner.memory.fp8_fast import enable_fp8_fast

        enable_fp8_fast(dit, torch.device(device))
    if variant.swap:
        engine = None if variant.overlapped else SyncEngine(torch.device(device))
        enable_block_swap(dit, blocks_to_swap, torch.device(device), BlockSwapOptions(reuse_buffers=variant.h2d_only),
                          engine=engine, blocks=arch.swapped_blocks(dit, blocks_to_swap))
    elif build_device != device:
        dit.to(device)
    if variant.offload_inputs:
        from musubi_tuner.memory.module_offload import offload_input_modules

        offload_input_modules(arch, dit, torch.device(device))
    if variant.checkpointing:
        from musubi_tuner.memory.activation_offload import checkpoint_with_cpu_offload

        dit.enable_gradient_checkpointing(checkpoint_with_cpu_offload if variant.cpu_offload else None)
    apply_attention_backend(dit, variant.attention, "attention")
    network = None
    if training:
        from musubi_tuner.training.network_setup import build_network

        network = build_network(arch, dit, argparse.Namespace(
            network_module=arch.network_module, network_dim=32, network_alpha=32.0, network_dropout=None,
            network_args=None, dim_from_weights=False, network_weights=None))
        network.to(device)
        dit.train()
    return dit, network


def _meta_dit(workload: Workload):
    import torch

    with torch.device("meta"):
        return workload.build()


def _random_dit(workload: Workload, device, dtype):
    import torch

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # never materialise the 12B models in fp32
    try:
        with torch.device(device):
            return workload.build().eval()
    finally:
        torch.set_default_dtype(previous)


def time_steps(step, warmup: int, steps: int, synchronize) -> float:
    for _ in range(warmup):
        step()
    synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_variant(workload: Workload, variant: Variant, args, training: bool) -> list[object]:
    import torch

    from musubi_tuner.errors import UserError
    from musubi_tuner.memory.block_swap import full_recompute

    cuda = args.device == "cuda"
    gc.collect()  # the previous variant's model (block-swap hooks make reference cycles)
    if cuda:
        torch.cuda.empty_cache()
    try:
        dit, network = build_model(workload, variant, args.device, args.dtype, args.blocks_to_swap, training)
    except (UserError, ImportError, RuntimeError, ValueError) as exc:  # a backend not installed here, OOM, ...
        return [variant.name, "skipped", "", "", str(exc).splitlines()[0][:80]]
    if cuda:  # the peak of the steps, not of building and converting the model
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    inputs = workload.inputs(args.device, args.dtype)
    if training:
        optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-5)

        def step():
            with torch.autocast(args.device, dtype=args.dtype, enabled=cuda), full_recompute():
                out = dit(**inputs)[0]
            out.float().square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        def step():
            with torch.no_grad():
                dit(**inputs)

    try:
        seconds = time_steps(step, args.warmup, args.steps, torch.cuda.synchronize if cuda else (lambda: None))
    except torch.OutOfMemoryError:
        return [variant.name, "OOM", "", "", ""]
    finally:
        dit = network = None  # the closures share these cells: this frees the model before the next variant
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if cuda else "n/a"
    flops = workload.flops_per_forward * (3 if training else 1)
    mfu = f"{100 * flops / seconds / (args.peak_tflops * 1e12):.1f}" if args.peak_tflops and flops else "n/a"
    return [variant.name, f"{seconds:.3f}", peak, mfu, ""]


def count_forward_flops(workload: Workload, args) -> float:
    """FLOPs of one plain forward, counted by torch (matmuls and attention) on the meta device: no memory, no time."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    dit = _meta_dit(workload)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        dit(**workload.inputs("meta", args.dtype))
    return float(counter.get_total_flops())


def peak_tflops_for(name: str) -> float | None:
    return next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--only", choices=["train", "generate"], default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 3; --quick: 1)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--blocks_to_swap", type=int, default=None,
                        help="N, with the reference's meaning per family (default 10; --smoke: 1)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: by name)")
    parser.add_argument("--variants", nargs="*", default=None, help="run only variants whose name contains one of these")
    parser.add_argument("--quick", action="store_true",
                        help=f"the prepared set: one row per switch, 1 timed step, a {QUICK_TIME_BUDGET_S:.0f} s budget")
    parser.add_argument("--time_budget_s", type=float, default=None,
                        help="start no variant after this many seconds (default: none; --quick: "
                             f"{QUICK_TIME_BUDGET_S:.0f})")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables to this Markdown file")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script, measures nothing")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 1 if args.quick else 3
    if args.blocks_to_swap is None:
        args.blocks_to_swap = 1 if args.smoke else 10
    if args.time_budget_s is None and args.quick:
        args.time_budget_s = QUICK_TIME_BUDGET_S
    offline_environment()
    import torch

    print(machine_description())
    if not torch.cuda.is_available() and not args.smoke:
        print("bench_gpu: no CUDA GPU on this machine; nothing measured (run it where `torch.cuda.is_available()`)")
        return 0
    args.device = "cpu" if args.smoke else "cuda"
    args.dtype = torch.float32 if args.smoke else torch.bfloat16
    gpu = "CPU (smoke run: tiny models, nothing measured)" if args.smoke else torch.cuda.get_device_name(0)
    if args.peak_tflops is None and not args.smoke:
        args.peak_tflops = peak_tflops_for(gpu)
    report = [f"# bench_gpu {datetime.date.today().isoformat()}: {gpu}, torch {torch.__version__}",
              f"command: `python benchmarks/bench_gpu.py {shlex.join(argv if argv is not None else sys.argv[1:])}`",
              f"{args.warmup} warm-up + {args.steps} timed step(s) per variant (median); --blocks_to_swap "
              f"{args.blocks_to_swap}; MFU against {args.peak_tflops or 'unknown'} TFLOP/s dense bf16"]
    print("\n".join(report))
    start = time.perf_counter()
    for name in args.arch:
        workload = WORKLOADS[name](args.smoke)
        workload.flops_per_forward = count_forward_flops(workload, args)
        report.append(emit(f"\n## {workload.label}: {workload.flops_per_forward / 1e12:.1f} TFLOP per forward"))
        for phase in ("train", "generate"):
            if args.only not in (None, phase):
                continue
            rows = [run_within_budget(workload, v, args, phase == "train", start)
                    for v in variants_for(phase, args)]
            title = "train (LoRA rank 32)" if phase == "train" else "generate (one DiT call per step)"
            report.append(emit(f"\n### {title}\n\n"
                               + markdown_table(["variant", "s/step", "peak VRAM GiB", "MFU %", "note"], rows)))
    if args.markdown:
        from musubi_tuner.utils.atomic import write_text_atomic

        write_text_atomic(args.markdown, "\n".join(report) + "\n")
        print(f"\nwritten: {args.markdown}")
    return 0


def emit(text: str) -> str:
    print(text, flush=True)
    return text


def variants_for(phase: str, args) -> list[Variant]:
    if phase == "train":
        variants = QUICK_TRAIN_VARIANTS if args.quick else TRAIN_VARIANTS
    else:
        variants = QUICK_GENERATE_VARIANTS if args.quick else GENERATE_VARIANTS
    if args.variants:
        variants = [v for v in variants if any(s in v.name for s in args.variants)]
    return variants


def run_within_budget(workload: Workload, variant: Variant, args, training: bool, start: float) -> list[object]:
    if args.time_budget_s is not None and time.perf_counter() - start > args.time_budget_s:
        return [variant.name, "not run (time budget)", "", "", ""]
    return run_variant(workload, variant, args, training)


if __name__ == "__main__":
    sys.exit(main())
