"""`--lr_scheduler` and friends -> a torch LR scheduler.

The named schedules are transformers' (`piecewise_constant` is diffusers'), called with the
reference's arguments: `cosine_with_min_lr` and `warmup_stable_decay` get half of
--lr_scheduler_num_cycles, `warmup_stable_decay` gets the steps left between warmup and decay as its
stable phase. `rex` is our REX schedule. `--lr_scheduler_type module.Class` builds any scheduler
class with --lr_scheduler_args. Schedule-free optimizers get `ConstantLogScheduler` (logging only).

`num_training_steps` is what the schedule counts: the reference passes max_train_steps times the
number of processes, because accelerate steps a prepared scheduler once per process.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from musubi_tuner.errors import UserError
from musubi_tuner.training.optimizers import OptimizerInfo, import_class, parse_key_value_args

logger = logging.getLogger(__name__)

SCHEDULER_NAMES = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
    "piecewise_constant",
    "rex",
    "adafactor",
)


class ConstantLogScheduler:
    """Stand-in for schedule-free optimizers: `step()` does nothing, `get_last_lr()` reports the groups' LR."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self) -> None:
        pass

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class RexLR(LRScheduler):
    """REX ("reflected exponential") decay from max_lr to min_lr, after a linear warmup from min_lr.

    At step k after warmup, with R steps left in total and z = (R - k) / R, the factor is
    m + (1 - m) * z / (rex_alpha + rex_beta * z), m = min_lr / max_lr; warmup step s (1..W-1) is
    min_lr + (max_lr - min_lr) * (s - 1) / (W - 1). Past the end the LR stays at min_lr.
    Step 0 of a warmup is min_lr (the reference computes an odd value there).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_lr: float,
        min_lr: float = 0.0,
        num_steps: int = 0,
        num_warmup_steps: int = 0,
        rex_alpha: float = 0.1,
        rex_beta: float = 0.9,
        last_epoch: int = -1,
    ) -> None:
        if min_lr > max_lr:
            raise UserError(f"rex: min LR {min_lr} must not exceed --learning_rate {max_lr}")
        if num_warmup_steps > num_steps:
            raise UserError(f"rex: --lr_warmup_steps ({num_warmup_steps}) exceeds the training steps ({num_steps})")
        self.max_lr, self.min_lr = max_lr, min_lr
        self.num_steps, self.num_warmup_steps = num_steps, num_warmup_steps
        self.rex_alpha, self.rex_beta = rex_alpha, rex_beta
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        super().__init__(optimizer, last_epoch)

    def _factor_or_lr(self, step: int) -> tuple[str, float]:
        warm = self.num_warmup_steps
        if warm >= 1 and step == 0:
            return "lr", self.min_lr
        if warm == 1 and step == 1:
            return "lr", self.min_lr
        if warm > 1 and 1 <= step <= warm - 1:
            return "lr", self.min_lr + (self.max_lr - self.min_lr) * (step - 1) / (warm - 1)
        after, remaining = step - warm, self.num_steps - warm
        if after >= remaining or remaining <= 0:
            return "lr", self.min_lr
        z = (remaining - after % remaining) / remaining
        ratio = self.min_lr / self.max_lr
        return "factor", ratio + (1.0 - ratio) * (z / (self.rex_alpha + self.rex_beta * z))

    def get_lr(self) -> list[float]:
        kind, value = self._factor_or_lr(self.last_epoch)
        if kind == "lr":
            return [value for _ in self.base_lrs]
        return [base * value for base in self.base_lrs]


def resolve_steps(value: int | float | None, num_training_steps: int, flag: str) -> int:
    """--lr_warmup_steps / --lr_decay_steps: an int is steps, a float (< 1) a ratio of the total."""
    if value is None:
        return 0
    if isinstance(value, float):
        if not 0 <= value < 1:
            raise UserError(f"{flag} as a ratio of the total steps must be in [0, 1), got {value}")
        return int(value * num_training_steps)
    return int(value)


def _no_warmup(name: str, warmup: int) -> None:
    if warmup:
        raise UserError(f"--lr_scheduler {name} has no warmup; set --lr_warmup_steps 0 or use constant_with_warmup")


def _custom_scheduler(args: argparse.Namespace, optimizer, kwargs: dict[str, Any]):
    cls = import_class(args.lr_scheduler_type, torch.optim.lr_scheduler, "--lr_scheduler_type")
    logger.info("LR scheduler %s %s", args.lr_scheduler_type, kwargs)
    try:
        return cls(optimizer, **kwargs)
    except TypeError as exc:
        raise UserError(f"--lr_scheduler_args for {args.lr_scheduler_type}: {exc}") from None


def _adafactor_schedule(optimizer, info: OptimizerInfo | None, args: argparse.Namespace, warmup: int):
    from transformers.optimization import Adafactor, AdafactorSchedule

    if not isinstance(optimizer, Adafactor) or not optimizer.defaults.get("relative_step", False):
        raise UserError("--lr_scheduler adafactor needs --optimizer_type adafactor with relative_step=True")
    _no_warmup("adafactor", warmup)
    initial_lr = info.initial_lr if info is not None and info.initial_lr is not None else args.learning_rate
    return AdafactorSchedule(optimizer, initial_lr)


def _named_scheduler(name: str, optimizer, args: argparse.Namespace, total: int, warmup: int, decay: int, kwargs):
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    fn = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    cycles, min_ratio = args.lr_scheduler_num_cycles, args.lr_scheduler_min_lr_ratio
    if name == "constant":
        _no_warmup(name, warmup)
        return fn(optimizer, **kwargs)
    if name == "constant_with_warmup":
        return fn(optimizer, num_warmup_steps=warmup, **kwargs)
    if name == "inverse_sqrt":
        return fn(optimizer, num_warmup_steps=warmup, timescale=args.lr_scheduler_timescale, **kwargs)
    common = dict(num_warmup_steps=warmup, num_training_steps=total)
    if name == "cosine_with_restarts":
        return fn(optimizer, num_cycles=cycles, **common, **kwargs)
    if name == "polynomial":
        return fn(optimizer, power=args.lr_scheduler_power, **common, **kwargs)
    if name == "cosine_with_min_lr":
        if min_ratio is None:
            raise UserError("--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio")
        return fn(optimizer, num_cycles=cycles / 2, min_lr_rate=min_ratio, **common, **kwargs)
    if name in ("linear", "cosine"):
        return fn(optimizer, **common, **kwargs)
    # warmup_stable_decay
    stable = total - warmup - decay
    if stable < 0:
        raise UserError(
            f"--lr_warmup_steps ({warmup}) + --lr_decay_steps ({decay}) exceed the training steps ({total})"
        )
    return fn(
        optimizer,
        num_warmup_steps=warmup,
        num_stable_steps=stable,
        num_decay_steps=decay,
        num_cycles=cycles / 2,
        min_lr_ratio=min_ratio if min_ratio is not None else 0.0,
        **kwargs,
    )


def _infer_info(args: argparse.Namespace, optimizer: torch.optim.Optimizer) -> OptimizerInfo:
    """What `build_optimizer` would have reported, read from the flags and the optimizer itself."""
    from musubi_tuner.training.optimizers import is_schedule_free

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    relative = type(inner).__name__ == "Adafactor" and bool(inner.defaults.get("relative_step", False))
    return OptimizerInfo(
        name=type(inner).__name__,
        schedule_free=is_schedule_free(args.optimizer_type or ""),
        adafactor_relative_step=relative,
        initial_lr=args.learning_rate,
    )


def build_lr_scheduler(
    args: argparse.Namespace,
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    optimizer_info: OptimizerInfo | None = None,
):
    """The scheduler for --lr_scheduler (or --lr_scheduler_type) over `num_training_steps` steps."""
    if optimizer_info is None:
        optimizer_info = _infer_info(args, optimizer)
    if optimizer_info.schedule_free:
        return ConstantLogScheduler(optimizer)
    kwargs = parse_key_value_args(args.lr_scheduler_args, "--lr_scheduler_args")
    if args.lr_scheduler_type:
        return _custom_scheduler(args, optimizer, kwargs)
    warmup = resolve_steps(args.lr_warmup_steps, num_training_steps, "--lr_warmup_steps")
    decay = resolve_steps(args.lr_decay_steps, num_training_steps, "--lr_decay_steps")
    name = args.lr_scheduler
    if optimizer_info.adafactor_relative_step or name.startswith("adafactor"):
        if name not in ("adafactor", "constant"):
            logger.info("Adafactor with relative_step uses the adafactor scheduler instead of %s", name)
        return _adafactor_schedule(optimizer, optimizer_info, args, warmup)
    if name not in SCHEDULER_NAMES:
        raise UserError(f"--lr_scheduler {name!r} is unknown; choose one of {', '.join(SCHEDULER_NAMES)}")
    try:
        if name == "rex":
            ratio = args.lr_scheduler_min_lr_ratio if args.lr_scheduler_min_lr_ratio is not None else 0.01
            lr = args.learning_rate
            return RexLR(
                optimizer, max_lr=lr, min_lr=lr * ratio, num_steps=num_training_steps, num_warmup_steps=warmup, **kwargs
            )
        if name == "piecewise_constant":
            from diffusers.optimization import get_piecewise_constant_schedule

            # step_rules comes from --lr_scheduler_args, e.g. step_rules="'1:10,0.1:20,0.01'"
            return get_piecewise_constant_schedule(optimizer, **kwargs)
        return _named_scheduler(name, optimizer, args, num_training_steps, warmup, decay, kwargs)
    except TypeError as exc:
        raise UserError(f"--lr_scheduler_args for {name}: {exc}") from None
