"""Merge LoRA(s) into a DiT checkpoint and save it (any architecture; works in the original key layout).

Reference flags: --dit --lora_weight ... --lora_multiplier ... --save_merged_model --device.
"""

from __future__ import annotations

import argparse
import logging

import torch

from musubi_tuner.errors import UserError
from musubi_tuner.inference.lora_merge import merge_lora_files
from musubi_tuner.utils.flag_types import FlagParser, device_name, finite_float, positive_int

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(description="Merge LoRA weights into a DiT checkpoint (original/ComfyUI layout)")
    parser.add_argument("--dit", required=True, help="DiT checkpoint in the original layout (.safetensors or .pt/.pth)")
    parser.add_argument("--dit_in_channels", type=positive_int, default=None, help="accepted for compatibility; not needed")
    parser.add_argument("--lora_weight", nargs="+", required=True, help="LoRA file(s), any supported layout")
    parser.add_argument(
        "--lora_multiplier", nargs="+", type=finite_float, default=[1.0], help="multiplier per LoRA (missing ones are 1.0)"
    )
    parser.add_argument("--save_merged_model", required=True, help="output checkpoint path")
    parser.add_argument("--device", type=device_name, default=None, help="device for the merge math, e.g. cuda (default cpu)")
    parser.add_argument("--arch", default=None, help="only for diffusers-layout LoRAs: the architecture to map names")
    return parser


def _main(argv: list[str] | None) -> None:
    args = build_parser().parse_args(argv)
    if len(args.lora_multiplier) > len(args.lora_weight):
        raise UserError(
            f"--lora_multiplier has {len(args.lora_multiplier)} values for {len(args.lora_weight)} --lora_weight files"
        )
    from musubi_tuner.utils.output_location import check_output_file

    check_output_file(args.save_merged_model, "--save_merged_model")  # before the DiT is read
    targets = None
    if args.arch:
        from musubi_tuner.convert_lora import targets_for_arch
        from musubi_tuner.networks.lora_files import load_lora_file

        try:
            targets = targets_for_arch(args.arch, load_lora_file(args.lora_weight[0])[0])
        except NotImplementedError:
            raise UserError(
                f"--arch {args.arch}: diffusers-layout LoRAs cannot be merged for this architecture yet"
            ) from None
    device = torch.device(args.device) if args.device else None
    merge_lora_files(args.dit, args.lora_weight, args.lora_multiplier, args.save_merged_model, targets=targets,
                     device=device)


def main(argv: list[str] | None = None) -> None:
    """Console entry: a user error is one line on stderr and exit code 2, not a traceback."""
    from musubi_tuner.cli import run_cli

    run_cli(_main, argv)


if __name__ == "__main__":
    main()
