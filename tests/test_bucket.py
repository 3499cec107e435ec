"""Bucketing against hand-worked cases (reference rule: sqrt(area)/2..sqrt(area), step 16, nearest ratio)."""

import pytest

from musubi_tuner.dataset.bucket import BucketSelector, fit_area_bucket, round_down


def test_bucket_list_for_960x544():
    sel = BucketSelector((960, 544), step=16, enable_bucket=True)
    # area 522240, sqrt -> 722, widths 352..736 step 16 (25 widths), each with h = (522240 // w) rounded to 16
    assert sel.buckets[0] == (352, 1472)
    assert (736, 704) in sel.buckets and (704, 736) in sel.buckets
    assert (720, 720) in sel.buckets
    assert (960, 544) in sel.buckets and (544, 960) in sel.buckets
    assert sel.buckets == sorted(sel.buckets)
    assert len(sel.buckets) == len(set(sel.buckets)) == 47
    for w, h in sel.buckets:
        assert w % 16 == 0 and h % 16 == 0
        assert w * h <= 522240


@pytest.mark.parametrize(
    "size, bucket",
    [((1920, 1080), (960, 544)), ((1080, 1920), (544, 960)), ((500, 500), (720, 720)), ((100, 400), (352, 1472))],
)
def test_nearest_aspect_ratio(size, bucket):
    sel = BucketSelector((960, 544), step=16, enable_bucket=True)
    assert sel.bucket_for(*size) == bucket


def test_fixed_resolution_when_buckets_off():
    sel = BucketSelector((640, 480), step=16, enable_bucket=False, no_upscale=True)
    assert sel.buckets == [(640, 480)]
    assert sel.bucket_for(100, 900) == (640, 480)
    assert sel.bucket_for(10, 10) == (640, 480)  # no_upscale is ignored without buckets, as in the reference


def test_no_upscale_keeps_small_sizes_rounded_to_step():
    sel = BucketSelector((512, 512), step=16, enable_bucket=True, no_upscale=True)
    assert sel.bucket_for(300, 200) == (288, 192)
    assert sel.bucket_for(512, 512) == (512, 512)  # area equal: kept
    # larger than the bucket area: the usual nearest-ratio bucket
    assert sel.bucket_for(1024, 1024) == (512, 512)


def test_round_down_and_bad_sizes():
    assert round_down(1000, 16) == 992
    with pytest.raises(ValueError):
        BucketSelector((512, 512), step=16, enable_bucket=True).bucket_for(0, 10)


def test_fit_area_bucket_hand_worked():
    # area 1024*1024, ratio 2: sqrt(2^21)=1448.15 -> 1440; candidates 1408..1472, h = area//w rounded to 16
    # 1440 -> 728 -> 720 (ratio 2.0 exactly) wins
    assert fit_area_bucket((2000, 1000), (1024, 1024), 16) == (1440, 720)
    assert fit_area_bucket((1000, 1000), (512, 512), 16) == (512, 512)
