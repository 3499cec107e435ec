"""FramePack's own resolution buckets (the reference's `frame_pack/bucket_tools.py`): the 14 (height, width) sizes
of about 640x640 pixels FramePack was trained at, and the choice of the one closest in aspect ratio to an image.
Generation sizes a start image this way; training datasets keep the dataset TOML's buckets."""

from __future__ import annotations

BUCKETS_640: tuple[tuple[int, int], ...] = (
    (416, 960), (448, 864), (480, 832), (512, 768), (544, 704), (576, 672), (608, 640),
    (640, 608), (672, 576), (704, 544), (768, 512), (832, 480), (864, 448), (960, 416),
)  # fmt: skip
"""(height, width), from the widest to the tallest."""


def nearest_framepack_bucket(height: int, width: int) -> tuple[int, int]:
    """(height, width) of the bucket whose aspect ratio is closest to height/width, compared by cross-multiplying
    (|h * bucket_w - w * bucket_h|, no division); on a tie the later (taller) bucket wins, as the reference."""
    best, best_metric = BUCKETS_640[0], float("inf")
    for bucket_h, bucket_w in BUCKETS_640:
        metric = abs(height * bucket_w - width * bucket_h)
        if metric <= best_metric:
            best, best_metric = (bucket_h, bucket_w), metric
    return best
