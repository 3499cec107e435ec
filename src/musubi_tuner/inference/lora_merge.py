"""LoRAs at inference: merged into the loaded DiT before sampling, or into the original file (--save_merged_model)."""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Sequence

import torch

from musubi_tuner.architectures.base import Architecture
from musubi_tuner.errors import CheckpointError, UserError

logger = logging.getLogger(__name__)


def _multipliers(paths: Sequence[str], multipliers: Sequence[float]) -> list[float]:
    return [multipliers[i] if i < len(multipliers) else 1.0 for i in range(len(paths))]


def load_finite_lora(path: str, flag: str = "--lora_weight") -> dict[str, torch.Tensor]:
    """A LoRA file's state dict; a NaN/Inf in any tensor (a diverged training) is refused, because merged it
    turns every output black without any other sign."""
    from musubi_tuner.networks.lora_files import load_lora_file
    from musubi_tuner.utils.finite import first_non_finite

    sd = load_lora_file(path)[0]
    bad = first_non_finite(sd)
    if bad is not None:
        raise CheckpointError(f"{flag} {path}: tensor {bad} holds NaN/Inf values, so the LoRA would turn the "
                              "output black; use a checkpoint saved before the training diverged")
    return sd


def filter_lora_modules(sd: dict[str, torch.Tensor], include: Sequence[str] | None,
                        exclude: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """Keep keys whose module stem (the part before `.lora_*`/`.hada_*`/`.lokr_*`/`.alpha`) passes
    --include/--exclude_patterns."""
    if not include and not exclude:
        return sd
    inc = [re.compile(p) for p in include or []]
    exc = [re.compile(p) for p in exclude or []]

    def keep(key: str) -> bool:
        stem = re.split(r"\.(lora_|alpha|hada_|lokr_)", key)[0]
        if exc and any(p.search(stem) for p in exc):
            return False
        return not inc or any(p.search(stem) for p in inc)

    return {k: v for k, v in sd.items() if keep(k)}


def merge_loras_into_dit(arch: Architecture, dit: torch.nn.Module, paths: Sequence[str], multipliers: Sequence[float],
                         include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                         flag: str = "--lora_weight") -> None:
    """W_part += multiplier * delta[part rows] for every LoRA/LoHa/LoKr module, in the diffusers model.

    flag: the option the paths came from (`--lora_weight`, `--base_weights`), named in error messages.
    """
    from musubi_tuner.networks.lora import create_network_from_weights

    for path, multiplier in zip(paths, _multipliers(paths, multipliers)):
        sd = filter_lora_modules(arch.lora_state_dict_for_merge(load_finite_lora(path, flag)), include, exclude)
        if not sd:
            raise UserError(f"{flag} {path}: no module left after --include/--exclude_patterns")
        network = create_network_from_weights(arch, dit, sd, multiplier, source=f"{flag} {path}")
        network.load_weights(sd, source=f"{flag} {path}")
        network.merge_to_base(multiplier)
        logger.info("merged LoRA %s (%d modules, multiplier %s)", path, len(network.loras), multiplier)


def refuse_non_dit(path: str, keys) -> None:
    """A VAE, text encoder or LoRA passed as --dit: say what the file looks like (unrecognised files go on)."""
    from musubi_tuner.models.file_kinds import describe_checkpoint
    from musubi_tuner.models.checkpoint_io import strip_prefix

    kind = describe_checkpoint(strip_prefix(dict.fromkeys(keys)))
    if kind is not None and "DiT" not in kind:
        raise CheckpointError(f"--dit {path}: this looks like {kind}, not a DiT; pass the diffusion model "
                              "(e.g. wan2.1_t2v_1.3B_bf16.safetensors, flux1-kontext-dev.safetensors) as --dit")


def merge_lora_files(dit: str, lora_paths: Sequence[str], multipliers: Sequence[float], output: str, *,
                     targets=None, device=None, include: Sequence[str] | None = None,
                     exclude: Sequence[str] | None = None, rename=None) -> None:
    """Merge LoRA files (any layout) into a DiT file in its ORIGINAL key layout and write `output` (atomic).
    Serves merge_lora.py and every generate script's --save_merged_model, for every architecture.
    rename: the family's `lora_state_dict_for_merge`, applied to each LoRA before the module filters."""
    from musubi_tuner.models.checkpoint_io import load_state_dict, save_state_dict
    from musubi_tuner.networks.merge import merge_lora_into_original_state_dict

    rename = rename or (lambda sd: sd)
    # every LoRA is read (and checked) before the DiT
    loras = [filter_lora_modules(rename(load_finite_lora(path)), include, exclude) for path in lora_paths]
    logger.info("loading %s", dit)
    base = load_state_dict(dit, flag="--dit")
    refuse_non_dit(dit, base.keys())
    for path, lora, multiplier in zip(lora_paths, loras, _multipliers(lora_paths, multipliers)):
        try:  # one at a time (the merge is in place, so the result is the same) to name the failing file
            merge_lora_into_original_state_dict(base, lora, multiplier, targets, device)
        except CheckpointError as exc:
            raise CheckpointError(f"--lora_weight {path}: {exc}") from exc
    logger.info("saving %s", output)
    save_state_dict(base, output)
    print(f"saved merged model: {output}")


def save_merged_model(arch: Architecture, args: argparse.Namespace) -> None:
    """The generate scripts' --save_merged_model: --lora_weight files merged into --dit, original layout."""
    if not args.dit:
        raise UserError("--save_merged_model needs --dit (the base model file)")
    if not args.lora_weight:
        raise UserError("--save_merged_model needs at least one --lora_weight")
    merge_lora_files(args.dit, args.lora_weight, args.lora_multiplier, args.save_merged_model,
                     include=args.include_patterns, exclude=args.exclude_patterns,
                     rename=arch.lora_state_dict_for_merge)
