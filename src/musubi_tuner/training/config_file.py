"""`--config_file`: training flags from a TOML file, overridden by the command line.

As in the reference, all TOML tables are flattened into one level (`[optimizer] learning_rate = 1e-4`
is `--learning_rate 1e-4`), the `.toml` suffix may be left off, and flags on the command line win.
Unlike the reference, a missing file, an unknown key or a value of the wrong type is a `UserError`
naming the file and key, and file values go through the same type/choice checks as flags.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Sequence

from musubi_tuner.errors import UserError

logger = logging.getLogger(__name__)


def resolve_config_path(value: str) -> Path:
    """`cfg` -> `cfg.toml`; the file must exist."""
    path = Path(value if value.endswith(".toml") else value + ".toml")
    if not path.is_file():
        raise UserError(f"--config_file: {path} not found")
    return path


def flatten_config(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """Merge every table's keys into one dict (top-level keys kept as they are)."""
    flat: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for section, value in data.items():
        items = value.items() if isinstance(value, dict) else [(section, value)]
        where = f"[{section}]" if isinstance(value, dict) else "top level"
        for key, item in items:
            if key in flat:
                logger.warning("%s: key %r in %s overrides the one in %s", path, key, where, origin[key])
            flat[key] = item
            origin[key] = where
    return flat


def _actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest != argparse.SUPPRESS and a.dest != "help"}


def _convert_one(action: argparse.Action, value: Any, where: str) -> Any:
    """Apply the flag's `type` to a value from the file, as if it had been typed on the command line."""
    if action.type is None or isinstance(value, bool):
        return value
    try:
        if action.type is int and isinstance(value, float):
            if not value.is_integer():
                raise ValueError("not a whole number")
            return int(value)
        # str() first so numbers take the same path as on the command line (`10.0` -> 10 steps).
        return action.type(value if isinstance(value, str) else str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        raise UserError(f"{where}: {value!r} is not valid for --{action.dest} ({exc})") from None


def _convert_value(action: argparse.Action, value: Any, where: str) -> Any:
    is_flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
    if is_flag:
        if not isinstance(value, bool):
            raise UserError(f"{where}: --{action.dest} is an on/off flag; write true or false, got {value!r}")
        return value
    if action.nargs in ("*", "+") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value]
        converted = [_convert_one(action, item, where) for item in items]
    else:
        if isinstance(value, (list, dict)):
            raise UserError(f"{where}: --{action.dest} takes one value, got {value!r}")
        converted = _convert_one(action, value, where)
    choices = action.choices
    if choices is not None:
        for item in converted if isinstance(converted, list) else [converted]:
            if item not in choices:
                allowed = ", ".join(map(str, choices))
                raise UserError(f"{where}: {item!r} is not a valid --{action.dest}; choose one of {allowed}")
    return converted


def load_config_values(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    """Read, flatten and type-check the TOML file against the parser's flags."""
    import toml

    try:
        data = toml.loads(path.read_text(encoding="utf-8"))
    except (toml.TomlDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--config_file {path}: not valid TOML ({exc})") from None
    flat = flatten_config(data, path)
    actions = _actions_by_dest(parser)
    unknown = sorted(k for k in flat if k not in actions)
    if unknown:
        raise UserError(f"--config_file {path}: unknown keys {', '.join(unknown)} (not training flags of this script)")
    return {key: _convert_value(actions[key], value, f"{path}: {key}") for key, value in flat.items()}


def apply_config_file(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse `argv`; when `--config_file` is given, its values become the defaults under the CLI."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config_file", type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    if not known.config_file:
        return parser.parse_args(argv)
    path = resolve_config_path(known.config_file)
    values = load_config_values(parser, path)
    logger.info("loading settings from %s", path)
    # argparse only fills defaults for names missing from the namespace, so file values sit between
    # the parser defaults and the command line.
    args = parser.parse_args(argv, namespace=argparse.Namespace(**values))
    args.config_file = str(path)
    return args
