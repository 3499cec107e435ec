"""Entry points: every console script resolves, the reference-named scripts stay thin and run as files."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "musubi_tuner"
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
# the reference's per-architecture script names: <arch>_<stage>.py, and HunyuanVideo's unprefixed caching scripts
HV_UNPREFIXED = ("cache_latents", "cache_text_encoder_outputs")
ARCH_SCRIPTS = sorted([p for p in PACKAGE.glob("*_*.py") if p.stem.split("_")[0] in ("wan", "flux", "hv", "fpack")]
                      + [PACKAGE / f"{stem}.py" for stem in HV_UNPREFIXED])


def console_name(stem: str) -> str:
    """`wan_train_network` -> `musubi-wan-train-network`; HunyuanVideo's `cache_latents` -> `musubi-hv-cache-latents`."""
    return f"musubi-{'hv_' if stem in HV_UNPREFIXED else ''}{stem}".replace("_", "-")


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_resolves_to_a_main(name):
    module_name, func = SCRIPTS[name].split(":")
    assert callable(getattr(importlib.import_module(module_name), func))


@pytest.mark.parametrize("path", ARCH_SCRIPTS, ids=lambda p: p.name)
def test_architecture_scripts_are_thin_wrappers(path):
    """Parse, then call the package: a main() of one statement and the __main__ guard, nothing else."""
    tree = ast.parse(path.read_text())
    body = [n for n in tree.body if not isinstance(n, (ast.Import, ast.ImportFrom, ast.Expr))]
    assert [type(n).__name__ for n in body] == ["FunctionDef", "If"], path.name
    assert body[0].name == "main" and len(body[0].body) == 1
    assert console_name(path.stem) in SCRIPTS, "every reference script is also a console command"


@pytest.mark.parametrize("script", ["wan_train_network.py", "wan_generate_video.py", "hv_generate_video.py",
                                    "cache_latents.py"])
def test_scripts_run_as_files_in_the_reference_layout(script):
    result = subprocess.run([sys.executable, str(PACKAGE / script), "--help"], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "--dit" in result.stdout or "--vae" in result.stdout


def test_a_user_error_is_one_line_and_exit_code_2(tmp_path):
    result = subprocess.run([sys.executable, str(PACKAGE / "wan_cache_latents.py"), "--dataset_config",
                             str(tmp_path / "missing.toml")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "missing.toml" in lines[0] and "Traceback" not in result.stderr


def test_logging_follows_the_current_stderr(monkeypatch):
    """The CLI log handler must not keep a stream that a harness later closes (it would print logging errors)."""
    import io
    import logging

    from musubi_tuner.cli import setup_logging

    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging()
    logging.getLogger("musubi_tuner").warning("one")
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("musubi_tuner").warning("two")
    assert second.getvalue().endswith("two\n")
