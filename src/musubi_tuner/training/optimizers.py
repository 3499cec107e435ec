"""`--optimizer_type` / `--optimizer_args` -> a torch optimizer.

Names as in the reference (case-insensitive): `adamw` (default), `adamw8bit` (bitsandbytes),
`adafactor` (transformers; `relative_step=True` unless given, which makes the LR scheduler the
Adafactor one), or any `module.Class` (a bare class name is looked up in `torch.optim`).
Gradient clipping (--max_grad_norm) is the loop's job. Schedule-free optimizers are flagged so the
scheduler becomes a dummy and the loop switches them with `optimizer_train_mode`/`optimizer_eval_mode`.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from musubi_tuner.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizerInfo:
    """What was built, for logs, metadata (`ss_optimizer`) and the scheduler choice."""

    name: str
    """`module.Class` of the optimizer, e.g. `torch.optim.adamw.AdamW`."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    schedule_free: bool = False
    adafactor_relative_step: bool = False
    """transformers Adafactor computing its own LR: needs the `adafactor` scheduler."""
    initial_lr: float | None = None

    @property
    def args_text(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.kwargs.items())

    @property
    def metadata_value(self) -> str:
        """`ss_optimizer` as the reference writes it: `name(k=v,...)`."""
        return self.name + (f"({self.args_text})" if self.kwargs else "")


def parse_key_value_args(items: Iterable[str] | None, flag: str) -> dict[str, Any]:
    """`["weight_decay=0.01", "betas=0.9,0.999"]` -> {"weight_decay": 0.01, "betas": (0.9, 0.999)}.

    Values are Python literals (ast.literal_eval); write strings quoted: `mode="'fast'"`.
    """
    parsed: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"{flag}: {item!r} is not key=value")
        try:
            parsed[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            raise UserError(
                f"{flag}: value of {key!r} ({text!r}) is not a Python literal; use numbers, True/False, "
                "tuples like 0.9,0.999, or quoted strings like \"'text'\""
            ) from None
    return parsed


def import_class(path: str, default_module: Any, flag: str) -> type:
    """`pkg.mod.Class` (or a bare `Class` from `default_module`) -> the class; UserError when missing."""
    module_name, _, class_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else default_module
    except ImportError as exc:
        raise UserError(f"{flag} {path}: cannot import {module_name} ({exc}); is the package installed?") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise UserError(f"{flag} {path}: {getattr(module, '__name__', module_name)} has no {class_name}")
    return cls


def is_schedule_free(optimizer_type: str) -> bool:
    """Schedule-free optimizers (e.g. `schedulefree.AdamWScheduleFree`) drive their own LR."""
    return "schedulefree" in optimizer_type.lower()


def _adafactor(
    args: argparse.Namespace, params: list, kwargs: dict[str, Any]
) -> tuple[torch.optim.Optimizer, OptimizerInfo]:
    from transformers.optimization import Adafactor

    kwargs.setdefault("relative_step", True)
    if kwargs.get("warmup_init", False) and not kwargs["relative_step"]:
        logger.info("Adafactor: warmup_init=True needs relative_step=True; turning it on")
        kwargs["relative_step"] = True
    lr = args.learning_rate
    if kwargs["relative_step"]:
        # Adafactor computes its own step size; --learning_rate becomes the initial LR of its scheduler.
        logger.info("Adafactor relative_step: --learning_rate %s is only the initial LR of the adafactor scheduler", lr)
        optimizer = Adafactor(_without_lr(params), lr=None, **kwargs)
    else:
        if args.lr_scheduler != "constant_with_warmup":
            logger.warning("Adafactor without relative_step: --lr_scheduler constant_with_warmup is recommended")
        optimizer = Adafactor(params, lr=lr, **kwargs)
    info = OptimizerInfo(
        name=_class_name(Adafactor),
        kwargs=kwargs,
        adafactor_relative_step=kwargs["relative_step"],
        initial_lr=lr,
    )
    return optimizer, info


def _without_lr(params: list) -> list:
    # Per-group "lr" would override Adafactor's relative step size with a fixed one.
    return [{k: v for k, v in g.items() if k != "lr"} if isinstance(g, dict) else g for g in params]


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"


def _resolve_class(optimizer_type: str) -> type:
    lowered = optimizer_type.lower()
    if lowered in ("", "adamw"):
        return torch.optim.AdamW
    if lowered == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise UserError("--optimizer_type AdamW8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bitsandbytes.optim.AdamW8bit
    return import_class(optimizer_type, torch.optim, "--optimizer_type")


def build_optimizer(args: argparse.Namespace, param_groups: list) -> tuple[torch.optim.Optimizer, OptimizerInfo]:
    """Build the optimizer named by --optimizer_type over `param_groups` (params or dicts with "params"/"lr")."""
    kwargs = parse_key_value_args(args.optimizer_args, "--optimizer_args")
    optimizer_type = args.optimizer_type or "AdamW"
    if optimizer_type.lower() == "adafactor":
        return _adafactor(args, param_groups, kwargs)
    cls = _resolve_class(optimizer_type)
    try:
        optimizer = cls(param_groups, lr=args.learning_rate, **kwargs)
    except TypeError as exc:
        raise UserError(f"--optimizer_args for {optimizer_type}: {exc}") from None
    logger.info("optimizer %s %s", _class_name(cls), kwargs)
    info = OptimizerInfo(
        name=_class_name(cls),
        kwargs=kwargs,
        schedule_free=is_schedule_free(optimizer_type),
        initial_lr=args.learning_rate,
    )
    return optimizer, info


def optimizer_train_mode(optimizer: torch.optim.Optimizer) -> None:
    """Call before training steps (schedule-free optimizers swap their weights; others: no-op)."""
    fn = getattr(optimizer, "train", None)
    if callable(fn):
        fn()


def optimizer_eval_mode(optimizer: torch.optim.Optimizer) -> None:
    """Call before sampling or saving (schedule-free optimizers swap in the averaged weights)."""
    fn = getattr(optimizer, "eval", None)
    if callable(fn):
        fn()
