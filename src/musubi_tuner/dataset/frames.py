"""Which source frames of a video make up each cache item ("frame windows").

Two steps, as in the reference tool:
1. `source_fps` resampling: with a source rate above the model's rate, frames are dropped so the
   kept ones follow the target rate (a running fractional counter advanced by target/source per
   source frame; a frame is kept when the integer part changes). Without `source_fps` every frame is kept.
2. Windows over the kept frames, per `frame_extraction`:
   - head: the first N frames, for each N in target_frames the video is long enough for.
   - chunk: back-to-back N-frame chunks (a shorter tail is dropped).
   - slide: N-frame windows starting every `frame_stride` frames.
   - uniform: `frame_sample` N-frame windows with starts spread evenly (linspace, truncated).
   - full: all frames, capped at `max_frames`, rounded down to `stride*k + 1`.
"""

from __future__ import annotations

from dataclasses import dataclass

FRAME_EXTRACTION_MODES = ("head", "chunk", "slide", "uniform", "full")


@dataclass(frozen=True)
class FrameWindow:
    start: int
    """Position of the first frame in the resampled frame list (used in the cache name)."""
    indices: tuple[int, ...]
    """Source frame indices (into the decoded video) of the window's frames."""

    @property
    def count(self) -> int:
        return len(self.indices)


def round_to_stride(frames: int, stride: int) -> int:
    """Largest `stride*k + 1` <= frames (frames >= 1)."""
    return (frames - 1) // stride * stride + 1


def resample_indices(frame_count: int, source_fps: float | None, target_fps: float | None) -> list[int]:
    """Source indices kept after dropping frames from `source_fps` down to `target_fps`.

    Only ever drops frames: a source slower than the target keeps every frame (nothing is duplicated).
    """
    if source_fps is None or target_fps is None or source_fps <= target_fps:
        return list(range(frame_count))
    delta = target_fps / source_fps
    kept: list[int] = []
    position = 0.0  # accumulated like the reference so rounding matches frame for frame
    previous = -1
    for i in range(frame_count):
        current = int(position)
        position += delta
        if current != previous:
            kept.append(i)
            previous = current
    return kept


def window_starts(
    frame_count: int,
    *,
    target_frames: tuple[int, ...],
    frame_extraction: str,
    frame_stride: int = 1,
    frame_sample: int = 1,
    max_frames: int = 129,
    stride: int = 4,
) -> list[tuple[int, int]]:
    """(start, count) windows over `frame_count` (already resampled) frames."""
    n = frame_count
    windows: list[tuple[int, int]] = []
    if n <= 0:
        return windows
    if frame_extraction == "full":
        return [(0, round_to_stride(min(n, max_frames), stride))]
    for t in target_frames:
        if t > n:
            continue
        if frame_extraction == "head":
            windows.append((0, t))
        elif frame_extraction == "chunk":
            windows.extend((i, t) for i in range(0, n - t + 1, t))
        elif frame_extraction == "slide":
            windows.extend((i, t) for i in range(0, n - t + 1, frame_stride))
        elif frame_extraction == "uniform":
            windows.extend((s, t) for s in _linspace_int(0, n - t, frame_sample))
        else:
            raise ValueError(f"unknown frame_extraction {frame_extraction!r}; choose one of {FRAME_EXTRACTION_MODES}")
    return _unique(windows)


def frame_windows(
    frame_count: int,
    *,
    target_frames: tuple[int, ...],
    frame_extraction: str,
    frame_stride: int = 1,
    frame_sample: int = 1,
    max_frames: int = 129,
    source_fps: float | None = None,
    target_fps: float | None = None,
    stride: int = 4,
) -> list[FrameWindow]:
    """Frame windows of a video with `frame_count` decodable frames, in source frame indices."""
    kept = resample_indices(frame_count, source_fps, target_fps)
    starts = window_starts(
        len(kept),
        target_frames=target_frames,
        frame_extraction=frame_extraction,
        frame_stride=frame_stride,
        frame_sample=frame_sample,
        max_frames=max_frames,
        stride=stride,
    )
    return [FrameWindow(start, tuple(kept[start : start + count])) for start, count in starts]


def _linspace_int(start: int, stop: int, num: int) -> list[int]:
    """numpy.linspace(start, stop, num, dtype=int): evenly spaced, truncated toward zero."""
    if num == 1:
        return [start]
    step = (stop - start) / (num - 1)
    return [int(start + i * step) if i < num - 1 else stop for i in range(num)]


def _unique(windows: list[tuple[int, int]]) -> list[tuple[int, int]]:
    # uniform can repeat a start on short videos; the same window would write the same cache twice.
    seen: set[tuple[int, int]] = set()
    out = []
    for w in windows:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out
