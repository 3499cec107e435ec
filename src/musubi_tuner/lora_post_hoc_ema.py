"""`lora_post_hoc_ema.py`: average saved LoRA checkpoints of one run into one file (post-hoc EMA).

Reference flags: paths... --output_file --beta 0.95 --beta2 --sigma_rel --no_sort (see docs/lora_formats.md).
"""

from __future__ import annotations

import argparse

from musubi_tuner.cli import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Post-hoc EMA of LoRA checkpoints saved during one training run")
    parser.add_argument("path", nargs="+", help="LoRA .safetensors files (sorted oldest first by modification time)")
    parser.add_argument("--output_file", required=True, help="output .safetensors file")
    parser.add_argument("--no_sort", action="store_true", help="keep the order given instead of sorting by time")
    parser.add_argument("--beta", type=float, default=0.95, help="EMA decay (default 0.95)")
    parser.add_argument("--beta2", type=float, default=None, help="decay for the newest file: beta is linearly "
                        "interpolated from --beta to --beta2 over the files")
    parser.add_argument("--sigma_rel", type=float, default=None, help="power-function EMA (Karras et al. 2023) "
                        "with this relative width instead of --beta (0.15-0.25 is typical)")
    return parser


def run(argv: list[str] | None) -> None:
    from musubi_tuner.networks.post_hoc_ema import post_hoc_ema

    args = build_parser().parse_args(argv)
    post_hoc_ema(args.path, args.output_file, beta=args.beta, beta2=args.beta2, sigma_rel=args.sigma_rel,
                 no_sort=args.no_sort)


def main(argv: list[str] | None = None) -> None:
    run_cli(run, argv)


if __name__ == "__main__":
    main()
