"""Shared CLI plumbing: offline mode, logging set-up and turning user errors into one line."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from musubi_tuner.errors import UserError

logger = logging.getLogger("musubi_tuner")


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of each record (not the stream at set-up), so a caller
    that swaps stderr (a test harness, a notebook) never leaves the handler writing to a closed file."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the package logger once, for command-line runs only (never at import)."""
    if logger.handlers:
        return
    handler = _CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a script's `main`; exit 2 with one clear line on a `UserError`, 130 on Ctrl-C."""
    # Nothing may reach the network at run time: tokenizers/configs come from local paths or a filled cache.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    setup_logging()
    try:
        main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
