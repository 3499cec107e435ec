"""Per-step tracker logs with the reference's key names, and the epoch-window loss average.

Keys: `loss/current`, `loss/average`, `lr/unet` (one param group) or `lr/group{i}` (several), or
`lr/{description}` when the network names its groups; `lr/d*lr/...` for D-Adaptation/Prodigy;
`max_norm/keys_scaled`, `max_norm/average_key_norm`, `max_norm/max_key_norm` with
--scale_weight_norms. The reference names two groups both `lr/unet` (one overwrites the other);
we use `lr/group{i}` whenever there is more than one group.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

TRACKER_NAME = "network_train"
"""Default `--log_tracker_name`: TensorBoard writes under `<run folder>/network_train`."""


def tracker_plan(logging_dir: str | None, log_with: str | None, log_prefix: str | None,
                 now: float | None = None) -> tuple[list[str] | None, str | None]:
    """(trackers, run folder) for accelerate, as the reference decides them.

    `--logging_dir` alone logs to TensorBoard. Each run gets its own folder `<logging_dir>/<log_prefix><YYYYmmddHHMMSS>`
    (the tracker then adds `network_train/` inside). `--log_with all` is TensorBoard and W&B.
    """
    run_dir = None
    if logging_dir:
        stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(now))
        run_dir = os.path.join(logging_dir, (log_prefix or "") + stamp)
    if log_with is None:
        return (["tensorboard"] if run_dir else None), run_dir
    return (["tensorboard", "wandb"] if log_with == "all" else [log_with]), run_dir


def _lr_names(count: int, descriptions: Sequence[str] | None) -> list[str]:
    if descriptions is not None:
        return list(descriptions)
    return ["unet"] if count == 1 else [f"group{i}" for i in range(count)]


def _tracks_d(optimizer_type: str) -> bool:
    lowered = optimizer_type.lower()
    return lowered.startswith("dadapt") or lowered.endswith("prodigy") or lowered.endswith("prodigyplusschedulefree")


def step_logs(
    loss_current: float,
    loss_average: float,
    lrs: Sequence[float],
    *,
    lr_descriptions: Sequence[str] | None = None,
    optimizer_type: str = "",
    param_groups: Sequence[dict[str, Any]] | None = None,
    keys_scaled: int | None = None,
    mean_norm: float | None = None,
    max_norm: float | None = None,
) -> dict[str, float]:
    """The dict handed to `accelerator.log(..., step=global_step)` after each step.

    lrs: `lr_scheduler.get_last_lr()`; param_groups: the optimizer's, for d*lr of adaptive optimizers.
    """
    logs: dict[str, float] = {"loss/current": loss_current, "loss/average": loss_average}
    if keys_scaled is not None:
        logs["max_norm/keys_scaled"] = keys_scaled
        logs["max_norm/average_key_norm"] = mean_norm
        logs["max_norm/max_key_norm"] = max_norm
    track_d = _tracks_d(optimizer_type) and param_groups is not None
    for i, (lr, name) in enumerate(zip(lrs, _lr_names(len(lrs), lr_descriptions))):
        logs[f"lr/{name}"] = lr
        if track_d and i < len(param_groups) and "d" in param_groups[i]:
            group = param_groups[i]
            logs[f"lr/d*lr/{name}"] = group["d"] * group["lr"]
            if "effective_lr" in group:
                logs[f"lr/d*eff_lr/{name}"] = group["d"] * group["effective_lr"]
    return logs


class MovingAverage:
    """Mean loss over the last epoch's worth of steps (the reference's LossRecorder).

    During the first epoch every loss is kept; afterwards the loss at in-epoch position `step`
    replaces the one from the previous epoch at that position, so the window is one epoch long.
    """

    def __init__(self) -> None:
        self.values: list[float] = []
        self.total = 0.0
        self.epoch = 0
        self.position = 0

    def add(self, loss: float, *, epoch: int | None = None, step: int | None = None) -> None:
        """Record one step's loss. epoch/step (0-based epoch, index inside it) default to the running
        counters, which `new_epoch()` advances."""
        epoch = self.epoch if epoch is None else epoch
        step = self.position if step is None else step
        self.epoch, self.position = epoch, step + 1
        if epoch == 0:
            self.values.append(loss)
        else:
            while len(self.values) <= step:
                self.values.append(0.0)
            self.total -= self.values[step]
            self.values[step] = loss
        self.total += loss

    def new_epoch(self) -> None:
        self.epoch += 1
        self.position = 0

    @property
    def average(self) -> float:
        return self.total / len(self.values) if self.values else 0.0

    value = average

    def state_dict(self) -> dict[str, Any]:
        return {"values": list(self.values), "total": self.total, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = [float(v) for v in state["values"]]
        self.total = float(state["total"])
        self.epoch = int(state.get("epoch", 0))
        self.position = int(state.get("position", 0))
