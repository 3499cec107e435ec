"""Print what a dataset config yields (items, buckets, frame windows, cache files) without loading a model.

    python src/musubi_tuner/dataset_preview.py --dataset_config dataset.toml --arch wan
"""

from __future__ import annotations

import argparse

from musubi_tuner.cli import run_cli


def build_parser() -> argparse.ArgumentParser:
    from musubi_tuner.architectures import architecture_names

    from musubi_tuner.utils.flag_types import FlagParser, non_negative_int

    parser = FlagParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_config", required=True, help="dataset config (.toml or .json)")
    parser.add_argument("--arch", required=True, choices=architecture_names(), help="architecture the caches are for")
    parser.add_argument("--strict", action="store_true", help="a missing or undecodable media file is an error")
    parser.add_argument("--max_items", type=non_negative_int, default=20, help="items listed per dataset (default 20)")
    return parser


def _main(argv: list[str] | None) -> None:
    from musubi_tuner.architectures import get_architecture
    from musubi_tuner.dataset.config import load_dataset_config
    from musubi_tuner.dataset.preview import preview_all
    from musubi_tuner.dataset.sources import collect_items, require_items

    args = build_parser().parse_args(argv)
    traits = get_architecture(args.arch).traits
    specs = load_dataset_config(args.dataset_config, traits)
    datasets = [collect_items(spec, traits, strict=args.strict) for spec in specs]
    print(preview_all(datasets, max_items=args.max_items))
    require_items(datasets)


def main(argv: list[str] | None = None) -> None:
    run_cli(_main, argv)


if __name__ == "__main__":
    main()
