"""Convert a LoRA between the reference layout (`default`), ComfyUI/diffusion-pipe (`other`) and `diffusers`.

Same flags as the reference's convert_lora.py, plus `--target diffusers` (needs `--arch`), and optional
`--arch` / `--dit` that make module-name recovery exact instead of the reference's string rules.
"""

from __future__ import annotations

import argparse
import logging

from musubi_tuner.errors import UserError
from musubi_tuner.networks.lora_files import FORMATS, NameIndex, convert_state_dict, load_lora_file, save_lora_file
from musubi_tuner.networks.targets import LoraTarget
from musubi_tuner.utils.flag_types import FlagParser

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(
        description="Convert LoRA weights between the default, other and diffusers layouts"
    )
    parser.add_argument("--input", required=True, help="input LoRA file (any supported layout)")
    parser.add_argument("--output", required=True, help="output .safetensors file")
    parser.add_argument("--target", required=True, choices=FORMATS, help="target layout")
    parser.add_argument(
        "--diffusers_prefix",
        default=None,
        help="key prefix for other/diffusers output (default `diffusion_model` / `transformer`; `-` for none)",
    )
    parser.add_argument("--diffusers_adapter_name", default=None, help="adapter name in the keys, like `default`")
    parser.add_argument(
        "--arch", default=None, help="architecture (wan, flux_kontext, hunyuan_video): exact names; needed for diffusers"
    )
    parser.add_argument(
        "--dit", default=None, help="optional original-layout DiT: its keys give the exact module names"
    )
    return parser


def targets_for_arch(arch_name: str, lora_sd: dict) -> list[LoraTarget]:
    """The architecture's LoRA targets without loading a model (`Architecture.lora_targets_for_conversion`;
    NotImplementedError for a family that does not provide it)."""
    from musubi_tuner.architectures import get_architecture

    try:
        arch = get_architecture(arch_name)
    except ValueError as exc:
        raise UserError(f"--arch: {exc}") from None
    return arch.lora_targets_for_conversion(lora_sd)


def _name_index(args: argparse.Namespace, lora_sd: dict) -> NameIndex:
    names: list[str] = []
    if args.dit:
        from musubi_tuner.models.checkpoint_io import read_keys_and_shapes, strip_prefix

        keys = strip_prefix(read_keys_and_shapes(args.dit, flag="--dit"))
        names = [k[: -len(".weight")] for k in keys if k.endswith(".weight")]
    targets: list[LoraTarget] = []
    if args.arch:
        try:
            targets = targets_for_arch(args.arch, lora_sd)
        except NotImplementedError:
            if args.target == "diffusers":
                raise UserError(f"--target diffusers is not available for --arch {args.arch} yet") from None
            logger.warning("--arch %s has no layer map for conversion; using the names as found", args.arch)
    elif args.target == "diffusers":
        raise UserError("--target diffusers needs --arch (wan, flux_kontext, hunyuan_video) to map original names to diffusers names")
    return NameIndex(names, targets)


def _main(argv: list[str] | None) -> None:
    args = build_parser().parse_args(argv)
    sd, metadata = load_lora_file(args.input)
    logger.info("converting %s to %s", args.input, args.target)
    converted = convert_state_dict(
        sd, args.target, _name_index(args, sd), args.diffusers_prefix, args.diffusers_adapter_name
    )
    metadata = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}  # recomputed for the new tensors
    save_lora_file(converted, args.output, metadata)
    logger.info("saved %s (%d tensors)", args.output, len(converted))


def main(argv: list[str] | None = None) -> None:
    """Console entry: a user error is one line on stderr and exit code 2, not a traceback."""
    from musubi_tuner.cli import run_cli

    run_cli(_main, argv)


if __name__ == "__main__":
    main()
