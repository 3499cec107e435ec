"""Bucket resolutions: which (width, height) an image or video is resized and cropped to.

Same rule as the reference tool, so the same media lands in the same bucket:
- enable_bucket = false: one bucket, the configured resolution.
- enable_bucket = true: widths from sqrt(area)/2 to sqrt(area) in `step` pixels, each paired with the
  height that keeps the area (rounded down to `step`), in both orientations; a picture goes to the
  bucket with the nearest aspect ratio (first one on ties, buckets sorted by (width, height)).
- bucket_no_upscale = true (only with buckets): a picture no larger than the bucket area keeps its
  size, rounded down to `step`.
"""

from __future__ import annotations

import math


def round_down(value: int, step: int) -> int:
    """Largest multiple of `step` that is <= value."""
    return value - value % step


class BucketSelector:
    """Buckets for one dataset's resolution settings."""

    def __init__(self, resolution: tuple[int, int], *, step: int, enable_bucket: bool, no_upscale: bool = False):
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.step = step
        self.area = self.resolution[0] * self.resolution[1]
        # Like the reference: no_upscale only means something when buckets are on.
        self.no_upscale = no_upscale and enable_bucket
        self.buckets = _bucket_list(self.resolution, step) if enable_bucket else [self.resolution]
        self._ratios = [w / h for w, h in self.buckets]

    def bucket_for(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the bucket a `width` x `height` picture is resized/cropped to."""
        if width <= 0 or height <= 0:
            raise ValueError(f"picture size must be positive, got {width}x{height}")
        if self.no_upscale and width * height <= self.area:
            return round_down(width, self.step), round_down(height, self.step)
        ratio = width / height
        errors = [abs(r - ratio) for r in self._ratios]
        return self.buckets[errors.index(min(errors))]


def _bucket_list(resolution: tuple[int, int], step: int) -> list[tuple[int, int]]:
    area = resolution[0] * resolution[1]
    side = int(math.sqrt(area))
    buckets = set()
    for w in range(round_down(side // 2, step), side + step, step):
        if w == 0:
            continue
        h = round_down(area // w, step)
        buckets.add((w, h))
        buckets.add((h, w))
    return sorted(b for b in buckets if b[0] > 0 and b[1] > 0)


def fit_area_bucket(size: tuple[int, int], resolution: tuple[int, int], step: int) -> tuple[int, int]:
    """Bucket of about `resolution`'s area with `size`'s aspect ratio (used for control_resolution).

    Tries the width nearest the exact aspect ratio and two steps either side, and keeps the one
    whose ratio is closest (the reference's `calculate_bucket_resolution`).
    """
    area = resolution[0] * resolution[1]
    ratio = size[0] / size[1]
    base_w = round_down(int(math.sqrt(area * ratio)), step)
    best: tuple[int, int] | None = None
    best_err = float("inf")
    for i in range(-2, 3):
        w = base_w + i * step
        if w <= 0:
            continue
        h = round_down(area // w, step)
        if h <= 0:
            continue
        err = abs(w / h - ratio)
        if err < best_err:
            best, best_err = (w, h), err
    if best is None:
        return max(step, base_w), max(step, round_down(int(math.sqrt(area / ratio)), step))
    return best
