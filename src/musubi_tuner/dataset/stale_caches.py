"""Which files in a dataset's cache folder no current item writes: the plan of the stale-cache sweep.

A cache is stale when no item of this run writes it, except that caches of media the dataset still lists
but could not use this run (unreadable, caption missing, too short ...) are kept: a file that is
temporarily unreadable must not lose its caches. Files whose names are not cache names of this
architecture are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from musubi_tuner.dataset.cache_files import parse_latent_cache_name, parse_text_cache_name
from musubi_tuner.dataset.sources import DatasetItems, media_stem

CacheKind = Literal["latent", "text"]


@dataclass
class SweepPlan:
    stale: list[Path] = field(default_factory=list)
    """Cache files no item writes and no skipped media owns (sorted by name)."""
    kept_for_skipped: list[Path] = field(default_factory=list)
    """Cache files of media that were skipped this run."""


def cache_glob(kind: CacheKind, code: str) -> str:
    return f"*_{code}_te.safetensors" if kind == "text" else f"*_{code}.safetensors"


def _owner_stem(path: Path, kind: CacheKind, code: str, video: bool) -> str | None:
    if kind == "text":
        return parse_text_cache_name(path.name, code)
    parsed = parse_latent_cache_name(path.name, code, video=video)
    return None if parsed is None else parsed.media_stem


def plan_sweep(dataset: DatasetItems, kind: CacheKind, code: str, written_paths: list[Path] | None = None) -> SweepPlan:
    """written_paths: the caches this run writes when they are not one per item (FramePack's sections)."""
    plan = SweepPlan()
    cache_dir = dataset.spec.cache_directory
    if cache_dir is None or not cache_dir.is_dir():
        return plan
    if written_paths is None:
        written_paths = [item.text_cache_path if kind == "text" else item.latent_cache_path for item in dataset.items]
    written = {path.resolve() for path in written_paths}
    skipped_stems = {media_stem(path) for path, _ in dataset.skipped}
    for path in sorted(cache_dir.glob(cache_glob(kind, code))):
        if path.resolve() in written:
            continue
        stem = _owner_stem(path, kind, code, video=dataset.spec.kind == "video")
        if stem is None:
            continue  # not a name this tool writes: leave it alone
        (plan.kept_for_skipped if stem in skipped_stems else plan.stale).append(path)
    return plan
