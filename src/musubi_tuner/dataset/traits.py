"""What the dataset code needs to know about an architecture, and nothing more."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class DatasetTraits:
    cache_code: str
    """Short code in cache file names (`wan`, `fk`, `hv`, `fp`); no underscores allowed."""

    architecture: str
    """Full architecture name written into cache metadata (`architecture` key), e.g. `wan`."""

    bucket_step: int = 16
    """Bucket width/height are multiples of this many pixels."""

    frame_stride: int | None = 4
    """Video frame counts must be `frame_stride * N + 1` (4 for Wan/HunyuanVideo); None = images only."""

    target_fps: float | None = 16.0
    """Frames are dropped from videos with a higher `source_fps` to reach this rate."""

    control: str = "none"
    """`none` (control_directory ignored), `optional`, or `required` (exactly one control image per item)."""

    def __post_init__(self) -> None:
        if "_" in self.cache_code:
            raise ValueError(f"cache_code {self.cache_code!r} must not contain '_' (it separates name parts)")
        if self.control not in ("none", "optional", "required"):
            raise ValueError(f"control must be none/optional/required, got {self.control!r}")
