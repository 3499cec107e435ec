"""A text summary of what a dataset config yields, without loading any model."""

from __future__ import annotations

from collections import Counter

from musubi_tuner.dataset.config import DatasetSpec
from musubi_tuner.dataset.sources import DatasetItems


def describe_spec(spec: DatasetSpec) -> list[str]:
    lines = [
        f"[[datasets]][{spec.index}] {spec.kind} dataset from {spec.source}",
        f"  resolution {spec.resolution[0]}x{spec.resolution[1]}, enable_bucket {spec.enable_bucket}, "
        f"bucket_no_upscale {spec.bucket_no_upscale}, batch_size {spec.batch_size}, num_repeats {spec.num_repeats}",
        f"  cache_directory {spec.cache_directory}",
    ]
    if spec.kind == "video":
        lines.append(
            f"  target_frames {list(spec.target_frames)}, frame_extraction {spec.frame_extraction}, "
            f"frame_stride {spec.frame_stride}, frame_sample {spec.frame_sample}, max_frames {spec.max_frames}, "
            f"source_fps {spec.source_fps}"
        )
    if spec.control_directory is not None:
        lines.append(f"  control_directory {spec.control_directory}")
    return lines


def preview_dataset(data: DatasetItems, *, max_items: int = 20) -> list[str]:
    """Lines for one dataset: settings, item count, buckets, frame windows, cache names, skipped files."""
    spec = data.spec
    lines = describe_spec(spec)
    media_count = len({i.media_path for i in data.items})
    lines.append(f"  items: {len(data.items)} from {media_count} media file(s); "
                 f"{len(data.items) * spec.num_repeats} per epoch with repeats")
    buckets = Counter((*i.bucket_size, i.frame_count) for i in data.items)
    for (w, h, f), n in sorted(buckets.items()):
        frames = f" x {f} frames" if spec.kind == "video" else ""
        lines.append(f"  bucket {w}x{h}{frames}: {n} item(s)")
    shown = data.items[:max_items]
    for item in shown:
        window = ""
        if item.frame_indices is not None:
            idx = item.frame_indices
            window = f" frames {idx[0]}..{idx[-1]} ({len(idx)})"
        control = f" control {', '.join(p.name for p in item.control_paths)}" if item.control_paths else ""
        lines.append(f"    {item.media_path.name}{window}{control} -> {item.latent_cache_path.name}, "
                     f"{item.text_cache_path.name}")
    if len(data.items) > len(shown):
        lines.append(f"    ... and {len(data.items) - len(shown)} more")
    if data.skipped:
        lines.append(f"  skipped: {len(data.skipped)} file(s)")
        for path, reason in data.skipped:
            lines.append(f"    {path}: {reason}")
    return lines


def preview_all(datasets: list[DatasetItems], *, max_items: int = 20) -> str:
    lines: list[str] = []
    for data in datasets:
        lines.extend(preview_dataset(data, max_items=max_items))
        lines.append("")
    total = sum(len(d.items) for d in datasets)
    skipped = sum(len(d.skipped) for d in datasets)
    lines.append(f"total: {total} item(s) in {len(datasets)} dataset(s), {skipped} file(s) skipped")
    return "\n".join(lines)
