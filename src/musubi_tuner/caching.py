"""Shared caching drivers: dataset items -> architecture encoders -> reference-named cache files.

Both drivers are incremental (`--skip_existing`), remove stale caches unless `--keep_cache`, show
progress and end with a summary of what was written, skipped and removed.
"""

from __future__ import annotations

import argparse
import functools
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from musubi_tuner.architectures.base import Architecture
from musubi_tuner.dataset.cache_files import empty_caption_cache_name, latent_metadata, read_cache_shapes, write_cache
from musubi_tuner.dataset.config import load_dataset_config
from musubi_tuner.dataset.items import Item
from musubi_tuner.dataset.masks import MASK_CONTENT, load_pixels_with_mask, mask_on_latent_grid
from musubi_tuner.dataset.sources import DatasetItems, collect_items, require_items
from musubi_tuner.dataset.stale_caches import CacheKind, plan_sweep
from musubi_tuner.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class CacheSummary:
    written: int = 0
    skipped_existing: int = 0
    removed_stale: list[Path] = field(default_factory=list)
    kept_for_skipped: int = 0
    """Caches of media that were skipped this run (kept, see dataset/stale_caches.py)."""
    kept_not_in_dataset: int = 0
    """Stale caches kept because of --keep_cache."""
    bad_media: list[tuple[Path, str]] = field(default_factory=list)
    empty_captions: list[Path] = field(default_factory=list)

    def report(self, what: str) -> str:
        lines = [f"{what}: {self.written} written, {self.skipped_existing} already cached (skipped), "
                 f"{len(self.removed_stale)} stale removed, {len(self.bad_media)} media files skipped, "
                 f"{len(self.empty_captions)} empty captions"]
        if self.removed_stale:
            lines.append(f"  removed: {_first_names(self.removed_stale)}")
        if self.kept_for_skipped:
            lines.append(f"  kept {self.kept_for_skipped} cache(s) of skipped media files")
        if self.kept_not_in_dataset:
            lines.append(f"  kept {self.kept_not_in_dataset} cache(s) of items no longer in the dataset (--keep_cache)")
        lines += [f"  skipped {path}: {reason}" for path, reason in self.bad_media]
        return "\n".join(lines)


def _first_names(paths: list[Path], shown: int = 5) -> str:
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return ", ".join(p.name for p in paths[:shown]) + more


def add_common_caching_arguments(parser: argparse.ArgumentParser) -> None:
    from musubi_tuner.utils.flag_types import device_name, positive_int

    parser.add_argument("--dataset_config", required=True, help="dataset TOML (reference schema)")
    parser.add_argument("--batch_size", type=positive_int, default=None,
                        help="encoder batch size (default: the dataset's batch_size)")
    parser.add_argument("--num_workers", type=positive_int, default=None, help="threads decoding media (default: CPU count)")
    parser.add_argument("--skip_existing", action="store_true", help="keep caches that already exist (incremental)")
    parser.add_argument("--keep_cache", action="store_true", help="do not delete caches of items no longer in the dataset")
    parser.add_argument("--device", type=device_name, default=None, help="device for the encoders (default: cuda if available)")
    parser.add_argument("--strict", action="store_true", help="a missing or undecodable media file is fatal instead of skipped")
    parser.add_argument("--disable_cudnn_backend", action="store_true",
                        help="torch.backends.cudnn.enabled = False (may help on AMD GPUs)")


def resolve_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_datasets(arch: Architecture, args: argparse.Namespace) -> list[DatasetItems]:
    """Parse + validate the TOML and enumerate items: every config error surfaces before any model loads."""
    specs = load_dataset_config(args.dataset_config, arch.traits, with_validation=True)
    datasets = [collect_items(spec, arch.traits, strict=getattr(args, "strict", False)) for spec in specs]
    require_items(datasets)
    return datasets


def new_summary(datasets: list[DatasetItems]) -> CacheSummary:
    return CacheSummary(bad_media=[s for d in datasets for s in d.skipped],
                        empty_captions=[p for d in datasets for p in d.empty_captions])


def remove_stale(datasets: list[DatasetItems], kind: CacheKind, code: str, summary: CacheSummary, keep: bool,
                 written: dict[int, list[Path]] | None = None) -> None:
    """Delete the caches no current item writes (see dataset/stale_caches.py for what is kept), and say so.
    written: per `id(dataset)` (a training and a validation dataset share an index), the latent caches its items
    write when that is not one per item (FramePack)."""
    for dataset in datasets:
        plan = plan_sweep(dataset, kind, code, (written or {}).get(id(dataset)))
        summary.kept_for_skipped += len(plan.kept_for_skipped)
        if not plan.stale:
            continue
        if keep:
            summary.kept_not_in_dataset += len(plan.stale)
            continue
        for path in plan.stale:
            path.unlink()
        summary.removed_stale.extend(plan.stale)
        logger.warning("%s: removed %d stale %s cache(s) from %s that no item of the dataset writes (--keep_cache "
                       "keeps them): %s", dataset.spec.label, len(plan.stale), kind, dataset.spec.cache_directory,
                       _first_names(plan.stale))


def batched(items: list[Item], size: int) -> Iterator[list[Item]]:
    """Items of one bucket and frame count go together (the encoder stacks them)."""
    groups: dict[tuple, list[Item]] = defaultdict(list)
    for item in items:
        groups[(item.bucket_size, item.frame_count)].append(item)
    for group in groups.values():
        for start in range(0, len(group), size):
            yield group[start:start + size]


def latent_cache_is_current(arch: Architecture, item: Item, contents: set[str], paths: list[Path] | None = None) -> bool:
    """For --skip_existing: every cache of the item exists, holds what these flags write, and fits the item's
    current bucket (the file name carries the ORIGINAL size, so a changed resolution would otherwise go
    unnoticed). paths: the item's caches when not just its own (FramePack sections, whose frame count the
    name's window already pins)."""
    paths = paths or [item.latent_cache_path]
    width, height = item.bucket_size
    expected = arch.latent_shape(width, height, item.frame_count)
    check_frames = len(expected) >= 4 and paths == [item.latent_cache_path]
    for path in paths:
        if not path.exists():
            return False
        try:
            shapes = read_cache_shapes(path)
        except Exception:  # unreadable/truncated: re-encode it
            return False
        if not contents <= set(shapes) or (MASK_CONTENT in shapes) != (item.mask_path is not None):
            return False
        cached = shapes["latents"][0]
        if tuple(cached[-2:]) != tuple(expected[-2:]) or (check_frames and cached[-3] != expected[-3]):
            return False
    return True


def run_latent_caching(arch: Architecture, args: argparse.Namespace) -> CacheSummary:
    datasets = load_datasets(arch, args)
    summary = new_summary(datasets)
    contents = arch.latent_cache_contents(args)
    # every file each item writes, asked before any model loads (the architecture may refuse an item here)
    paths = {id(i): arch.latent_cache_paths(i, d.spec, args) for d in datasets for i in d.items}
    todo = [(d, i) for d in datasets for i in d.items
            if not (args.skip_existing and latent_cache_is_current(arch, i, contents, paths[id(i)]))]
    summary.skipped_existing = sum(len(d.items) for d in datasets) - len(todo)
    if todo:
        encoders = arch.load_latent_encoders(args, resolve_device(args.device))
        workers = args.num_workers or max(1, (torch.get_num_threads() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(total=len(todo), desc="caching latents", unit="item") as bar:
            for dataset in datasets:
                items = [i for d, i in todo if d is dataset]
                for batch in batched(items, args.batch_size or dataset.spec.batch_size):
                    load = functools.partial(load_pixels_with_mask, spec=dataset.spec,
                                             bucket_step=arch.traits.bucket_step)
                    pixels = [arch.latent_pixels(item, dataset.spec, item_pixels)
                              for item, item_pixels in zip(batch, pool.map(load, batch))]
                    for item, item_pixels, content in zip(batch, pixels, arch.encode_latents(encoders, pixels, args)):
                        if item_pixels.mask is not None:
                            content[MASK_CONTENT] = mask_on_latent_grid(item_pixels.mask, content["latents"])
                        frames = item.frame_count if item.frame_indices is not None else None
                        for path, part in arch.latent_cache_files(item, dataset.spec, content, args):
                            write_cache(path, part, arch.traits, latent_metadata(item.original_size, frames))
                            summary.written += 1
                    bar.update(len(batch))
    written = {id(d): [p for i in d.items for p in paths[id(i)]] for d in datasets}
    remove_stale(datasets, "latent", arch.traits.cache_code, summary, args.keep_cache, written)
    return summary


def run_text_caching(arch: Architecture, args: argparse.Namespace) -> CacheSummary:
    datasets = load_datasets(arch, args)
    summary = new_summary(datasets)
    # one text cache per media file (caption), shared by all frame windows/crops of it
    captions: dict[Path, str] = {}
    for dataset in datasets:
        for item in dataset.items:
            captions.setdefault(item.text_cache_path, item.caption)
        if dataset.spec.has_caption_dropout and not dataset.spec.is_validation:
            # the prompt dropped captions train on, encoded once per cache folder (dataset/caption_dropout.py)
            captions.setdefault(dataset.spec.cache_directory / empty_caption_cache_name(arch.traits.cache_code), "")
    todo = [(p, c) for p, c in captions.items() if not (args.skip_existing and p.exists())]
    summary.skipped_existing = len(captions) - len(todo)
    if todo:
        encoders = arch.load_text_encoders(args, resolve_device(args.device))
        size = args.batch_size or 16
        with tqdm(total=len(todo), desc="caching text encoder outputs", unit="prompt") as bar:
            for start in range(0, len(todo), size):
                chunk = todo[start:start + size]
                for (path, caption), content in zip(chunk, arch.encode_prompts(encoders, [c for _, c in chunk])):
                    write_cache(path, content, arch.traits, {"caption1": caption})
                    summary.written += 1
                bar.update(len(chunk))
    remove_stale(datasets, "text", arch.traits.cache_code, summary, args.keep_cache)
    return summary


def caching_main(arch_name: str, purpose: str, argv: list[str] | None) -> CacheSummary:
    """Entry for `<arch>_cache_latents.py` / `<arch>_cache_text_encoder_outputs.py`."""
    from musubi_tuner.architectures import get_architecture
    from musubi_tuner.caching_debug import add_debug_arguments, run_debug_preview
    from musubi_tuner.utils.flag_types import FlagParser

    arch = get_architecture(arch_name)
    parser = FlagParser(description=f"{arch_name}: cache {'latents' if purpose == 'cache_latents' else 'text encoder outputs'}")
    add_common_caching_arguments(parser)
    if purpose == "cache_latents":
        parser.add_argument("--vae", default=None, help="VAE checkpoint")
        parser.add_argument("--vae_dtype", default=None, help="VAE dtype (default bfloat16)")
        add_debug_arguments(parser)
    arch.add_arguments(parser, purpose)
    args = parser.parse_args(argv)
    arch.validate_arguments(args, purpose)
    if args.disable_cudnn_backend:
        torch.backends.cudnn.enabled = False
    if getattr(args, "debug_mode", None):
        run_debug_preview(arch, args, load_datasets(arch, args))
        return CacheSummary()
    if purpose == "cache_latents":
        summary = run_latent_caching(arch, args)
    elif purpose == "cache_text":
        summary = run_text_caching(arch, args)
    else:
        raise UserError(f"unknown caching purpose {purpose}")
    print(summary.report("latent caches" if purpose == "cache_latents" else "text encoder caches"))
    return summary
