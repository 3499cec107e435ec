"""Every request checked before any model loads: sizes the architecture can make, media files that exist.

Prompt files used to be checked one line at a time when a line was reached, so a bad `--w 50` on the last line
stopped a training run at its first sample step. Errors name where the request came from (`prompts.txt line 3`)
and the in-line option (`--w`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable

from musubi_tuner.architectures.base import Architecture
from musubi_tuner.errors import UserError
from musubi_tuner.inference.generate import resolve_spec
from musubi_tuner.inference.prompts import OPTION_OF_FIELD, PromptOptionError, PromptSpec

MEDIA_FIELDS = ("image_path", "end_image_path", "control_path", "image_mask_path")
MEDIA_LIST_FIELDS = ("control_image_paths", "control_image_mask_paths")


def check_request(arch: Architecture, spec: PromptSpec, args: argparse.Namespace | None = None) -> PromptSpec:
    """`spec` resolved against the architecture's defaults for these flags (e.g. Wan's --task); raises
    PromptOptionError naming its source."""
    resolved = resolve_spec(arch, spec, args)
    where = spec.source or "prompt"
    try:
        arch.check_request_size(resolved.width, resolved.height, resolved.frames, OPTION_OF_FIELD)
        arch.check_request_options(resolved, args)
    except UserError as exc:
        raise PromptOptionError(f"{where}: {exc}") from None
    trim = getattr(args, "trim_tail_frames", 0)  # Wan's; checked here against each request's own frame count
    if trim and trim >= resolved.frames:
        raise PromptOptionError(f"{where}: --trim_tail_frames {trim} would remove all {resolved.frames} frames; use "
                                "a smaller value or more frames")
    if getattr(args, "video_path", None):  # video to video: the strength must leave a step of this request's steps
        from musubi_tuner.inference.video_to_video import steps_for_strength

        try:
            steps_for_strength(resolved.steps, args.strength)
        except UserError as exc:
            raise PromptOptionError(f"{where}: {exc}") from None
    for field in MEDIA_FIELDS + MEDIA_LIST_FIELDS:
        value = getattr(resolved, field)
        for path in value if isinstance(value, list) else [value]:
            if path and not Path(path).exists():
                raise PromptOptionError(f"{where}: {OPTION_OF_FIELD[field]} {path}: file not found")
    return resolved


def checked_requests(arch: Architecture, specs: Iterable[PromptSpec],
                     args: argparse.Namespace | None = None) -> list[PromptSpec]:
    """Resolve and check every request; the first bad one raises (before anything is loaded)."""
    return [check_request(arch, spec, args) for spec in specs]
