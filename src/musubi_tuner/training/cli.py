"""`<arch>_train_network.py`: parse (with --config_file), validate, train."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from musubi_tuner.errors import UserError

logger = logging.getLogger(__name__)

# Flags parsed for compatibility whose feature this build does not have yet: using them is an error, not a no-op.
NOT_YET_SUPPORTED: tuple[str, ...] = ()


# Parsed for compatibility; they have nothing to act on here, so a non-default value gets a warning.
NO_EFFECT = {
    "max_data_loader_n_workers": (8, "batches are read from the caches in the training process"),
    "persistent_data_loader_workers": (False, "batches are read from the caches in the training process"),
    "ddp_gradient_as_bucket_view": (False, "the LoRA is not wrapped in DDP; its gradients are all-reduced directly"),
    "ddp_static_graph": (False, "the LoRA is not wrapped in DDP; its gradients are all-reduced directly"),
    "disable_numpy_memmap": (False, "checkpoints are always memory-mapped through safetensors"),
}


def build_parser(arch) -> argparse.ArgumentParser:
    from musubi_tuner.training.args import add_common_training_arguments

    from musubi_tuner.utils.flag_types import FlagParser

    parser = FlagParser(description=f"{arch.script_prefix}: train a LoRA network")
    add_common_training_arguments(parser)
    arch.add_arguments(parser, "train")
    return parser


def check_not_yet_supported(args: argparse.Namespace) -> None:
    used = [f"--{name}" for name in NOT_YET_SUPPORTED if getattr(args, name, None) not in (None, False, [], 0)]
    if args.dynamo_backend not in (None, "NO", "no"):
        used.append("--dynamo_backend (use --compile, which compiles the transformer blocks)")
    if used:
        raise UserError(f"{', '.join(used)}: not supported by this version yet; remove the flag (see docs/training.md)")
    from musubi_tuner.utils.flag_types import warn_flags_without_effect

    warn_flags_without_effect(args, NO_EFFECT)


def check_output_name(name: str) -> None:
    """--output_name is a file-name stem inside --output_dir: not empty, no folders."""
    if not name.strip() or name in (".", "..") or any(sep in name for sep in ("/", "\\")):
        raise UserError(f"--output_name {name!r}: give a plain name without folders (e.g. my_lora); "
                        "put the folder in --output_dir")


def parse_training_args(arch, argv: list[str] | None) -> argparse.Namespace:
    from musubi_tuner.training.args import validate_training_args
    from musubi_tuner.training.config_file import apply_config_file

    args = apply_config_file(build_parser(arch), argv)
    validate_training_args(args)
    check_not_yet_supported(args)
    arch.validate_arguments(args, "train")
    if not args.output_dir:
        raise UserError("--output_dir is required (where the LoRA files go)")
    if args.output_name is None:
        args.output_name = "lora"
    check_output_name(args.output_name)
    if args.network_module is None:
        args.network_module = arch.network_module
    if args.network_dim is None and not args.dim_from_weights:
        args.network_dim = 4
    if args.sample_prompts:
        arch.sample_requests(args)  # every line checked now, not when its sample step comes
    return args


def train_main(arch_name: str, argv: list[str] | None) -> Path:
    from musubi_tuner.architectures import get_architecture
    from musubi_tuner.training.trainer import NetworkTrainer, TrainingInterrupted

    arch = get_architecture(arch_name)
    args = parse_training_args(arch, argv)
    if not args.show_timesteps:
        from musubi_tuner.utils.output_location import check_output_dir

        check_output_dir(args.output_dir, "--output_dir")  # before any model loads, not at the first save
    if args.show_timesteps:
        import torch

        from musubi_tuner.training.timesteps import TimestepConfig, print_timestep_histogram

        if args.show_timesteps != "console":
            raise UserError("--show_timesteps image is not supported; use --show_timesteps console")
        print_timestep_histogram(TimestepConfig.from_args(args), torch.Generator().manual_seed(args.seed or 0))
        return Path()
    try:
        path = NetworkTrainer(arch, args).train()
    except TrainingInterrupted as stop:  # Ctrl-C: say where it stopped and how to go on, then exit 130
        print(stop.summary, file=sys.stderr)
        if stop.last_state:
            print(f"resume with: {resume_command(arch, argv, stop.last_state)}\n"
                  "(or the same command with --resume auto)", file=sys.stderr)
        raise
    print(f"LoRA saved: {path}")
    return path


def resume_command(arch, argv: list[str] | None, state: str) -> str:
    """The command that was run, with `--resume <state>` in place of any --resume it had."""
    args = list(sys.argv[1:] if argv is None else argv)
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith("--resume="):
            kept.append(arg)
    script = Path(sys.argv[0]).name if argv is None and sys.argv[0].endswith(".py") else \
        f"{arch.script_prefix}_train_network.py"
    return shlex.join(["python", script, *kept, "--resume", state])
