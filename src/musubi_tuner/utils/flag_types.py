"""Range-checked argparse `type=` helpers and a parser whose errors are one line.

Every numeric flag of the train/cache/generate/merge/convert scripts goes through one of these, so a value that
would be silently replaced or crash later (`--video_length 0`, `--learning_rate nan`, `--network_dim -4`) is an
error naming the flag before any model loads. `--config_file` values pass through the same `type=`.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

from musubi_tuner.errors import UserError


class FlagError(UserError):
    """A command-line flag with a bad value, an unknown flag or a missing required one."""


class FlagParser(argparse.ArgumentParser):
    """argparse, but a bad command line is a `FlagError` (one line, exit 2 through `run_cli`), not the usage dump."""

    def error(self, message: str):  # type: ignore[override]
        raise FlagError(f"{message} (see {self.prog} --help)")


def _number(text: str, kind: type) -> int | float:
    try:
        if kind is int:
            return int(text)
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def int_at_least(minimum: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        value = _number(text, int)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    convert.__name__ = f"int>={minimum}"  # argparse names the type in some messages
    return convert


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def finite_float(text: str) -> float:
    return _number(text, float)


def positive_float(text: str) -> float:
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def unit_float(text: str) -> float:
    """A probability or ratio in [0, 1]."""
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def seed_int(text: str) -> int:
    """A seed torch's generators accept (they take a signed 64-bit value; negative seeds are refused as the
    reference's numpy seeding refuses them)."""
    value = _number(text, int)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in 0..2**63-1, got {value}")
    return value


def device_name(text: str) -> str:
    """`cpu`, `cuda`, `cuda:1`, `mps`: must parse and exist on this machine (checked before any model loads)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available here (no GPU, or a CPU-only torch "
                                             f"{torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available here; use --device cpu")
    return text


def warn_flags_without_effect(args: argparse.Namespace, table: dict[str, tuple[object, str]]) -> None:
    """Flags parsed for compatibility that have nothing to act on here: a non-default value gets a warning.
    table: flag name -> (default, why it has no effect)."""
    import logging

    for name, (default, why) in table.items():
        if getattr(args, name, default) != default:
            logging.getLogger("musubi_tuner").warning("--%s has no effect here: %s", name, why)
