"""Start-up cost of each command: `--help`, its imports before the first model load, and that first load.

Every figure comes from a fresh `python` process (median of --repeats runs), so nothing is cached between
them. "before load" imports the entry script plus what its driver imports before it reads a model file (for
training that includes accelerate, whose Accelerator is built first). "first load" then loads the command's first
model from a tiny file written in the same layout as the published one, so its time is almost all imports
(diffusers model classes, key converters). The top modules come from one extra `python -X importtime` run of
both steps (cumulative microseconds of each top-level import).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_util import REPO_ROOT, machine_description, median, offline_environment, print_table  # noqa: E402

# label -> (entry module, modules imported before the first model load, code of the first load; {files} filled in)
COMMANDS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "wan cache latents": (
        "musubi_tuner.wan_cache_latents", ("musubi_tuner.caching", "musubi_tuner.architectures.wan"),
        "from musubi_tuner.architectures.wan.vae_files import load_wan_vae; load_wan_vae({wan_vae!r})"),
    "wan cache text": (
        "musubi_tuner.wan_cache_text_encoder_outputs", ("musubi_tuner.caching", "musubi_tuner.architectures.wan"),
        "from musubi_tuner.architectures.wan.text_encoder_files import load_umt5; load_umt5({wan_t5!r})"),
    "wan train": (
        "musubi_tuner.wan_train_network",
        ("musubi_tuner.training.trainer", "musubi_tuner.architectures.wan", "accelerate"),
        "from musubi_tuner.architectures.wan.dit_files import load_wan_dit; load_wan_dit({wan_dit!r})"),
    "wan generate": (
        "musubi_tuner.wan_generate_video", ("musubi_tuner.inference.generate_cli", "musubi_tuner.architectures.wan"),
        "from musubi_tuner.architectures.wan.dit_files import load_wan_dit; load_wan_dit({wan_dit!r})"),
    "flux_kontext cache latents": (
        "musubi_tuner.flux_kontext_cache_latents",
        ("musubi_tuner.caching", "musubi_tuner.architectures.flux_kontext"),
        "from musubi_tuner.architectures.flux_kontext.ae_files import load_flux_ae; load_flux_ae({flux_ae!r})"),
    "flux_kontext cache text": (
        "musubi_tuner.flux_kontext_cache_text_encoder_outputs",
        ("musubi_tuner.caching", "musubi_tuner.architectures.flux_kontext"),
        "from musubi_tuner.architectures.flux_kontext.text_encoder_files import load_t5xxl; "
        "load_t5xxl({flux_t5!r}, device='cpu', dtype=__import__('torch').float32)"),
    "flux_kontext train": (
        "musubi_tuner.flux_kontext_train_network",
        ("musubi_tuner.training.trainer", "musubi_tuner.architectures.flux_kontext", "accelerate"),
        "from musubi_tuner.architectures.flux_kontext.dit_files import load_flux_dit; load_flux_dit({flux_dit!r})"),
    "flux_kontext generate": (
        "musubi_tuner.flux_kontext_generate_image",
        ("musubi_tuner.inference.generate_cli", "musubi_tuner.architectures.flux_kontext"),
        "from musubi_tuner.architectures.flux_kontext.dit_files import load_flux_dit; load_flux_dit({flux_dit!r})"),
    "merge_lora": (
        "musubi_tuner.merge_lora", ("musubi_tuner.networks.lora_files",),
        "from musubi_tuner.models.checkpoint_io import load_state_dict; load_state_dict({wan_dit!r})"),
    "convert_lora": (
        "musubi_tuner.convert_lora", (),
        "from musubi_tuner.convert_lora import main; "
        "main(['--input', {wan_lora!r}, '--output', {wan_lora_out!r}, '--target', 'diffusers', '--arch', 'wan'])"),
}

_PROBE = """
import json, time
t0 = time.perf_counter()
{imports}
t1 = time.perf_counter()
{load}
t2 = time.perf_counter()
print("BENCH" + json.dumps([t1 - t0, t2 - t1]))
"""


def write_tiny_files(folder: Path) -> dict[str, str]:
    """The tiny models in their published layouts, and a Wan LoRA (written once per benchmark run)."""
    import torch

    from musubi_tuner.architectures.flux_kontext.tiny import write_tiny_flux_kontext_files
    from musubi_tuner.architectures.wan.tiny import write_tiny_wan_files
    from musubi_tuner.architectures.wan.tiny_encoders import write_tiny_wan_encoder_files
    from musubi_tuner.networks.lora_files import save_lora_file

    wan, wan_text, flux = write_tiny_wan_files(folder), write_tiny_wan_encoder_files(folder), \
        write_tiny_flux_kontext_files(folder)
    lora = {}
    for block in range(2):
        stem = f"lora_unet_blocks_{block}_self_attn_q"
        lora[f"{stem}.lora_down.weight"] = torch.randn(4, 256)
        lora[f"{stem}.lora_up.weight"] = torch.randn(256, 4)
        lora[f"{stem}.alpha"] = torch.tensor(2.0)
    save_lora_file(lora, folder / "lora.safetensors", None)
    return {"wan_vae": str(wan["vae"]), "wan_dit": str(wan["dit"]), "wan_t5": str(wan_text["t5"]),
            "flux_ae": str(flux["ae"]), "flux_dit": str(flux["dit"]), "flux_t5": str(flux["t5"]),
            "wan_lora": str(folder / "lora.safetensors"), "wan_lora_out": str(folder / "lora_out.safetensors")}


def _python(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, check=True)


def help_seconds(entry: str) -> float:
    start = time.perf_counter()
    _python(["-m", entry, "--help"])
    return time.perf_counter() - start


def probe(entry: str, modules: tuple[str, ...], load: str, files: dict[str, str]) -> str:
    imports = "\n".join(f"import {m}" for m in (entry, *modules))
    return _PROBE.format(imports=imports, load=load.format(**files))


def probe_seconds(code: str) -> tuple[float, float]:
    out = _python(["-c", code]).stdout
    line = next(x for x in out.splitlines() if x.startswith("BENCH"))
    before, load = json.loads(line[len("BENCH"):])
    return before, load


def top_imports(code: str, count: int = 5) -> list[tuple[str, float]]:
    """The `count` slowest top-level imports (cumulative seconds) of one `-X importtime` run."""
    stderr = _python(["-X", "importtime", "-c", code]).stderr
    top = []
    for line in stderr.splitlines():
        fields = line[len("import time:"):].split("|") if line.startswith("import time:") else []
        # a top-level import's name follows its bar after one space; nested ones are indented further
        if len(fields) == 3 and fields[1].strip().isdigit() and not fields[2].startswith("  "):
            top.append((fields[2].strip(), int(fields[1]) / 1e6))
    return sorted(top, key=lambda x: -x[1])[:count]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per figure (median reported)")
    parser.add_argument("--only", nargs="+", default=None, choices=sorted(COMMANDS), metavar="COMMAND",
                        help=f"commands to measure (default all: {', '.join(COMMANDS)})")
    args = parser.parse_args(argv)
    offline_environment()
    print(machine_description())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = write_tiny_files(Path(tmp))
        for label in args.only or COMMANDS:
            entry, modules, load = COMMANDS[label]
            code = probe(entry, modules, load, files)
            helps = [help_seconds(entry) for _ in range(args.repeats)]
            runs = [probe_seconds(code) for _ in range(args.repeats)]
            top = ", ".join(f"{name} {sec:.1f}" for name, sec in top_imports(code))
            rows.append([label, f"{median(helps):.1f}", f"{median([r[0] for r in runs]):.1f}",
                         f"{median([r[1] for r in runs]):.1f}", top])
            print(f"{label}: done", file=sys.stderr, flush=True)
    print_table(["command", "--help s", "before load s", "first load s", "top imports (s, cumulative)"], rows)


if __name__ == "__main__":
    main()
