"""Frame windows for each frame_extraction mode, and source_fps frame dropping, on hand-worked cases."""

import numpy as np
import pytest

from musubi_tuner.dataset.frames import frame_windows, resample_indices, round_to_stride, window_starts


def starts(n, mode, tf, **kw):
    return window_starts(n, target_frames=tuple(tf), frame_extraction=mode, **kw)


def test_head():
    assert starts(40, "head", [1, 25, 45]) == [(0, 1), (0, 25)]


def test_chunk_drops_short_tail():
    assert starts(40, "chunk", [13]) == [(0, 13), (13, 13), (26, 13)]
    assert starts(40, "chunk", [1]) == [(i, 1) for i in range(40)]


def test_slide():
    assert starts(40, "slide", [25], frame_stride=10) == [(0, 25), (10, 25)]
    assert starts(40, "slide", [9, 45], frame_stride=16) == [(0, 9), (16, 9)]


def test_uniform_matches_numpy_linspace():
    assert starts(40, "uniform", [25], frame_sample=4) == [(0, 25), (5, 25), (10, 25), (15, 25)]
    expected = [int(s) for s in np.linspace(0, 40 - 21, 7, dtype=int)]
    assert [s for s, _ in starts(40, "uniform", [21], frame_sample=7)] == expected


def test_uniform_removes_repeated_starts():
    # linspace(0, 1, 3) -> 0, 0, 1: the same window twice would write the same cache twice
    assert starts(26, "uniform", [25], frame_sample=3) == [(0, 25), (1, 25)]


def test_full_rounds_and_caps():
    assert starts(40, "full", [1]) == [(0, 37)]
    assert starts(40, "full", [1], max_frames=30) == [(0, 29)]
    assert starts(1, "full", [1]) == [(0, 1)]
    assert starts(0, "full", [1]) == []


def test_round_to_stride():
    assert [round_to_stride(f, 4) for f in (1, 4, 5, 8, 9, 24, 25)] == [1, 1, 5, 5, 9, 21, 25]


def test_resample_30_to_16():
    # counter advances 16/30 per source frame; a frame is kept when its integer part changes
    assert resample_indices(10, 30.0, 16.0) == [0, 2, 4, 6, 8]
    assert len(resample_indices(300, 30.0, 16.0)) == 160


def test_resample_never_duplicates_or_without_fps():
    assert resample_indices(5, 8.0, 16.0) == [0, 1, 2, 3, 4]
    assert resample_indices(5, None, 16.0) == [0, 1, 2, 3, 4]
    assert resample_indices(5, 30.0, None) == [0, 1, 2, 3, 4]


def test_frame_windows_map_to_source_indices():
    windows = frame_windows(10, target_frames=(5,), frame_extraction="head", source_fps=30.0, target_fps=16.0)
    assert len(windows) == 1
    assert windows[0].start == 0 and windows[0].indices == (0, 2, 4, 6, 8) and windows[0].count == 5
    w = frame_windows(12, target_frames=(2,), frame_extraction="chunk", source_fps=30.0, target_fps=16.0)
    assert [(x.start, x.indices) for x in w] == [(0, (0, 2)), (2, (4, 6)), (4, (8, 10))]


def test_unknown_mode():
    with pytest.raises(ValueError, match="frame_extraction"):
        starts(10, "random", [1])
