"""Outputs: mp4 readable back, PNG frames, latents with metadata, names, atomic writes."""

import logging
import re
from datetime import datetime
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from musubi_tuner.errors import UserError
from musubi_tuner.inference import outputs
from musubi_tuner.inference.outputs import (
    load_latent,
    output_basename,
    save_images,
    save_latent,
    save_video_mp4,
    write_outputs,
)


def solid_frames(n, h, w):
    """Frames of distinct flat grey levels, robust to lossy coding."""
    return np.stack([np.full((h, w, 3), 40 + 40 * i, dtype=np.uint8) for i in range(n)])


def read_video(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, stream.codec_context.name, stream.average_rate


@pytest.mark.parametrize("fps", [16, 30])
def test_mp4_round_trip(tmp_path, fps):
    frames = solid_frames(5, 32, 48)
    path = save_video_mp4(frames, tmp_path / "v.mp4", fps)
    got, codec, rate = read_video(path)
    assert codec == "h264"
    assert len(got) == 5 and got[0].shape == (32, 48, 3)
    assert rate == Fraction(fps)
    for want, have in zip(frames, got):
        assert abs(have.astype(int).mean() - int(want[0, 0, 0])) < 4


def test_mp4_odd_size_padded_to_even(tmp_path):
    frames = solid_frames(3, 33, 47)
    got, _, _ = read_video(save_video_mp4(torch.from_numpy(frames), tmp_path / "odd.mp4", 16))
    assert len(got) == 3 and got[0].shape == (34, 48, 3)


def test_mp4_falls_back_without_libx264(tmp_path, monkeypatch, caplog):
    real_codec = av.codec.Codec

    def no_x264(name, mode="r"):
        if name == "libx264":
            raise av.codec.codec.UnknownCodecError(name)
        return real_codec(name, mode)

    monkeypatch.setattr(av.codec, "Codec", no_x264)
    with caplog.at_level(logging.WARNING):
        path = save_video_mp4(solid_frames(2, 16, 16), tmp_path / "f.mp4", 16)
    got, codec, _ = read_video(path)
    assert codec == "mpeg4" and len(got) == 2
    assert "libx264" in caplog.text


def test_mp4_failure_leaves_no_file(tmp_path, monkeypatch):
    real = av.VideoFrame.from_ndarray
    count = {"n": 0}

    def flaky(array, format):
        count["n"] += 1
        if count["n"] == 3:
            raise RuntimeError("disk full")
        return real(array, format=format)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", flaky)
    with pytest.raises(RuntimeError):
        save_video_mp4(solid_frames(5, 16, 16), tmp_path / "x.mp4", 16)
    assert list(tmp_path.iterdir()) == []


def test_png_frames(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (3, 9, 7, 3), dtype=np.uint8)
    paths = save_images(frames, tmp_path / "sub" / "name")
    assert [p.name for p in paths] == ["name_000.png", "name_001.png", "name_002.png"]
    for want, path in zip(frames, paths):
        assert np.array_equal(np.asarray(Image.open(path)), want)


def test_bad_frames_rejected(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        save_images(np.zeros((1, 4, 4, 3), dtype=np.float32), tmp_path / "a")
    with pytest.raises(ValueError, match="F, H, W, 3"):
        save_images(np.zeros((1, 4, 4, 4), dtype=np.uint8), tmp_path / "a")


def test_latent_round_trip(tmp_path):
    latent = torch.randn(16, 3, 4, 6, dtype=torch.bfloat16)
    meta = {"seeds": 42, "height": 480, "width": 832, "video_length": 9, "prompt": "a cat", "negative_prompt": None}
    save_latent(latent, tmp_path / "l.safetensors", meta)
    got, got_meta = load_latent(tmp_path / "l.safetensors")
    assert torch.equal(got, latent)
    assert got_meta == {"seeds": "42", "height": "480", "width": "832", "video_length": "9", "prompt": "a cat"}
    save_latent(latent, tmp_path / "n.safetensors", None)
    assert load_latent(tmp_path / "n.safetensors")[1] == {}


def test_latent_failure_leaves_no_file(tmp_path, monkeypatch):
    import safetensors.torch

    def partial_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", partial_then_fail)
    with pytest.raises(OSError):
        save_latent(torch.zeros(2), tmp_path / "l.safetensors", {})
    assert list(tmp_path.iterdir()) == []


def test_load_latent_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_latent(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read"):
        load_latent(tmp_path / "junk.safetensors")


def test_output_basename_format():
    assert output_basename(42, datetime(2025, 1, 2, 3, 4, 5, 678901)) == "20250102-030405-678_42"
    assert re.fullmatch(r"\d{8}-\d{6}-\d{3}_7", output_basename(7))


@pytest.mark.parametrize(
    "output_type,expect",
    [
        ("video", ["N.mp4"]),
        ("images", ["N/N_000.png", "N/N_001.png"]),
        ("latent", ["N_latent.safetensors"]),
        ("both", ["N_latent.safetensors", "N.mp4"]),
        ("latent_images", ["N_latent.safetensors", "N/N_000.png", "N/N_001.png"]),
    ],
)
def test_write_outputs(tmp_path, output_type, expect):
    frames = solid_frames(2, 16, 16)
    paths = write_outputs(output_type, frames, torch.zeros(4, 1, 2, 2), tmp_path, 5, 16, {"seeds": 5}, basename="N")
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == expect
    assert all(p.is_file() for p in paths)


def test_write_outputs_single_image_and_default_name(tmp_path):
    paths = write_outputs("images", solid_frames(1, 8, 8), None, tmp_path, 9, 16)
    assert len(paths) == 1 and paths[0].parent == tmp_path
    assert re.fullmatch(r"\d{8}-\d{6}-\d{3}_9_000\.png", paths[0].name)  # the reference's name for one image


def test_write_outputs_errors(tmp_path):
    with pytest.raises(UserError, match="video, images, latent, both, latent_images"):
        write_outputs("gif", None, None, tmp_path, 1, 16)
    with pytest.raises(ValueError, match="frames"):
        write_outputs("video", None, torch.zeros(1), tmp_path, 1, 16)


def test_module_defaults():
    assert outputs.OUTPUT_TYPES == ("video", "images", "latent", "both", "latent_images")
