"""From a DatasetSpec to cache items: list media, read captions, probe sizes, bind buckets and frame windows.

Nothing here decodes full media; `media.load_item_pixels` does that when an item is cached.
A missing or undecodable media file (or caption, or control image) is skipped and recorded with
its reason; `strict=True` turns that into an error. Duplicate stems are always an error, because
their caches would overwrite each other.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from musubi_tuner.dataset import media
from musubi_tuner.dataset.bucket import BucketSelector
from musubi_tuner.dataset.cache_files import latent_cache_name, text_cache_name, video_item_key
from musubi_tuner.dataset.config import DatasetSpec
from musubi_tuner.dataset.frames import frame_windows
from musubi_tuner.dataset.items import Item
from musubi_tuner.dataset.masks import attach_masks
from musubi_tuner.dataset.traits import DatasetTraits
from musubi_tuner.errors import DatasetConfigError, UserError

logger = logging.getLogger(__name__)


@dataclass
class MediaEntry:
    """One media file with its caption and control media, before probing."""

    path: Path
    caption: str
    control_paths: list[Path] = field(default_factory=list)


@dataclass
class DatasetItems:
    spec: DatasetSpec
    items: list[Item]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    """(file, reason) for media that could not be used."""
    empty_captions: list[Path] = field(default_factory=list)
    """Caption files (JSONL: media files) whose caption is empty; each was warned about once."""


class _Skip(Exception):
    def __init__(self, path: Path, reason: str):
        super().__init__(reason)
        self.path, self.reason = path, reason


def collect_items(spec: DatasetSpec, traits: DatasetTraits, strict: bool = False) -> DatasetItems:
    """All cache items of one dataset (video windows expanded), with cache paths filled in."""
    skipped: list[tuple[Path, str]] = []

    def skip(path: Path, reason: str) -> None:
        if strict:
            raise UserError(f"{spec.label}: {path}: {reason} (remove the file or fix it; without the strict flag "
                            "such files are skipped)")
        logger.warning("%s: skipping %s: %s", spec.label, path, reason)
        skipped.append((path, reason))

    entries = _list_entries(spec, traits, skip)
    _check_unique_stems(spec, entries)
    empty_captions = [_warn_empty_caption(spec, e) for e in entries if not e.caption]
    selector = BucketSelector(spec.resolution, step=traits.bucket_step, enable_bucket=spec.enable_bucket,
                              no_upscale=spec.bucket_no_upscale)
    items: list[Item] = []
    for entry in entries:
        try:
            items.extend(_entry_items(entry, spec, traits, selector))
        except _Skip as s:
            skip(s.path, s.reason)
    attach_masks(items, spec, media_stem)
    return DatasetItems(spec=spec, items=items, skipped=skipped, empty_captions=empty_captions)


def _warn_empty_caption(spec: DatasetSpec, entry: MediaEntry) -> Path:
    """Warn once per media file (all its frame windows share the caption); returns the file to count."""
    if spec.is_jsonl:
        where, shown = entry.path, f"{spec.source} for {entry.path}"
    else:
        where = shown = media.caption_path(entry.path, spec.caption_extension or ".txt")
    logger.warning("%s: empty caption in %s; it trains with an empty prompt (write a caption or remove the file)",
                   spec.label, shown)
    return where


def require_items(all_datasets: list[DatasetItems]) -> None:
    """Raise DatasetConfigError when any dataset yields no item (before any model loads).

    An empty (or unmounted) media folder must not look like "nothing to do": the stale sweep would then
    delete every cache of that dataset.
    """
    empty = [d for d in all_datasets if not d.items]
    if not empty:
        return
    lines = []
    for d in empty:
        detail = f"; {len(d.skipped)} file(s) skipped, first: {d.skipped[0][0]}: {d.skipped[0][1]}" if d.skipped else ""
        lines.append(f"{d.spec.label}: {d.spec.source} yields 0 items{detail}")
    raise DatasetConfigError(" | ".join(lines) + "; check the media paths, captions and target_frames, "
                             "or remove the [[datasets]] entry")


# ---- entries ------------------------------------------------------------------------------------


def _list_entries(spec: DatasetSpec, traits: DatasetTraits, skip) -> list[MediaEntry]:
    if spec.is_jsonl:
        return _jsonl_entries(spec, traits, skip)
    files = media.list_images(spec.source) if spec.kind == "image" else media.list_videos(spec.source)
    controls = None
    if spec.control_directory is not None:
        controls = _control_index(spec.control_directory, spec.kind, {media_stem(p) for p in files})
    needed = spec.control_count if spec.kind == "image" else 1
    entries = []
    for path in files:
        try:
            caption = media.read_caption(path, spec.caption_extension or ".txt")
        except media.MediaError as exc:
            skip(path, str(exc))
            continue
        ctrl: list[Path] = []
        if controls is not None:
            found = controls.get(media_stem(path), [])
            if len(found) > needed:
                logger.warning("%s: %d control files for %s, this dataset uses %d (the first: %s)", spec.label,
                               len(found), path.name, needed, ", ".join(p.name for p in found[:needed]))
            ctrl = found[:needed]
            if len(ctrl) < needed:
                skip(path, f"{needed} control file(s) named {path.stem}.* or {path.stem}_N.* expected in "
                           f"{spec.control_directory}, found {len(ctrl)}")
                continue
        entries.append(MediaEntry(path, caption, ctrl))
    return entries


def _control_index(directory: Path, kind: str, media_stems: set[str]) -> dict[str, list[Path]]:
    """stem -> control files. Images: `stem.*` first, then `stem_0.*`, `stem_1.*` ... by number.

    Videos: `stem.<video ext>` or a frame directory named `stem`. A control whose own stem is a
    media stem belongs to that media only (`a_1.png` is the control of `a_1.png`, not the 2nd of `a`).
    """
    index: dict[str, list[tuple[int, Path]]] = {}
    for p in sorted(directory.iterdir()):
        if kind == "video" and (p.is_dir() or media.is_video(p)):
            index.setdefault(p.stem if p.is_file() else p.name, []).append((0, p))
        elif kind == "image" and p.is_file() and media.is_image(p):
            index.setdefault(p.stem, []).append((0, p))
            base, _, num = p.stem.rpartition("_")
            if base and num.isdigit() and p.stem not in media_stems:
                index.setdefault(base, []).append((int(num) + 1, p))
    return {stem: [p for _, p in sorted(found)] for stem, found in index.items()}


def _jsonl_entries(spec: DatasetSpec, traits: DatasetTraits, skip) -> list[MediaEntry]:
    path = spec.source
    media_key = "image_path" if spec.kind == "image" else "video_path"
    entries = []
    try:
        lines = media.decode_text(path.read_bytes()).splitlines()
    except UnicodeDecodeError as exc:
        raise DatasetConfigError(f"{spec.label}: cannot read {path} ({exc}); save it as UTF-8") from exc
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetConfigError(f"{spec.label}: {path} line {lineno}: invalid JSON ({exc.msg}); "
                                     "write one JSON object per line") from exc
        if not isinstance(record, dict) or not isinstance(record.get(media_key, record.get(f"{media_key}_0")), str):
            raise DatasetConfigError(f"{spec.label}: {path} line {lineno}: needs a string \"{media_key}\"")
        if not isinstance(record.get("caption"), str):
            raise DatasetConfigError(f"{spec.label}: {path} line {lineno}: needs a string \"caption\"")
        media_path = _jsonl_path(record.get(media_key, record.get(f"{media_key}_0")), path)
        controls = [_jsonl_path(c, path) for c in _jsonl_controls(record)] if traits.control != "none" else []
        if not media_path.exists():
            skip(media_path, f"listed in {path.name} line {lineno} but not found")
            continue
        needed = spec.control_count if spec.kind == "image" else 1
        if traits.control == "required" and len(controls) < needed:
            skip(media_path, f"{path.name} line {lineno}: needs {needed} control_path entries, found {len(controls)}")
            continue
        missing = [c for c in controls if not c.exists()]
        if missing:
            skip(media_path, f"control file {missing[0]} ({path.name} line {lineno}) not found")
            continue
        entries.append(MediaEntry(media_path, record["caption"].strip(), controls[: needed if controls else 0]))
    return entries


def _jsonl_controls(record: dict) -> list[str]:
    """`control_path`, or `control_path_0`, `control_path_1`, ... in numeric order."""
    if isinstance(record.get("control_path"), str):
        return [record["control_path"]]
    numbered = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in record.items()
                      if k.startswith("control_path_") and k.rsplit("_", 1)[1].isdigit() and isinstance(v, str))
    return [v for _, v in numbered]


def _jsonl_path(value: str, jsonl: Path) -> Path:
    """Relative paths: working directory first, then the JSONL's folder (as the reference)."""
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists():
        return p
    candidate = jsonl.parent / p
    return candidate if candidate.exists() else p


def _check_unique_stems(spec: DatasetSpec, entries: list[MediaEntry]) -> None:
    seen: dict[str, Path] = {}
    for e in entries:
        stem = media_stem(e.path)
        if stem in seen:
            raise DatasetConfigError(f"{spec.label}: {seen[stem]} and {e.path} share the name {stem!r}, so their "
                                     "cache files would collide; rename one of them")
        seen[stem] = e.path


def media_stem(path: Path) -> str:
    """The name caches of a media file are keyed by (a frame folder's own name)."""
    return path.name if path.is_dir() else path.stem


# ---- items --------------------------------------------------------------------------------------


def _entry_items(entry: MediaEntry, spec: DatasetSpec, traits: DatasetTraits, selector: BucketSelector) -> list[Item]:
    try:
        if spec.kind == "image":
            size, windows = media.probe_image(entry.path), None
        else:
            count, size = media.probe_video(entry.path)
            windows = frame_windows(
                count, target_frames=spec.target_frames, frame_extraction=spec.frame_extraction,
                frame_stride=spec.frame_stride, frame_sample=spec.frame_sample, max_frames=spec.max_frames,
                source_fps=spec.source_fps, target_fps=traits.target_fps, stride=traits.frame_stride or 1,
            )
        for c in entry.control_paths:
            media.probe_video(c) if spec.kind == "video" else media.probe_image(c)
    except media.MediaError as exc:
        raise _Skip(entry.path, str(exc)) from None
    if windows is not None and not windows:
        raise _Skip(entry.path, f"too short: {count} frames (after source_fps) give no window for target_frames "
                                f"{list(spec.target_frames)} with frame_extraction = {spec.frame_extraction!r}")
    stem = media_stem(entry.path)
    bucket = selector.bucket_for(*size)
    text_path = spec.cache_directory / text_cache_name(stem, traits.cache_code)
    if windows is None:
        keys = [(stem, None)]
    else:
        keys = [(video_item_key(stem, w.start, w.count), list(w.indices)) for w in windows]
    return [
        Item(
            dataset_index=spec.index, item_key=key, caption_key=stem, media_path=entry.path, caption=entry.caption,
            original_size=size, bucket_size=bucket, frame_indices=indices, control_paths=list(entry.control_paths),
            latent_cache_path=spec.cache_directory / latent_cache_name(key, size, traits.cache_code),
            text_cache_path=text_path,
        )
        for key, indices in keys
    ]

