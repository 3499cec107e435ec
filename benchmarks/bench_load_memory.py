"""Peak memory and time of loading a DiT, in bf16 and with --fp8_base: Wan2.1-1.3B-shaped (`--arch wan`) or a
HunyuanVideo with the real widths and fewer blocks (`--arch hunyuan_video`).

Wan: 30 layers, width 1536, FFN 8960, 12 heads; random bf16 weights, about 2.8 GB. HunyuanVideo: width 3072,
24 heads of 128, MLP ratio 4, text 4096 / pooled 768, 2 refiner layers, as released, but `--hv_double` double and
`--hv_single` single blocks (20 and 40 in the release; default 1 and 2, about 1.6 GB). The checkpoint is written
once in the original single-file layout under --work_dir and reused. Each measurement runs in a fresh Python
process, so its peak RSS (`ru_maxrss`) belongs to that load alone:

- `bf16`: `load_wan_dit(path, dtype=bfloat16)`, what the trainer does with --mixed_precision bf16;
- `fp8_base`: the same, then `memory.fp8.cast_linear_weights_to_fp8` with the architecture's fp8 targets and the
  class's `_skip_layerwise_casting_patterns`, which is what --fp8_base does.

Usage: python benchmarks/bench_load_memory.py [--arch wan|hunyuan_video] [--work_dir DIR] [--skip_write]
       [--device cpu|cuda] [--repeats N] [--hv_double N --hv_single N]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_util import (  # noqa: E402
    DEFAULT_WORK_DIR,
    current_rss_mib,
    machine_description,
    offline_environment,
    peak_rss_mib,
    print_table,
    rss_breakdown_mib,
    stopwatch,
)

TASK = "t2v-1.3B"
MODES = ("bf16", "fp8_base")


def hv_config(num_double: int, num_single: int) -> dict:
    """diffusers' HunyuanVideo defaults are the released widths; only the block counts change."""
    return {"num_layers": num_double, "num_single_layers": num_single}


def checkpoint_path(work_dir: Path, arch: str, hv_double: int = 1, hv_single: int = 2) -> Path:
    if arch == "wan":
        return work_dir / "wan2.1_t2v_1.3B_random_bf16.safetensors"
    return work_dir / f"hunyuan_video_w3072_{hv_double}d{hv_single}s_random_bf16.safetensors"


def _random_like(shapes: dict, generator):
    import torch

    # small values: the fp8 cast must not clamp everything, and norms near 1 keep outputs finite
    return {k: torch.randn(shape, generator=generator, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
            for k, shape in shapes.items()}


def write_checkpoint(path: Path, arch: str, seed: int = 0, hv_double: int = 1, hv_single: int = 2) -> float:
    """Write random bf16 weights with the architecture's shapes and original key names; returns seconds."""
    import torch

    from musubi_tuner.utils.atomic import save_safetensors_atomic

    generator = torch.Generator().manual_seed(seed)
    with stopwatch() as elapsed:
        if arch == "wan":
            from musubi_tuner.architectures.wan.dit_files import build_empty_wan_dit, get_wan_task, wan_dit_to_original

            empty = build_empty_wan_dit(get_wan_task(TASK).diffusers_config())
            shapes = {k: tuple(v.shape) for k, v in empty.state_dict().items()}
            state = _random_like(wan_dit_to_original(shapes), generator)
        else:  # HunyuanVideo fuses q/k/v (and linear1's MLP) on the way out: convert real tensors
            from musubi_tuner.architectures.hunyuan_video.dit_files import build_empty_hv_dit, hv_diffusers_to_original

            empty = build_empty_hv_dit(hv_config(hv_double, hv_single))
            shapes = {k: tuple(v.shape) for k, v in empty.state_dict().items()}
            state = hv_diffusers_to_original(_random_like(shapes, generator))
        save_safetensors_atomic(state, path, metadata={"format": "pt", "note": "random weights for benchmarks"})
    return elapsed[0]


def load_dit(arch_name: str, path: Path, device: str):
    """The architecture's own loader, as the trainer calls it (bf16)."""
    import torch

    from musubi_tuner.architectures import get_architecture

    args = argparse.Namespace(dit=str(path), task=TASK, dit_in_channels=None, dit_dtype=None)
    return get_architecture(arch_name).load_dit(args, torch.device(device), torch.bfloat16)


def measure_in_this_process(path: Path, mode: str, device: str, arch_name: str) -> dict:
    """Load (and for fp8_base cast) the DiT; called in a fresh child process."""
    import diffusers  # noqa: F401  (import cost is not part of the load)
    import torch

    from musubi_tuner.architectures import get_architecture
    from musubi_tuner.memory.fp8 import cast_linear_weights_to_fp8

    gc.collect()
    result = {"mode": mode, "rss_before_mib": current_rss_mib(), "peak_before_mib": peak_rss_mib()}
    with stopwatch() as load_s:
        dit = load_dit(arch_name, path, device)
    result["load_s"] = load_s[0]
    result["cast_s"] = 0.0
    if mode == "fp8_base":
        with stopwatch() as cast_s:
            skip = tuple(getattr(type(dit), "_skip_layerwise_casting_patterns", None) or ())
            cast_linear_weights_to_fp8(dit, include=get_architecture(arch_name).fp8_targets, skip_patterns=skip)
        result["cast_s"] = cast_s[0]
    gc.collect()
    result["rss_loaded_mib"] = current_rss_mib()
    with stopwatch() as touch_s:
        _touch_every_weight(dit)
    result["touch_s"] = touch_s[0]
    gc.collect()
    result["param_mib"] = sum(p.numel() * p.element_size() for p in dit.parameters()) / 2**20
    result["params_m"] = sum(p.numel() for p in dit.parameters()) / 1e6
    result["fp8_params_m"] = sum(p.numel() for p in dit.parameters() if p.element_size() == 1) / 1e6
    result["rss_after_mib"] = current_rss_mib()
    result["rss_after_anon_mib"] = rss_breakdown_mib()["anon"]
    result["peak_rss_mib"] = peak_rss_mib()
    if device.startswith("cuda"):
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["cuda_now_mib"] = torch.cuda.memory_allocated() / 2**20
    return result


def _touch_every_weight(model) -> float:
    """Read every parameter once (safetensors weights stay memory-mapped until first use), as a first step would."""
    import torch

    with torch.no_grad():
        return float(sum(p.float().sum() for p in model.parameters()))


def measure_in_child(path: Path, mode: str, device: str, arch: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--path", str(path), "--device", device, "--arch", arch]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="wan", choices=("wan", "hunyuan_video"))
    parser.add_argument("--hv_double", type=int, default=1, help="HunyuanVideo double blocks (20 released)")
    parser.add_argument("--hv_single", type=int, default=2, help="HunyuanVideo single blocks (40 released)")
    parser.add_argument("--work_dir", type=Path, default=DEFAULT_WORK_DIR, help="where the checkpoint is kept")
    parser.add_argument("--skip_write", action="store_true", help="never (re)write the checkpoint; it must exist")
    parser.add_argument("--device", default="cpu", help="load target: cpu or cuda")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per mode (the table shows each)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    offline_environment()
    if args.child:
        print(json.dumps(measure_in_this_process(args.path, args.child, args.device, args.arch)))
        return []
    start = time.perf_counter()

    path = checkpoint_path(args.work_dir, args.arch, args.hv_double, args.hv_single)
    what = (f"Wan2.1 {TASK}-shaped DiT" if args.arch == "wan" else
            f"HunyuanVideo DiT, width 3072 / 24 heads, {args.hv_double} double + {args.hv_single} single blocks")
    print(f"# bench_load_memory: {what}, random bf16 weights\n# machine: {machine_description()}")
    if not path.exists():
        if args.skip_write:
            raise SystemExit(f"{path} does not exist; run once without --skip_write to write it")
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing {path} (once) ...", flush=True)
        print(f"written in {write_checkpoint(path, args.arch, 0, args.hv_double, args.hv_single):.1f} s")
    print(f"checkpoint: {path} ({path.stat().st_size / 2**30:.2f} GiB)")
    results = []
    for mode in MODES:
        for _ in range(args.repeats):
            results.append(measure_in_child(path, mode, args.device, args.arch))
    headers = ["mode", "load s", "fp8 cast s", "params M (fp8)", "weights MiB", "RSS before MiB",
               "RSS loaded MiB", "RSS all read MiB (anon)", "peak RSS MiB"]
    if args.device.startswith("cuda"):
        headers += ["CUDA peak MiB", "CUDA after MiB"]
    rows = []
    for r in results:
        row = [r["mode"], r["load_s"], r["cast_s"], f"{r['params_m']:.0f} ({r['fp8_params_m']:.0f})", r["param_mib"],
               r["rss_before_mib"], r["rss_loaded_mib"],
               f"{r['rss_after_mib']:.0f} ({r['rss_after_anon_mib']:.0f})", r["peak_rss_mib"]]
        if args.device.startswith("cuda"):
            row += [r["cuda_peak_mib"], r["cuda_now_mib"]]
        rows.append(row)
    print_table(headers, rows)
    print(f"(bench_load_memory took {time.perf_counter() - start:.0f} s)")
    return results


if __name__ == "__main__":
    main()
