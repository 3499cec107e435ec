"""Training batches from cache files.

Like the reference, training reads whatever latent caches are in each dataset's cache_directory
(`*_{code}.safetensors`), pairs each with its text-encoder cache by the media stem, and batches
only caches of identical tensor shapes ("buckets") from the same dataset. The order of an epoch
is a pure function of (seed, epoch), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.dataset.cache_files import (
    empty_caption_cache_name,
    parse_latent_cache_name,
    read_cache,
    read_cache_shapes,
    text_cache_name,
)
from musubi_tuner.dataset.config import DatasetSpec
from musubi_tuner.dataset.traits import DatasetTraits
from musubi_tuner.errors import UserError
from musubi_tuner.utils.finite import first_non_finite, is_finite

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheEntry:
    dataset_index: int
    item_key: str
    latent_path: Path
    text_path: Path
    original_size: tuple[int, int]


@dataclass(frozen=True)
class _CaptionDropout:
    rate: float
    every_n_epochs: int
    empty_caption: Path

    def drops(self, epoch: int, draw: float) -> bool:
        """epoch is 0-based; `every_n_epochs` counts epochs from 1, as kohya's trainers do."""
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            return True
        return draw < self.rate


@dataclass
class _Bucket:
    dataset_index: int
    batch_size: int
    num_repeats: int
    signature: tuple
    entries: list[CacheEntry]


class CachedBatches:
    """Bucketed, shuffled batches of cache entries; `len()` = batches per epoch."""

    def __init__(self, specs: list[DatasetSpec], traits: DatasetTraits, *, seed: int = 0,
                 text_cache_command: str | None = None):
        self.seed = seed
        self.traits = traits
        self._text_cache_command = text_cache_command
        self.buckets: list[_Bucket] = []
        self._dropout = {s.index: self._caption_dropout(s) for s in specs if s.has_caption_dropout and not s.is_validation}
        for spec in specs:
            self.buckets.extend(self._scan(spec))
        if not self.buckets:
            dirs = ", ".join(str(s.cache_directory) for s in specs)
            raise UserError(f"no latent caches (*_{traits.cache_code}.safetensors) found in {dirs}; "
                            "run the latent and text-encoder caching scripts with this --dataset_config first")
        self._num_batches = sum(-(-len(b.entries) * b.num_repeats // b.batch_size) for b in self.buckets)

    def __len__(self) -> int:
        return self._num_batches

    def batches_for_epoch(self, epoch: int) -> list[list[CacheEntry]]:
        """All batches of `epoch` in training order (same (seed, epoch) -> same list)."""
        rng = random.Random(f"{self.seed}/{epoch}")
        batches: list[list[CacheEntry]] = []
        for bucket in self.buckets:
            items = bucket.entries * bucket.num_repeats
            rng.shuffle(items)
            batches.extend(items[i : i + bucket.batch_size] for i in range(0, len(items), bucket.batch_size))
        rng.shuffle(batches)
        return self._drop_captions(batches, epoch) if self._dropout else batches

    def _drop_captions(self, batches: list[list[CacheEntry]], epoch: int) -> list[list[CacheEntry]]:
        """Caption dropout: swap an entry's text cache for the empty caption's. The draws come from their own
        (seed, epoch) stream, one per entry in training order, so resume sees the same and the order is
        untouched."""
        rng = random.Random(f"{self.seed}/{epoch}/caption_dropout")
        out = []
        for batch in batches:
            kept = []
            for entry in batch:
                rule = self._dropout.get(entry.dataset_index)
                if rule is not None and rule.drops(epoch, rng.random()):
                    entry = replace(entry, text_path=rule.empty_caption)
                kept.append(entry)
            out.append(kept)
        return out

    def load_batch(self, entries: list[CacheEntry]) -> dict[str, Any]:
        """Read and collate: non-varlen tensors stacked, varlen ones as a list (one per sample)."""
        values: dict[str, list[torch.Tensor]] = {}
        varlen: set[str] = set()
        for entry in entries:
            for path in (entry.latent_path, entry.text_path):
                tensors, vl = read_cache(path)
                varlen |= vl
                for key, tensor in tensors.items():
                    values.setdefault(key, []).append(tensor)
        batch: dict[str, Any] = {}
        for key, tensors in values.items():
            if len(tensors) != len(entries):
                raise UserError(f"cache key {key!r} is missing in some of {[str(e.latent_path) for e in entries]}; "
                                "re-cache them with the same options")
            batch[key] = tensors if key in varlen else torch.stack(tensors)
        return batch

    @staticmethod
    def inputs_are_finite(batch: dict[str, Any]) -> bool:
        """No NaN/Inf in any tensor of a loaded batch (one isfinite per tensor: cheap enough for every step)."""
        tensors = [t for v in batch.values() for t in (v if isinstance(v, list) else [v])]
        return all(is_finite(t) for t in tensors)

    @staticmethod
    def non_finite_caches(entries: list[CacheEntry]) -> list[str]:
        """`file (key)` for each cache file of these entries holding NaN/Inf; re-reads the files, so it is
        only called once a batch failed `inputs_are_finite`."""
        found = []
        for path in dict.fromkeys(p for e in entries for p in (e.latent_path, e.text_path)):
            bad = first_non_finite(read_cache(path)[0])
            if bad is not None:
                found.append(f"{path} ({bad})")
        return found

    # ---- scanning -------------------------------------------------------------------------------

    def _scan(self, spec: DatasetSpec) -> list[_Bucket]:
        code = self.traits.cache_code
        groups: dict[tuple, list[CacheEntry]] = {}
        if not spec.cache_directory.is_dir():
            return []
        for path in sorted(spec.cache_directory.glob(f"*_{code}.safetensors")):
            parsed = parse_latent_cache_name(path.name, code, video=spec.kind == "video")
            if parsed is None:
                continue
            text_path = spec.cache_directory / text_cache_name(parsed.media_stem, code)
            if not text_path.is_file():
                raise UserError(self._missing_text_message(spec, path, text_path))
            signature = self._signature(spec, path, text_path)
            if signature is None:
                continue
            entry = CacheEntry(spec.index, parsed.item_key, path, text_path, parsed.original_size)
            groups.setdefault(signature, []).append(entry)
        buckets = [_Bucket(spec.index, spec.batch_size, spec.num_repeats, sig, entries)
                   for sig, entries in sorted(groups.items(), key=lambda kv: repr(kv[0]))]
        for b in buckets:
            logger.info("%s: bucket %s: %d caches x %d repeats", spec.label, _describe(b.signature),
                        len(b.entries), b.num_repeats)
        return buckets

    def _caption_dropout(self, spec: DatasetSpec) -> _CaptionDropout:
        empty = spec.cache_directory / empty_caption_cache_name(self.traits.cache_code)
        if not empty.is_file():
            command = self._text_cache_command or "the text-encoder caching script of this architecture"
            raise UserError(f"{spec.label}: caption dropout needs the empty caption's cache {empty}; run {command} "
                            f"with --dataset_config {spec.config_path} again")
        return _CaptionDropout(spec.caption_dropout_rate, spec.caption_dropout_every_n_epochs, empty)

    def _signature(self, spec: DatasetSpec, latent: Path, text: Path) -> tuple | None:
        """Shapes of every stacked tensor: caches with the same signature can share a batch."""
        sig = []
        for path in (latent, text):
            try:
                shapes = read_cache_shapes(path)
            except Exception as exc:
                if spec.skip_corrupted_cache:
                    logger.warning("%s: skipping unreadable cache %s (%s)", spec.label, path, exc)
                    return None
                raise UserError(f"{spec.label}: cannot read cache {path} ({exc}); delete it and cache again, "
                                "or set skip_corrupted_cache = true") from exc
            sig.extend((k, s) for k, (s, is_varlen) in sorted(shapes.items()) if not is_varlen)
        return tuple(sig)

    def _missing_text_message(self, spec: DatasetSpec, latent: Path, text: Path) -> str:
        command = self._text_cache_command or "the text-encoder caching script of this architecture"
        return (f"{spec.label}: text-encoder cache {text} not found for {latent.name}; run {command} "
                f"with --dataset_config {spec.config_path} first")


def _describe(signature: tuple) -> str:
    for key, shape in signature:
        if key == "latents":
            return "latents " + "x".join(str(s) for s in shape)
    return str(signature[:1])
