"""Peak memory and time of loading a DiT from its original single-file layout, in bf16 and with --fp8_base.

`--arch wan` (default): Wan2.1-1.3B shapes (30 layers, width 1536, FFN 8960, 12 heads; about 2.8 GB).
`--arch hunyuan_video`: HunyuanVideo's released widths (3072, 24 heads of 128, MLP x4, text 4096, pooled 768,
guidance embedding, 2 refiner blocks) with fewer blocks (`--hv_blocks 4 8`: 4 double + 8 single, about 5.7 GB),
in ComfyUI's `model.diffusion_model.` layout; the table adds rows extrapolated to the released 20 + 40 blocks.
`--arch framepack`: FramePackI2V_HY's widths (HunyuanVideo's + SigLIP projection + history embedder), blocks as
`--hv_blocks`, one file in diffusers' names (as Kijai's FramePackI2V_HY_bf16.safetensors), extrapolated the same way.

The checkpoint (random bf16 weights) is written once under --work_dir and reused. Each measurement runs in a fresh
Python process, so its peak RSS (`ru_maxrss`) belongs to that load alone:

- `bf16`: the family's DiT loader with dtype=bfloat16, what the trainer does with --mixed_precision bf16;
- `fp8_base`: the same, then `memory.fp8.store_dit_in_fp8` with the architecture's `fp8_targets` (the block
  Linears; the class's `_skip_layerwise_casting_patterns` stay as they are), which is what --fp8_base does.

Usage: python benchmarks/bench_load_memory.py [--arch wan|hunyuan_video|framepack] [--hv_blocks D S] [--work_dir DIR]
       [--skip_write] [--device cpu|cuda] [--repeats N]
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
from _bench_models import BenchDiT, bench_dit, write_random_checkpoint  # noqa: E402
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

MODES = ("bf16", "fp8_base")


def measure_in_this_process(dit_spec: BenchDiT, path: Path, mode: str, device: str) -> dict:
    """Load (and for fp8_base cast) the DiT; called in a fresh child process."""
    import torch

    from musubi_tuner.architectures import get_architecture
    from musubi_tuner.memory.fp8 import store_dit_in_fp8

    import diffusers  # noqa: F401  (import cost is not part of the load)

    arch = get_architecture(dit_spec.arch)
    gc.collect()
    result = {"mode": mode, "rss_before_mib": current_rss_mib(), "peak_before_mib": peak_rss_mib()}
    with stopwatch() as load_s:
        dit = dit_spec.load(path, device=device, dtype=torch.bfloat16)
    result["load_s"] = load_s[0]
    result["cast_s"] = 0.0
    if mode == "fp8_base":
        with stopwatch() as cast_s:
            store_dit_in_fp8(dit, arch.fp8_targets, scaled=False)
        result["cast_s"] = cast_s[0]
    gc.collect()
    result["rss_loaded_mib"] = current_rss_mib()
    with stopwatch() as touch_s:
        _touch_every_weight(dit)
    result["touch_s"] = touch_s[0]
    gc.collect()
    result.update(weight_figures(dit))
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


def measure_in_child(args: argparse.Namespace, path: Path, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--arch", args.arch, "--hv_blocks", *map(str, args.hv_blocks), "--child", mode,
           "--path", str(path), "--device", args.device]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def weight_figures(dit) -> dict:
    """Parameter counts and weight MiB of a (possibly meta-device) model, as the measured rows report them."""
    params = list(dit.parameters())
    return {"params_m": sum(p.numel() for p in params) / 1e6,
            "fp8_params_m": sum(p.numel() for p in params if p.element_size() == 1) / 1e6,
            "param_mib": sum(p.numel() * p.element_size() for p in params) / 2**20}


def released_weights(dit_spec: BenchDiT, mode: str) -> dict:
    """`weight_figures` of the released model in `mode`, exact: built on the meta device and cast like a load."""
    from musubi_tuner.architectures import get_architecture
    from musubi_tuner.memory.fp8 import store_dit_in_fp8

    import torch

    dit = dit_spec.released_meta_model()._apply(lambda t: t.to(torch.bfloat16))  # nn.Module's, not diffusers' .to
    if mode == "fp8_base":
        store_dit_in_fp8(dit, get_architecture(dit_spec.arch).fp8_targets, scaled=False)
    return weight_figures(dit)


def extrapolate(result: dict, released: dict) -> dict:
    """A measured row scaled to the released model (`released`: its exact `weight_figures` in the same mode).
    Only blocks are added, so seconds and the MiB above "RSS before" are scaled linearly in the weight bytes:
    every added byte is assumed to cost what the measured bytes cost on average."""
    scale = released["param_mib"] / result["param_mib"]
    base = result["rss_before_mib"]
    out = dict(result, **released)
    for key in ("load_s", "cast_s", "cuda_peak_mib", "cuda_now_mib"):
        if key in result:
            out[key] = result[key] * scale
    for key in ("rss_loaded_mib", "rss_after_mib", "rss_after_anon_mib", "peak_rss_mib"):
        out[key] = base + (result[key] - base) * scale
    return out


def table_rows(results: list[dict], cuda: bool, label: str = "") -> list[list]:
    rows = []
    for r in results:
        row = [r["mode"] + label, r["load_s"], r["cast_s"], f"{r['params_m']:.0f} ({r['fp8_params_m']:.0f})",
               r["param_mib"], r["rss_before_mib"], r["rss_loaded_mib"],
               f"{r['rss_after_mib']:.0f} ({r['rss_after_anon_mib']:.0f})", r["peak_rss_mib"]]
        if cuda:
            row += [r.get("cuda_peak_mib", "-"), r.get("cuda_now_mib", "-")]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="wan", choices=("wan", "hunyuan_video", "framepack"),
                        help="which family's DiT")
    parser.add_argument("--hv_blocks", type=int, nargs=2, default=[4, 8], metavar=("DOUBLE", "SINGLE"),
                        help="HunyuanVideo / FramePack blocks written and measured (released: 20 40; about 0.7 GB per double "
                             "and 0.3 GB per single block in bf16)")
    parser.add_argument("--work_dir", type=Path, default=DEFAULT_WORK_DIR,
                        help="where the checkpoint is kept (Wan 2.8 GB, HunyuanVideo 4+8 blocks 5.7 GB)")
    parser.add_argument("--skip_write", action="store_true", help="never (re)write the checkpoint; it must exist")
    parser.add_argument("--device", default="cpu", help="load target: cpu or cuda")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per mode (the table shows each)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.hv_blocks) < 1:
        parser.error("--hv_blocks needs at least one double and one single block")
    offline_environment()
    dit_spec = bench_dit(args.arch, tuple(args.hv_blocks))
    if args.child:
        print(json.dumps(measure_in_this_process(dit_spec, args.path, args.child, args.device)))
        return []
    start = time.perf_counter()

    path = args.work_dir / dit_spec.file_name
    print(f"# bench_load_memory: {dit_spec.title}, random bf16 weights\n# machine: {machine_description()}")
    if not path.exists():
        if args.skip_write:
            raise SystemExit(f"{path} does not exist; run once without --skip_write to write it")
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing {path} (once) ...", flush=True)
        seconds = write_random_checkpoint(dit_spec.original_shapes(), path, prefix=dit_spec.key_prefix)
        print(f"written in {seconds:.1f} s")
    print(f"checkpoint: {path} ({path.stat().st_size / 2**30:.2f} GiB)")
    results = []
    for mode in MODES:
        for _ in range(args.repeats):
            results.append(measure_in_child(args, path, mode))
    cuda = args.device.startswith("cuda")
    headers = ["mode", "load s", "fp8 cast s", "params M (fp8)", "weights MiB", "RSS before MiB",
               "RSS loaded MiB", "RSS all read MiB (anon)", "peak RSS MiB"]
    if cuda:
        headers += ["CUDA peak MiB", "CUDA after MiB"]
    rows = table_rows(results, cuda)
    if dit_spec.released_meta_model is not None:
        released = {mode: released_weights(dit_spec, mode) for mode in MODES}
        rows += table_rows([extrapolate(r, released[r["mode"]]) for r in results], cuda,
                           label=" ESTIMATE for the released blocks (weights exact, the rest not measured)")
    print_table(headers, rows)
    print(f"(bench_load_memory took {time.perf_counter() - start:.0f} s)")
    return results


if __name__ == "__main__":
    main()
