"""Wan2.2 A14B: two experts of one shape, the high-noise one for timesteps at or above a boundary, the low-noise one
below it (the reference's `wan_generate_video.py` / `wan_train_network.py`).

- `--dit` is the low-noise expert, `--dit_high_noise` the high-noise one. With `--dit` alone every step runs it
  (the guidance scale still switches at the boundary, as in the reference).
- The switch: a timestep t (0..1000 scale) belongs to the high-noise expert when t / 1000 >= boundary. The boundary
  defaults per task (t2v-A14B 0.875, i2v-A14B 0.9); `--timestep_boundary` values above 1 are divided by 1000.
- Training both experts trains ONE LoRA on both, as the reference: each step draws the first sample's timestep to
  pick the expert, then draws every sample until it falls on that side (at most 100 tries each).
- The two experts share one set of modules: `ExpertPair` keeps the inactive expert's parameters in a second model
  and swaps the tensors in and out of the active model's modules. Whatever is attached to the modules (LoRA forward
  wrappers, attention processors, gradient checkpointing, fp8 forward) therefore serves both experts.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from musubi_tuner.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertDefaults:
    boundary: float
    """Switch point on the 0..1 scale (the reference config's `boundary`)."""
    guidance_high_noise: float
    """`sample_guide_scale[1]`; the low-noise scale is the task's `guidance_scale` (task_defaults)."""


A14B_EXPERTS = {
    "t2v-A14B": ExpertDefaults(boundary=0.875, guidance_high_noise=4.0),
    "i2v-A14B": ExpertDefaults(boundary=0.9, guidance_high_noise=3.5),
}
MAX_SAME_SIDE_DRAWS = 100
"""Tries per sample to draw a timestep on the chosen expert's side (the reference's `num_max_calls`)."""
PAIR_ATTRIBUTE = "_wan_expert_pair"


# ---- flags -------------------------------------------------------------------------------------------------
def add_expert_arguments(parser: argparse.ArgumentParser, purpose: str) -> None:
    from musubi_tuner.utils.flag_types import finite_float, positive_float

    if purpose not in ("train", "generate"):
        return
    parser.add_argument("--dit_high_noise", default=None,
                        help="Wan2.2 A14B high-noise expert (e.g. wan2.2_t2v_high_noise_14B_fp16.safetensors); "
                             "--dit is the low-noise one")
    parser.add_argument("--timestep_boundary", type=positive_float, default=None,
                        help="Wan2.2: timestep where the high-noise expert hands over, 0..1 (or 1..1000, divided by "
                             "1000); default per task: t2v-A14B 0.875, i2v-A14B 0.9")
    parser.add_argument("--offload_inactive_dit", action="store_true",
                        help="Wan2.2: keep the expert not in use on the CPU (not with --blocks_to_swap)")
    parser.add_argument("--force_v2_1_time_embedding", action="store_true",
                        help="accepted for compatibility: the time embedding is always computed once per sample, the "
                             "Wan2.1 shape the reference's flag selects")
    if purpose == "generate":
        parser.add_argument("--lora_weight_high_noise", nargs="*", default=[],
                            help="LoRA files merged into the --dit_high_noise expert")
        parser.add_argument("--lora_multiplier_high_noise", nargs="*", type=finite_float, default=[],
                            help="one per --lora_weight_high_noise (default 1.0)")
        parser.add_argument("--guidance_scale_high_noise", type=finite_float, default=None,
                            help="Wan2.2: CFG scale while the high-noise expert runs (default per task: t2v-A14B 4.0, "
                                 "i2v-A14B 3.5)")


def timestep_boundary(args: argparse.Namespace) -> float | None:
    """The switch point on the 0..1 scale: `--timestep_boundary` (values above 1 are on the 0..1000 scale), else the
    task's; None for Wan2.1 tasks without the flag."""
    value = getattr(args, "timestep_boundary", None)
    if value is None:
        defaults = A14B_EXPERTS.get(getattr(args, "task", None))
        return defaults.boundary if defaults else None
    return value / 1000.0 if value > 1 else value


def validate_expert_arguments(args: argparse.Namespace, purpose: str) -> None:
    """Before any model loads: the Wan2.2 flags fit the task and each other."""
    if purpose not in ("train", "generate"):
        return
    high = getattr(args, "dit_high_noise", None)
    if high and args.task not in A14B_EXPERTS:
        raise UserError(f"--dit_high_noise is for the Wan2.2 tasks ({', '.join(A14B_EXPERTS)}), not --task {args.task}")
    boundary = timestep_boundary(args)
    if boundary is not None and not 0 < boundary <= 1:
        raise UserError(f"--timestep_boundary {args.timestep_boundary}: give a value in (0, 1] or (1, 1000]")
    if args.offload_inactive_dit and getattr(args, "blocks_to_swap", None):
        raise UserError("--offload_inactive_dit cannot be combined with --blocks_to_swap (as in the reference); "
                        "drop one of them")
    if (purpose == "train" and args.task in A14B_EXPERTS and not high and args.min_timestep is None
            and args.max_timestep is None):
        bound = round(1000 * boundary)
        logger.info("training one %s expert over every timestep; the reference trains the high-noise expert with "
                    "--min_timestep %d --max_timestep 1000 and the low-noise one with --min_timestep 0 --max_timestep "
                    "%d (plus --preserve_distribution_shape)", args.task, bound, bound)
    if args.force_v2_1_time_embedding:
        logger.info("--force_v2_1_time_embedding: the time embedding is always computed once per sample here")
    if purpose == "generate":
        if len(args.lora_multiplier_high_noise) > len(args.lora_weight_high_noise):
            raise UserError("more --lora_multiplier_high_noise values than --lora_weight_high_noise files")
        if args.lora_weight_high_noise and not high:
            raise UserError("--lora_weight_high_noise needs --dit_high_noise (the expert those LoRAs are merged into)")
        if high and getattr(args, "save_merged_model", None):
            raise UserError("--save_merged_model merges into --dit only; merge each expert separately (merge_lora.py "
                            "--dit <expert> --lora_weight <its LoRA>) and drop --dit_high_noise")


def high_noise_args(args: argparse.Namespace) -> argparse.Namespace:
    """The flags with the high-noise expert in place of `--dit` and its LoRAs in place of `--lora_weight`."""
    changed = {"dit": args.dit_high_noise}
    if hasattr(args, "lora_weight_high_noise"):
        changed |= {"lora_weight": args.lora_weight_high_noise, "lora_multiplier": args.lora_multiplier_high_noise}
    return argparse.Namespace(**{**vars(args), **changed})


# ---- which expert ------------------------------------------------------------------------------------------
def is_high_noise(timesteps: torch.Tensor, boundary: float) -> torch.Tensor:
    """(B,) bool: timesteps on the 0..1000 scale at or above the boundary belong to the high-noise expert."""
    return timesteps.float() / 1000.0 >= boundary


def guidance_schedule(args: argparse.Namespace | None, guidance_scale: float) -> Callable[[float], float] | None:
    """Per-step CFG scale for an A14B task: `--guidance_scale_high_noise` (or the task's) at and above the boundary,
    `guidance_scale` below it; None for other tasks (one scale)."""
    task = getattr(args, "task", None)
    if task not in A14B_EXPERTS:
        return None
    high = getattr(args, "guidance_scale_high_noise", None)
    high = A14B_EXPERTS[task].guidance_high_noise if high is None else high
    boundary = timestep_boundary(args)
    return lambda t: high if float(t) / 1000.0 >= boundary else guidance_scale


def draw_same_expert_timesteps(draw: Callable[[int, torch.Tensor | None], Any], batch_size: int, boundary: float,
                               uniform: torch.Tensor | None = None) -> Any:
    """Training both experts: a `TimestepSample` whose timesteps all fall on one side of the boundary.

    draw(n, uniform) -> TimestepSample. The first sample of a fresh draw picks the side; each sample is then drawn
    until it lands there (stratified uniforms only for its first try). After MAX_SAME_SIDE_DRAWS misses the plain
    draw is returned with a warning (the prediction then runs each side with its own expert)."""
    from musubi_tuner.training.timesteps import TimestepSample

    high = bool(is_high_noise(draw(1, None if uniform is None else uniform[:1]).timesteps, boundary)[0])
    sigmas, timesteps = [], []
    for i in range(batch_size):
        for attempt in range(MAX_SAME_SIDE_DRAWS):
            sample = draw(1, uniform[i:i + 1] if uniform is not None and attempt == 0 else None)
            if bool(is_high_noise(sample.timesteps, boundary)[0]) == high:
                sigmas.append(sample.sigmas)
                timesteps.append(sample.timesteps)
                break
        else:
            logger.warning("no timestep on the %s-noise side of boundary %s in %d draws; this batch mixes experts",
                           "high" if high else "low", boundary, MAX_SAME_SIDE_DRAWS)
            return draw(batch_size, uniform)
    return TimestepSample(sigmas=torch.cat(sigmas), timesteps=torch.cat(timesteps))


# ---- two experts, one set of modules -----------------------------------------------------------------------
class ExpertPair:
    """The inactive expert's weights, swapped into the active model's modules when the other expert is needed."""

    def __init__(self, inactive: nn.Module, boundary: float, device: torch.device, offload: bool,
                 swapped: set[str] = frozenset(), pin: bool = False):
        self.inactive = inactive
        """A second model of the same structure holding the expert not in use (never called itself)."""
        self.boundary, self.device, self.offload = boundary, torch.device(device), offload
        self.active_is_high = False
        """--dit (low noise) starts active."""
        self.warned_mixed = False
        self.swapped = swapped
        """Names of the blocks --blocks_to_swap keeps in CPU memory: each expert's stay there (pinned with `pin`)."""
        move_tensors(self.inactive, torch.device("cpu") if offload else self.device, keep=swapped)
        if swapped:
            move_tensors(self.inactive, torch.device("cpu"), only=swapped, pin=pin)

    def activate(self, dit: nn.Module, high: bool) -> None:
        if high == self.active_is_high:
            return
        logger.info("switching to the %s-noise expert", "high" if high else "low")
        from musubi_tuner.memory.block_swap import block_swap_of

        scheduler = block_swap_of(dit)
        active_modules = {name.replace("._orig_mod", "").removeprefix("_orig_mod."): module
                          for name, module in dit.named_modules()}  # torch.compile wraps blocks in `_orig_mod`
        for name, inactive_module in self.inactive.named_modules():
            active_module = active_modules[name]
            active_module._parameters, inactive_module._parameters = inactive_module._parameters, active_module._parameters
            active_module._buffers, inactive_module._buffers = inactive_module._buffers, active_module._buffers
        if self.offload:
            move_tensors(self.inactive, torch.device("cpu"))
            move_tensors(dit, self.device)
        if scheduler is not None:  # the swapped blocks' modules now hold the other expert's CPU weights
            scheduler.rebind()
        self.active_is_high = high

    def predict(self, dit: nn.Module, batch: dict[str, Any], noisy: torch.Tensor, timesteps: torch.Tensor,
                predict_one: Callable[[nn.Module, dict[str, Any], torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Each sample through its expert (one forward per side present; the active expert's side first)."""
        high = is_high_noise(timesteps, self.boundary).to(noisy.device)
        sides = [h for h in (self.active_is_high, not self.active_is_high) if bool((high == h).any())]
        if len(sides) > 1 and torch.is_grad_enabled() and getattr(dit, "is_gradient_checkpointing", False):
            # a checkpointed block recomputes its forward in the backward with the weights its module holds THEN,
            # which would be the other expert's: a mixed training batch goes through the expert of its first sample
            # (the one the timestep draw chose), as the reference runs one expert per step
            if not self.warned_mixed:
                logger.warning("a training batch has timesteps on both sides of --timestep_boundary (the same-side "
                               "draw gave up); with gradient checkpointing it runs through the %s-noise expert of its "
                               "first sample, as the reference", "high" if bool(high[0]) else "low")
                self.warned_mixed = True
            sides = [bool(high[0])]
        if len(sides) == 1:
            self.activate(dit, sides[0])
            return predict_one(dit, batch, noisy, timesteps)
        out = torch.empty_like(noisy)
        for side in sides:
            rows = (high == side).nonzero().flatten()
            self.activate(dit, side)
            out[rows] = predict_one(dit, batch_rows(batch, rows.tolist()), noisy[rows], timesteps[rows])
        return out


def move_tensors(model: nn.Module, device: torch.device, keep: set[str] = frozenset(),
                 only: set[str] | None = None, pin: bool = False) -> None:
    """Move every parameter and buffer to `device` as NEW tensors. `Module.to` would change the existing parameters
    in place, and a graph still waiting for its backward (a batch that ran both experts) holds those.
    keep: module names (and everything under them) left where they are; only: move just those; pin: pin the
    moved CPU tensors (block swap's masters with --use_pinned_memory_for_block_swap)."""
    def under(name: str, names) -> bool:
        return any(name == n or name.startswith(n + ".") for n in names)

    for module_name, module in model.named_modules():
        if under(module_name, keep) or (only is not None and not under(module_name, only)):
            continue
        for name, param in module._parameters.items():
            if param is not None and (param.device != device or (pin and not param.is_pinned())):
                data = param.detach().to(device)
                module._parameters[name] = nn.Parameter(data.pin_memory() if pin else data,
                                                        requires_grad=param.requires_grad)
        for name, buffer in module._buffers.items():
            if buffer is not None and (buffer.device != device or (pin and not buffer.is_pinned())):
                data = buffer.to(device)
                module._buffers[name] = data.pin_memory() if pin else data


def batch_rows(batch: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    """The batch restricted to `rows` (tensors by their first dimension, lists by position)."""
    picked = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.ndim:
            picked[key] = value[rows]
        elif isinstance(value, list):
            picked[key] = [value[i] for i in rows]
        else:
            picked[key] = value
    return picked


def expert_pair(dit: nn.Module) -> ExpertPair | None:
    return dit.__dict__.get(PAIR_ATTRIBUTE)


def attach_high_noise_expert(dit: nn.Module, load: Callable[[argparse.Namespace], nn.Module],
                             args: argparse.Namespace, device: torch.device) -> None:
    """Load `--dit_high_noise` through `load` (the same preparation as --dit: LoRA merge, fp8 ...) and pair it with
    `dit`. Nothing to do without the flag."""
    if not getattr(args, "dit_high_noise", None):
        return
    from musubi_tuner.memory.block_swap import block_swap_of

    high = load(high_noise_args(args))
    high.requires_grad_(False)
    scheduler = block_swap_of(dit)
    swapped: set[str] = set()
    if scheduler is not None:  # the high-noise expert keeps the same blocks in CPU memory
        names = {id(module): name for name, module in dit.named_modules()}
        swapped = {names[id(slot.block)].replace("._orig_mod", "").removeprefix("_orig_mod.")
                   for slot in scheduler.slots}
    pin = scheduler is not None and bool(getattr(scheduler.engine, "pinned_masters", False))
    # a plain attribute, not a submodule: the pair's weights stay out of dit.parameters() / state_dict()
    dit.__dict__[PAIR_ATTRIBUTE] = ExpertPair(high, timestep_boundary(args), device, args.offload_inactive_dit,
                                              swapped=swapped, pin=pin)
