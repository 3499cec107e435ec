"""Prompt specs: the one-line option syntax, prompt files (.txt/.toml/.json) and interactive input.

Line syntax (reference sample-prompt syntax): `a cat walks --w 832 --h 480 --f 81 --d 42 --s 20 --l 5.0
--n blurry`. Options are split on " --" (so a prompt cannot contain " --"); names are case-insensitive.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from musubi_tuner.errors import UserError
from musubi_tuner.utils.flag_types import finite_float, positive_int, seed_int

logger = logging.getLogger(__name__)

MIN_STEPS, MAX_STEPS = 1, 1000


@dataclass(kw_only=True)
class PromptSpec:
    """One generation request. None means "use the script's / architecture's default"."""

    prompt: str = ""
    negative_prompt: str | None = None
    """--n"""
    width: int | None = None
    """--w"""
    height: int | None = None
    """--h"""
    frames: int | None = None
    """--f (1 = still image)."""
    seed: int | None = None
    """--d"""
    steps: int | None = None
    """--s, 1..1000."""
    guidance_scale: float | None = None
    """--l: classifier-free guidance scale."""
    embedded_guidance: float | None = None
    """--g: distilled (embedded) guidance (HunyuanVideo, FramePack, FLUX); Wan ignores it."""
    flow_shift: float | None = None
    """--fs"""
    image_path: str | None = None
    """--i: start image (I2V)."""
    end_image_path: str | None = None
    """--ei"""
    control_path: str | None = None
    """--cn: control video or folder (Fun-Control)."""
    control_image_paths: list[str] = field(default_factory=list)
    """--ci, repeatable."""
    one_frame: str | None = None
    """--of: one-frame inference options."""
    image_mask_path: str | None = None
    """--im"""
    control_image_mask_paths: list[str] = field(default_factory=list)
    """--cim, repeatable."""
    video_sections: int | None = None
    """--vs (FramePack)."""
    video_seconds: float | None = None
    """--f in FramePack's generate script: the video length in seconds."""
    magcache_retention_ratio: float | None = None
    """--mcrr (FramePack MagCache)."""
    magcache_threshold: float | None = None
    """--mct (FramePack MagCache)."""
    magcache_k: int | None = None
    """--mck (FramePack MagCache)."""
    index: int = 0
    """Position in the prompt file (names sample files)."""
    source: str = field(default="", compare=False)
    """Where the request came from (`prompts.txt line 3`), for error messages."""


class PromptOptionError(UserError):
    """A prompt line/entry with a bad option or value; names the file, the line and the option."""


def _steps(value: str) -> int:
    steps = positive_int(value)
    if steps > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"must be in {MIN_STEPS}..{MAX_STEPS}, got {steps}")
    return steps


def _text(value: str) -> str:
    return value.strip()


# option -> (PromptSpec field, converter). Repeatable options append to a list field.
LINE_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "w": ("width", positive_int),
    "h": ("height", positive_int),
    "f": ("frames", positive_int),
    "d": ("seed", seed_int),
    "s": ("steps", _steps),
    "l": ("guidance_scale", finite_float),
    "g": ("embedded_guidance", finite_float),
    "fs": ("flow_shift", finite_float),
    "n": ("negative_prompt", _text),
    "i": ("image_path", _text),
    "ei": ("end_image_path", _text),
    "cn": ("control_path", _text),
    "ci": ("control_image_paths", _text),
    "of": ("one_frame", _text),
    "im": ("image_mask_path", _text),
    "cim": ("control_image_mask_paths", _text),
    "vs": ("video_sections", positive_int),
}
OPTION_OF_FIELD = {name: f"--{option}" for option, (name, _) in LINE_OPTIONS.items()}
"""PromptSpec field -> the in-line option that sets it (`width` -> `--w`), for error messages."""
LIST_FIELDS = {"control_image_paths", "control_image_mask_paths"}


def _start(defaults: PromptSpec | None) -> PromptSpec:
    # A copy, so list fields of the defaults are never appended to.
    if defaults is None:
        return PromptSpec()
    return dataclasses.replace(defaults, **{name: list(getattr(defaults, name)) for name in LIST_FIELDS})


def _set(spec: PromptSpec, name: str, value: Any) -> None:
    if name in LIST_FIELDS:
        values = value if isinstance(value, list) else [value]
        setattr(spec, name, [*getattr(spec, name), *values])
    else:
        setattr(spec, name, value)


def parse_prompt_line(line: str, defaults: PromptSpec | None = None, g_means_cfg: bool = False,
                      where: str = "prompt", options: dict[str, tuple[str, Callable[[str], Any]]] | None = None
                      ) -> PromptSpec | None:
    """Parse one prompt line; None for a blank line or a `#` comment.

    Fields not given on the line come from `defaults`. An unknown option or a bad value raises
    `PromptOptionError` naming `where` (`prompts.txt line 3`) and the option: the reference skipped them with a
    warning, which hid typos until a sample came out wrong. `g_means_cfg=True` makes `--g` the CFG scale, as
    in the reference's Wan/FramePack generate scripts where `--g` and `--l` are the same. `options`: a script's
    own option table instead of `LINE_OPTIONS` (FramePack's generate script reads `--f` as seconds).
    """
    options = LINE_OPTIONS if options is None else options
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    parts = line.split(" --")
    spec = _start(defaults)
    spec.prompt = parts[0].strip()
    spec.source = where
    lists_seen: set[str] = set()
    for part in parts[1:]:
        if not part.strip():
            continue
        option, _, value = part.strip().partition(" ")
        option = option.lower()
        if g_means_cfg and option == "g":
            option = "l"
        if option not in options:
            known = " ".join(f"--{o}" for o in options)
            raise PromptOptionError(f"{where}: --{option}: unknown option; the options are {known}")
        name, convert = options[option]
        try:
            converted = convert(value.strip())
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise PromptOptionError(f"{where}: --{option} {value.strip()!r}: {exc}") from None
        if name in LIST_FIELDS and name not in lists_seen:
            setattr(spec, name, [])  # options on the line replace the defaults' list
            lists_seen.add(name)
        _set(spec, name, converted)
    return spec


# Keys of .toml/.json prompt dicts, as the reference's prompt dicts name them (note: `guidance_scale`
# there is the embedded guidance and `cfg_scale` the CFG scale), plus our extra options.
DICT_KEYS: dict[str, str] = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "width": "width",
    "height": "height",
    "frame_count": "frames",
    "seed": "seed",
    "sample_steps": "steps",
    "cfg_scale": "guidance_scale",
    "guidance_scale": "embedded_guidance",
    "discrete_flow_shift": "flow_shift",
    "image_path": "image_path",
    "end_image_path": "end_image_path",
    "control_video_path": "control_path",
    "control_image_path": "control_image_paths",
    "one_frame": "one_frame",
    "image_mask_path": "image_mask_path",
    "control_image_mask_path": "control_image_mask_paths",
    "video_sections": "video_sections",
}
_FIELD_TYPES = {name: convert for name, convert in LINE_OPTIONS.values() if convert is not _text}


def prompt_from_dict(
    data: dict[str, Any], defaults: PromptSpec | None = None, where: str = "prompt file"
) -> PromptSpec:
    """A PromptSpec from a .toml/.json prompt dict (reference key names); bad values raise UserError."""
    spec = _start(defaults)
    spec.source = where
    lists_seen: set[str] = set()
    for key, value in data.items():
        if key in ("subset", "enum"):
            continue
        name = DICT_KEYS.get(key)
        if name is None:
            logger.warning("unknown key %r ignored in %s", key, where)
            continue
        try:
            if name in LIST_FIELDS:
                value = [str(v) for v in value] if isinstance(value, list) else [str(value)]
                if name not in lists_seen:
                    setattr(spec, name, [])
                    lists_seen.add(name)
            elif name in _FIELD_TYPES:
                if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                    raise ValueError(f"expected a number, got {type(value).__name__}")
                if isinstance(value, float) and value.is_integer():
                    value = int(value)  # TOML/JSON `20.0` is the step count 20
                value = _FIELD_TYPES[name](str(value))
            else:
                value = str(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise PromptOptionError(f"{where}: key {key!r} has a bad value {value!r} ({exc})") from None
        _set(spec, name, value)
    return spec


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib

        with open(path, "rb") as f:
            return tomllib.load(f)
    except ImportError:  # Python 3.10
        import toml

        return toml.load(path)


def _toml_entries(path: Path) -> list[dict[str, Any]]:
    data = _read_toml(path)
    table = data.get("prompt")
    if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
        raise UserError(f"{path}: a .toml prompt file needs a [prompt] table with [[prompt.subset]] entries")
    shared = {k: v for k, v in table.items() if k != "subset"}
    return [{**shared, **subset} for subset in table["subset"]]


def load_prompt_file(
    path: str | os.PathLike, defaults: PromptSpec | None = None, g_means_cfg: bool = False,
    options: dict[str, tuple[str, Callable[[str], Any]]] | None = None,
) -> list[PromptSpec]:
    """Read prompts from .txt (one line each), .toml ([prompt] + [[prompt.subset]]) or .json (a list).

    JSON list items may be dicts (reference key names) or option lines. `index` is the position.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist (--sample_prompts / --from_file)")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        entries: list[Any] = path.read_text(encoding="utf-8").splitlines()
    elif suffix == ".toml":
        entries = _toml_entries(path)
    elif suffix == ".json":
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(entries, list):
            raise UserError(f"{path}: a .json prompt file must hold a list of prompts")
    else:
        raise UserError(f"prompt file {path} must end in .txt, .toml or .json")

    specs: list[PromptSpec] = []
    for n, entry in enumerate(entries):
        if isinstance(entry, str):
            where = f"{path} line {n + 1}" if suffix == ".txt" else f"{path} entry {n}"
            spec = parse_prompt_line(entry, defaults, g_means_cfg=g_means_cfg, where=where, options=options)
        elif isinstance(entry, dict):
            spec = prompt_from_dict(entry, defaults, where=f"{path} entry {n}")
        else:
            raise UserError(f"{path} entry {n}: expected a prompt string or table, got {type(entry).__name__}")
        if spec is not None:
            spec.index = len(specs)
            specs.append(spec)
    return specs


def _console_lines() -> Iterator[str]:
    """Lines typed at the console: prompt_toolkit (history, editing) if installed, else input()."""
    try:
        from prompt_toolkit import PromptSession

        session = PromptSession()
        read = lambda: session.prompt("> ")  # noqa: E731
    except ImportError:
        read = lambda: input("> ")  # noqa: E731
    while True:
        try:
            yield read()
        except EOFError:  # Ctrl+D (Ctrl+Z on Windows) ends the session
            return


def interactive_prompts(
    stream: TextIO | None = None, defaults: PromptSpec | None = None, g_means_cfg: bool = False,
    options: dict[str, tuple[str, Callable[[str], Any]]] | None = None,
) -> Iterator[PromptSpec]:
    """Yield one PromptSpec per entered line (inline options allowed) until end of input.

    With a console on stdin the line editor is used; any other stream is read line by line.
    Blank lines and `#` comments are skipped.
    """
    stream = sys.stdin if stream is None else stream
    if stream is sys.stdin and sys.stdin.isatty():
        print("Enter a prompt per line (options like --w 832 --d 42); Ctrl+D to finish.", file=sys.stderr)
        lines: Iterator[str] = _console_lines()
    else:
        lines = iter(stream.readline, "")
    index = 0
    for number, line in enumerate(lines, start=1):
        try:
            spec = parse_prompt_line(line, defaults, g_means_cfg=g_means_cfg, where=f"input line {number}",
                                     options=options)
        except PromptOptionError as exc:  # a typo must not end a session whose models are loaded
            print(f"error: {exc}", file=sys.stderr)
            continue
        if spec is not None:
            spec.index = index
            index += 1
            yield spec
