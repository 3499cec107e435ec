"""Creating the LoRA network for training and writing it out with the reference metadata."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from musubi_tuner.architectures.base import Architecture
from musubi_tuner.errors import UserError

logger = logging.getLogger(__name__)

SAVE_DTYPES = {None: torch.float32, "float": torch.float32, "fp32": torch.float32, "float32": torch.float32,
               "fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def build_network(arch: Architecture, dit: torch.nn.Module, args: argparse.Namespace):
    """--network_module/--network_dim/--network_alpha/--network_args, optionally from --network_weights."""
    from musubi_tuner.networks.lora_files import load_lora_file
    from musubi_tuner.networks.modules import resolve_network_module

    module = resolve_network_module(args.network_module)
    expected = getattr(module, "ARCHITECTURE", arch.name)
    if expected != arch.name:
        raise UserError(f"--network_module {args.network_module} is for {expected}, not {arch.name}; "
                        f"use {arch.network_module}")
    for_arch = {} if hasattr(module, "ARCHITECTURE") else {"arch": arch}  # LoHa/LoKr serve every family
    if args.dim_from_weights:
        if not args.network_weights:
            raise UserError("--dim_from_weights needs --network_weights")
        weights, _ = load_lora_file(args.network_weights)
        network = module.create_network_from_weights(dit, weights, network_dropout=args.network_dropout,
                                                     network_args=args.network_args,
                                                     source=f"--network_weights {args.network_weights}",
                                                     **for_arch)
    else:
        network = module.create_network(dit, args.network_dim, args.network_alpha, args.network_dropout,
                                        args.network_args, **for_arch)
    if args.network_weights:
        network.load_weights(args.network_weights, source=f"--network_weights {args.network_weights}")
        logger.info("loaded LoRA weights from %s", args.network_weights)
    network.apply_to()
    return network


def save_network(network, arch: Architecture, args: argparse.Namespace, path: Path, progress,
                 session_id: int | None = None, started_at: float | None = None,
                 extra: dict[str, str] | None = None) -> None:
    from musubi_tuner.networks.lora_files import build_training_metadata, save_lora_file

    if args.save_precision not in SAVE_DTYPES:
        raise UserError(f"--save_precision {args.save_precision!r}: use float, fp16 or bf16")
    metadata = None
    if not args.no_metadata:
        metadata = build_training_metadata(args, arch, steps=progress.global_step, epoch=progress.epoch,
                                           session_id=session_id, training_started_at=started_at, timestamp=time.time(),
                                           extra=extra)
    state = network.state_dict_reference()
    if getattr(args, "save_lora_format", "default") != "default":  # same weights, the layout other tools read
        from musubi_tuner.networks.lora_formats import NameIndex, convert_state_dict

        state = convert_state_dict(state, args.save_lora_format, NameIndex(targets=network.targets),
                                   prefix=arch.other_lora_prefix)
    save_lora_file(state, path, metadata, dtype=SAVE_DTYPES[args.save_precision])
