"""`--debug_mode` of the latent caching scripts: see what would be cached, without loading the VAE.

As in the reference, `video` writes a 1 Mbps preview beside each cache (`<cache name>.mp4` for a video item,
`<cache name>.jpg` for an image). `image` writes the `.jpg` of every item's first frame (the reference opened a
window instead; there is no window here). `console` prints one line per item (size, frames, cache file) instead
of the reference's ASCII art, so `--console_back` has no effect; `--console_width` cuts the lines and
`--console_num_images` limits the items per dataset. Nothing is encoded and no cache is written or removed.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from musubi_tuner.architectures.base import Architecture
from musubi_tuner.dataset.items import Item
from musubi_tuner.dataset.media import load_item_pixels
from musubi_tuner.dataset.sources import DatasetItems
from musubi_tuner.utils.flag_types import positive_int

PREVIEW_BIT_RATE = 1_000_000
PREVIEW_FPS = 24.0
"""The reference's preview settings."""


def add_debug_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug_mode", default=None, choices=["image", "console", "video"],
                        help="write previews of what would be cached (video: .mp4/.jpg, image: .jpg of the first "
                             "frame) beside the caches, or print one line per item (console); no VAE is loaded")
    parser.add_argument("--console_width", type=positive_int, default=80, help="--debug_mode console: line width")
    parser.add_argument("--console_back", default=None,
                        help="accepted for compatibility; --debug_mode console prints text, not ASCII art")
    parser.add_argument("--console_num_images", type=positive_int, default=None,
                        help="--debug_mode console: items shown per dataset (default: all)")


def _save_jpeg(frame, path: Path) -> Path:
    from PIL import Image

    from musubi_tuner.utils.atomic import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(frame.numpy()).save(tmp, format="JPEG", quality=90)
    return path


def write_preview(item: Item, pixels, mode: str) -> Path:
    """The preview file of one item beside its cache: `.mp4` for a video in `video` mode, else a `.jpg`."""
    from musubi_tuner.inference.outputs import save_video_mp4

    cache = item.latent_cache_path
    cache.parent.mkdir(parents=True, exist_ok=True)
    if mode == "video" and pixels.shape[0] > 1:
        return save_video_mp4(pixels, cache.with_suffix(".mp4"), PREVIEW_FPS, bit_rate=PREVIEW_BIT_RATE)
    return _save_jpeg(pixels[0], cache.with_suffix(".jpg"))


def describe_item(item: Item, pixels) -> str:
    frames, height, width = pixels.shape[:3]
    what = f"{frames} frames" if item.frame_indices is not None else "image"
    return f"{item.media_path.name}: {width}x{height} {what} -> {item.latent_cache_path.name}"


def run_debug_preview(arch: Architecture, args: argparse.Namespace, datasets: list[DatasetItems]) -> int:
    """Decode every item as caching would and preview it; returns the number of items shown."""
    shown = 0
    for index, dataset in enumerate(datasets):
        items = dataset.items
        if args.debug_mode == "console":
            print(f"dataset [{index}]: {len(items)} item(s)")
            items = items[: args.console_num_images] if args.console_num_images else items
        for item in items:
            pixels = load_item_pixels(item, dataset.spec, bucket_step=arch.traits.bucket_step).pixels
            if args.debug_mode == "console":
                print(textwrap.shorten(describe_item(item, pixels), width=args.console_width, placeholder="..."))
            else:
                print(f"preview: {write_preview(item, pixels, args.debug_mode)}")
            shown += 1
    return shown
