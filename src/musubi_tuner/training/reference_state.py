"""Resuming from a state folder saved by the reference (kohya-ss/musubi-tuner `--save_state`).

The reference calls accelerate's `save_state`, which writes `model.safetensors` (or `pytorch_model.bin`) with the
LoRA network's state dict (`lora_unet_...` keys), `optimizer.bin`, `scheduler.bin`, `random_states_<rank>.pkl`
(and `sampler.bin`/`scaler.pt` where used). Newer reference versions add `musubi_training_state.json` with the
counters; older ones record no step, so it is taken from the folder name (`<name>-step{NNNNNNNN}-state`,
`<name>-{NNNNNN}-state` for an epoch).

What carries over: LoRA weights, optimizer state (re-ordered by parameter name: the reference orders each
module's down/up pair together), LR scheduler, the step/epoch counters. What cannot: the RNG streams (the
reference draws noise from other generators) and the data order within a shuffled epoch (the reference's data
order is not ours: the rest of the epoch follows this tool's order); a warning says so. `--resume auto`
finds these folders too.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.training.checkpoint_files import REFERENCE_OPTIMIZER_FILE, REFERENCE_WEIGHT_FILES
from musubi_tuner.training.state import (
    LoadedState,
    StateError,
    TrainProgress,
    load_safetensors_file,
    load_torch_file,
)

logger = logging.getLogger(__name__)

WEIGHT_FILES, OPTIMIZER_FILE = REFERENCE_WEIGHT_FILES, REFERENCE_OPTIMIZER_FILE
SCHEDULER_FILE = "scheduler.bin"
PROGRESS_FILE = "musubi_training_state.json"  # newer reference versions only
_STEP_NAME = re.compile(r".*-step(\d{8,})-state")
_EPOCH_NAME = re.compile(r".*-(\d{6,})-state")


def reference_progress(folder: Path, steps_per_epoch: int, accumulation: int,
                       scheduler_sd: dict[str, Any] | None) -> TrainProgress:
    """The counters of a reference state: its JSON when present, else the folder name, else the scheduler.
    Mid-epoch, as many batches as the reference had used are skipped (of this tool's order for the epoch)."""
    progress_file = folder / PROGRESS_FILE
    if progress_file.is_file():
        try:
            data = json.loads(progress_file.read_text(encoding="utf-8"))
            progress = TrainProgress(global_step=int(data["global_step"]), epoch=int(data.get("epoch", 0)),
                                     batch_in_epoch=int(data.get("step_in_epoch", 0)))
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(f"--resume {folder}: {PROGRESS_FILE} is unreadable ({exc})") from None
        logger.info("reference state %s: step %d, epoch %d from %s", folder.name, progress.global_step,
                    progress.epoch + 1, PROGRESS_FILE)
        return progress
    if match := _STEP_NAME.fullmatch(folder.name):
        step = int(match.group(1))
        progress = _at_step(step, steps_per_epoch, accumulation)
        logger.info("reference state %s records no step: step %d taken from the folder name", folder.name, step)
    elif match := _EPOCH_NAME.fullmatch(folder.name):
        epoch = int(match.group(1))
        progress = TrainProgress(global_step=epoch * steps_per_epoch, epoch=epoch)
        logger.info("reference state %s records no step: epoch %d taken from the folder name (step %d)",
                    folder.name, epoch, progress.global_step)
    elif scheduler_sd is not None and isinstance(scheduler_sd.get("last_epoch"), int):
        step = scheduler_sd["last_epoch"]  # one scheduler step per optimizer step in a single-process run
        progress = _at_step(step, steps_per_epoch, accumulation)
        logger.warning("reference state %s: no step in its name; step %d taken from the LR scheduler "
                       "(right for single-GPU runs)", folder.name, step)
    else:
        raise StateError(f"--resume {folder}: cannot tell which step this reference state was saved at; rename it "
                         "<name>-step<8-digit step>-state")
    return progress


def _at_step(step: int, steps_per_epoch: int, accumulation: int) -> TrainProgress:
    return TrainProgress(global_step=step, epoch=step // steps_per_epoch,
                         batch_in_epoch=(step % steps_per_epoch) * accumulation)


def read_reference_state(folder: Path, steps_per_epoch: int, accumulation: int,
                         args: argparse.Namespace | None = None) -> LoadedState:
    """Read and check a reference state folder (every file loaded, so damage shows before the DiT loads; with
    `args`, the rank and alpha are checked against --network_dim/--network_alpha too)."""
    folder = Path(folder)
    weights_path = next(folder / name for name in WEIGHT_FILES if (folder / name).is_file())
    if weights_path.suffix == ".safetensors":
        network_sd = load_safetensors_file(weights_path, folder)
    else:
        network_sd = load_torch_file(weights_path, folder)
    if args is not None:
        _check_rank_and_alpha(network_sd, args, folder)
    optimizer_sd = load_torch_file(folder / OPTIMIZER_FILE, folder)
    scheduler_path = folder / SCHEDULER_FILE
    scheduler_sd = load_torch_file(scheduler_path, folder) if scheduler_path.is_file() else None
    progress = reference_progress(folder, max(steps_per_epoch, 1), accumulation, scheduler_sd)
    logger.warning("resuming from a reference state: LoRA weights, optimizer, LR scheduler and the step count "
                   "carry over; the random number streams and the data order within the epoch do not (the rest "
                   "of the epoch follows this tool's order), so the run will not match an uninterrupted one exactly")
    if scheduler_sd is None:
        logger.warning("reference state %s has no %s: the LR schedule restarts its warm-up from step %d", folder.name,
                       SCHEDULER_FILE, progress.global_step)
    return LoadedState(folder=folder, progress=progress, network_sd=network_sd, optimizer_sd=optimizer_sd,
                       scheduler_sd=scheduler_sd, rng=None, reference_layout=True)


def _check_rank_and_alpha(sd: dict[str, torch.Tensor], args: argparse.Namespace, folder: Path) -> None:
    ranks = sorted({v.shape[0] for k, v in sd.items() if k.endswith("lora_down.weight")})
    if args.network_dim is not None and not args.dim_from_weights and ranks and ranks != [args.network_dim]:
        raise StateError(f"--resume {folder}: the state's LoRA has rank {'/'.join(map(str, ranks))}, this run has "
                         f"--network_dim {args.network_dim}; use the --network_dim of the saved run")
    alphas = sorted({round(float(v), 6) for k, v in sd.items() if k.endswith(".alpha")})
    if args.network_alpha is not None and alphas and alphas != [round(float(args.network_alpha), 6)]:
        raise StateError(f"--resume {folder}: the state's LoRA has alpha {'/'.join(f'{a:g}' for a in alphas)}, this "
                         f"run has --network_alpha {args.network_alpha:g}; use the --network_alpha of the saved run")


def load_reference_network(network: torch.nn.Module, sd: dict[str, torch.Tensor], folder: Path) -> None:
    """The reference's `lora_unet_...` weights into our network, checked module by module."""
    from musubi_tuner.networks.lora_formats import NameIndex, parse_lora_state_dict

    canonical, unmatched = parse_lora_state_dict(sd, NameIndex(targets=network.targets))
    modules = {m.original_name: m for m in network.loras}
    absent = [m.lora_name for name, m in modules.items() if name not in canonical]
    if unmatched or absent:
        raise StateError(f"--resume {folder}: the saved LoRA modules differ from this network's (unknown "
                         f"{unmatched[:3]}, not saved {absent[:3]}); use the same --network_args include/exclude "
                         "patterns as the saved run")
    for name, weights in canonical.items():
        module = modules[name]
        if tuple(weights.down.shape) != tuple(module.lora_down.weight.shape):
            raise StateError(f"--resume {folder}: the state's LoRA has rank {weights.rank}, this run has "
                             f"--network_dim {module.lora_dim}; use --network_dim {weights.rank}")
        saved_alpha = float(weights.alpha) if weights.alpha is not None else float(weights.rank)
        if abs(saved_alpha - float(module.alpha)) > 1e-6 * max(1.0, saved_alpha):
            raise StateError(f"--resume {folder}: the state's LoRA has alpha {saved_alpha:g}, this run has "
                             f"--network_alpha {float(module.alpha):g}; use --network_alpha {saved_alpha:g}")
    network.load_weights(sd, source=f"--resume {folder}")


def reference_param_order(network: torch.nn.Module, groups: int) -> list[list[str]]:
    """The reference's optimizer parameter order by name: one group of (down, up) per module, or with LoRA+
    a group of all downs then a group of all ups."""
    downs = [f"{m.lora_name}.lora_down.weight" for m in network.loras]
    ups = [f"{m.lora_name}.lora_up.weight" for m in network.loras]
    if groups == 2:
        return [downs, ups]
    return [[name for pair in zip(downs, ups) for name in pair]]


def reorder_optimizer_state(saved: dict[str, Any], network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            folder: Path) -> dict[str, Any]:
    """The reference's optimizer state dict with its parameter indices renumbered to our optimizer's order."""
    ours = optimizer.state_dict()
    if len(saved.get("param_groups", [])) != len(ours["param_groups"]):
        raise StateError(f"--resume {folder}: the optimizer state has {len(saved.get('param_groups', []))} "
                         f"parameter group(s), this run has {len(ours['param_groups'])}; use the same "
                         "loraplus_lr_ratio in --network_args as the saved run")
    names_by_param = {id(p): n for n, p in network.named_parameters()}
    our_index: dict[str, int] = {}
    for group, state_group in zip(optimizer.param_groups, ours["param_groups"]):
        for param, index in zip(group["params"], state_group["params"]):
            our_index[names_by_param[id(param)]] = index
    params_by_name = dict(network.named_parameters())
    ref_order = reference_param_order(network, len(saved["param_groups"]))
    state: dict[int, Any] = {}
    groups = []
    for saved_group, names, our_group in zip(saved["param_groups"], ref_order, ours["param_groups"]):
        if len(saved_group["params"]) != len(names):
            raise StateError(f"--resume {folder}: the optimizer state holds {len(saved_group['params'])} "
                             f"parameters, this network {len(names)}; use the same --network_args as the saved run")
        for saved_index, name in zip(saved_group["params"], names):
            entry = saved["state"].get(saved_index)
            if entry is None:
                continue
            shape = tuple(params_by_name[name].shape)
            for value in entry.values():
                if isinstance(value, torch.Tensor) and value.ndim > 1 and tuple(value.shape) != shape:
                    raise StateError(f"--resume {folder}: the optimizer state of {name} has shape "
                                     f"{tuple(value.shape)}, this run {shape}; use the --network_dim of the saved run")
            state[our_index[name]] = entry
        groups.append({**saved_group, "params": our_group["params"]})
    return {"state": state, "param_groups": groups}
