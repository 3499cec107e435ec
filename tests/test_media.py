"""Media listing, probing, decoding and resizing; items from directories, JSONL and frame folders;
control images; skipped files; the preview command."""

import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from musubi_tuner.dataset import media
from musubi_tuner.dataset.config import load_dataset_config
from musubi_tuner.dataset.preview import preview_all
from musubi_tuner.dataset.sources import collect_items, require_items
from musubi_tuner.dataset.traits import DatasetTraits
from musubi_tuner.errors import DatasetConfigError, UserError

WAN = DatasetTraits(cache_code="wan", architecture="wan", frame_stride=4, target_fps=16.0, control="optional")
KONTEXT = DatasetTraits(cache_code="fk", architecture="flux_kontext", frame_stride=None, target_fps=None,
                        control="required")
COLORS = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (250, 250, 10), (10, 250, 250), (250, 10, 250)]


def png(path: Path, size=(64, 48), color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def mp4(path: Path, frames=12, size=(64, 48), fps=30) -> Path:
    """Frame i is a flat color COLORS[i % 6] (easy to recognise after lossy coding)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = {"qscale": "2"}
        for i in range(frames):
            arr = np.full((size[1], size[0], 3), COLORS[i % 6], dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def caption(media_path: Path, text="a caption") -> None:
    media_path.with_suffix(".txt").write_text(f"  {text}\n")


def config(tmp_path: Path, body: str, traits=WAN):
    p = tmp_path / "ds.toml"
    p.write_text('[general]\ncaption_extension = ".txt"\nresolution = [32, 32]\nenable_bucket = true\n' + body)
    return load_dataset_config(p, traits)


# ---- low level -------------------------------------------------------------------------------------


def test_listing_is_sorted_and_case_insensitive(tmp_path):
    for name in ("b.PNG", "a.jpg", "c.webp", "notes.txt", "d.bmp"):
        png(tmp_path / name) if name != "notes.txt" else (tmp_path / name).write_text("x")
    mp4(tmp_path / "v.mp4", frames=2)
    assert [p.name for p in media.list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.webp", "d.bmp"]
    assert [p.name for p in media.list_videos(tmp_path)] == ["v.mp4"]


def test_resize_crop_without_scaling_is_exact(tmp_path):
    arr = np.arange(48 * 64 * 3, dtype=np.uint32).reshape(48, 64, 3).astype(np.uint8)
    out = media.resize_to_bucket(arr, (32, 48))  # scale max(0.5, 1) = 1: center crop of columns 16..47
    assert out.shape == (48, 32, 3) and np.array_equal(out, arr[:, 16:48])


def test_resize_up_and_down_cover_then_crop():
    img = Image.new("RGB", (16, 8), (10, 20, 30))
    assert media.resize_to_bucket(img, (64, 64)).shape == (64, 64, 3)  # up: 128x64 then crop
    big = np.full((100, 300, 3), 77, dtype=np.uint8)
    out = media.resize_to_bucket(big, (48, 32))  # down by 0.32: 96x32, crop
    assert out.shape == (32, 48, 3) and (out == 77).all()


def test_probe_and_decode_video(tmp_path):
    path = mp4(tmp_path / "clip.mp4", frames=12)
    count, size = media.probe_video(path)
    assert (count, size) == (12, (64, 48))
    frames = media.decode_frames(path, [5, 0, 7])
    for frame, i in zip(frames, [5, 0, 7]):
        assert frame.shape == (48, 64, 3)
        assert np.abs(frame.reshape(-1, 3).mean(0) - COLORS[i % 6]).max() < 12


def test_frame_directory_video(tmp_path):
    d = tmp_path / "shots"
    for i in range(5):
        png(d / f"f{i:03d}.png", color=COLORS[i])
    assert media.probe_video(d) == (5, (64, 48))
    (f3,) = media.decode_frames(d, [3])
    assert tuple(f3[0, 0]) == COLORS[3]
    with pytest.raises(media.MediaError, match="has 5 frames"):
        media.decode_frames(d, [9])


def test_bad_media_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(media.MediaError, match="broken.png"):
        media.probe_image(bad)
    badv = tmp_path / "broken.mp4"
    badv.write_bytes(b"\x00" * 100)
    with pytest.raises(media.MediaError, match="broken.mp4"):
        media.probe_video(badv)


# ---- datasets ----------------------------------------------------------------------------------------


def test_image_directory_items_and_skips(tmp_path):
    imgs = tmp_path / "imgs"
    caption(png(imgs / "my_cat.png", size=(64, 32)), "a cat")
    caption(png(imgs / "dog.jpg", size=(32, 64)))
    png(imgs / "nocap.png")
    bad = imgs / "broken.png"
    bad.write_bytes(b"junk")
    caption(bad)
    (spec,) = config(tmp_path, f'[[datasets]]\nimage_directory = "{imgs}"\ncache_directory = "{tmp_path/"c"}"\n')
    data = collect_items(spec, WAN)
    assert [i.item_key for i in data.items] == ["dog", "my_cat"]
    cat = data.items[1]
    # buckets for 32x32: (16, 64), (32, 32), (64, 16); ratio 2 is nearest to 1
    assert cat.caption == "a cat" and cat.original_size == (64, 32) and cat.bucket_size == (32, 32)
    assert cat.latent_cache_path == tmp_path / "c" / "my_cat_0064x0032_wan.safetensors"
    assert cat.text_cache_path == tmp_path / "c" / "my_cat_wan_te.safetensors"
    assert cat.frame_indices is None and cat.frame_count == 1
    assert sorted(p.name for p, _ in data.skipped) == ["broken.png", "nocap.png"]
    with pytest.raises(UserError, match="broken.png|nocap"):
        collect_items(spec, WAN, strict=True)
    pixels = media.load_item_pixels(cat, spec)
    assert pixels.pixels.shape == (1, 32, 32, 3) and pixels.pixels.dtype.is_floating_point is False
    assert tuple(pixels.pixels[0, 0, 0].tolist()) == (200, 30, 30)


def test_video_directory_windows_and_source_fps(tmp_path):
    vids = tmp_path / "vids"
    caption(mp4(vids / "clip_a.mp4", frames=12))
    (spec,) = config(tmp_path, f'[[datasets]]\nvideo_directory = "{vids}"\ntarget_frames = [1, 5]\n'
                               'frame_extraction = "chunk"\nsource_fps = 30.0\n')
    data = collect_items(spec, WAN)
    # 12 frames at 30 fps -> 16 fps keeps 0,2,4,6,8,10 (6 frames): chunks of 1 -> 6 items, of 5 -> 1 item
    keys = [i.item_key for i in data.items]
    assert keys == [f"clip_a_{s:05d}-001" for s in range(6)] + ["clip_a_00000-005"]
    five = data.items[-1]
    assert five.frame_indices == [0, 2, 4, 6, 8] and five.caption_key == "clip_a"
    assert five.latent_cache_path.name == "clip_a_00000-005_0064x0048_wan.safetensors"
    assert five.latent_cache_path.parent == vids  # no cache_directory: next to the media
    px = media.load_item_pixels(five, spec)
    assert px.pixels.shape == (5, 32, 32, 3)  # 64x48 -> bucket 32x32 (nearest ratio 1.33 -> (32, 32))
    for k, src in enumerate([0, 2, 4, 6, 8]):
        assert np.abs(px.pixels[k].float().mean((0, 1)).numpy() - COLORS[src % 6]).max() < 12


def test_short_video_is_reported(tmp_path):
    vids = tmp_path / "vids"
    caption(mp4(vids / "short.mp4", frames=3))
    (spec,) = config(tmp_path, f'[[datasets]]\nvideo_directory = "{vids}"\ntarget_frames = [5]\n')
    data = collect_items(spec, WAN)
    assert data.items == [] and "too short: 3 frames" in data.skipped[0][1]
    with pytest.raises(DatasetConfigError, match=r"\[\[datasets\]\]\[0\]: .*vids yields 0 items"):
        require_items([data])


def test_jsonl_video_with_frame_dir_and_control(tmp_path):
    frames, ctrl = tmp_path / "frames_1", tmp_path / "ctrl_1"
    for i in range(6):
        png(frames / f"{i:02d}.png", color=COLORS[i])
    for i in range(3):  # shorter control: its last frame repeats
        png(ctrl / f"{i:02d}.png", color=COLORS[5 - i])
    jsonl = tmp_path / "meta.jsonl"
    jsonl.write_text(json.dumps({"video_path": "frames_1", "caption": " walk ", "control_path": "ctrl_1"}) + "\n\n"
                     + json.dumps({"video_path": "missing.mp4", "caption": "x"}) + "\n")
    (spec,) = config(tmp_path, f'[[datasets]]\nvideo_jsonl_file = "{jsonl}"\ncache_directory = "{tmp_path/"c"}"\n'
                               'frame_extraction = "full"\n')
    data = collect_items(spec, WAN)
    (item,) = data.items
    assert item.item_key == "frames_1_00000-005" and item.caption == "walk" and item.frame_indices == [0, 1, 2, 3, 4]
    assert item.control_paths == [ctrl] and [p.name for p, _ in data.skipped] == ["missing.mp4"]
    px = media.load_item_pixels(item, spec)
    assert px.pixels.shape == (5, 32, 32, 3) and len(px.control) == 1 and px.control[0].shape == (5, 32, 32, 3)
    assert [tuple(px.control[0][k, 0, 0].tolist()) for k in range(5)] == [COLORS[5], COLORS[4], COLORS[3],
                                                                         COLORS[3], COLORS[3]]


def test_bad_jsonl_line_is_config_error(tmp_path):
    jsonl = tmp_path / "meta.jsonl"
    jsonl.write_text('{"image_path": "a.png", "caption": "x"}\n{not json}\n')
    (spec,) = config(tmp_path, f'[[datasets]]\nimage_jsonl_file = "{jsonl}"\ncache_directory = "{tmp_path/"c"}"\n')
    with pytest.raises(DatasetConfigError, match="line 2: invalid JSON"):
        collect_items(spec, WAN)


def test_control_images_by_stem_and_number(tmp_path):
    imgs, ctrl = tmp_path / "imgs", tmp_path / "ctrl"
    caption(png(imgs / "a.png"))
    caption(png(imgs / "a_1.png"))
    caption(png(imgs / "b.png"))
    caption(png(imgs / "nomatch.png"))
    png(ctrl / "a.jpg", size=(100, 100))
    png(ctrl / "a_1.webp")
    png(ctrl / "b_1.png")
    png(ctrl / "b_0.png")
    (spec,) = config(tmp_path, f'[[datasets]]\nimage_directory = "{imgs}"\ncontrol_directory = "{ctrl}"\n'
                               f'cache_directory = "{tmp_path/"c"}"\nfp_1f_clean_indices = [0, 1]\n', KONTEXT)
    data = collect_items(spec, KONTEXT)
    by_key = {i.item_key: i for i in data.items}
    # `a` takes a.jpg only (a_1.webp belongs to image a_1), so it lacks a second control and is skipped
    assert set(by_key) == {"b"} and by_key["b"].control_paths == [ctrl / "b_0.png", ctrl / "b_1.png"]
    assert sorted(p.name for p, _ in data.skipped) == ["a.png", "a_1.png", "nomatch.png"]


def test_control_resize_rules(tmp_path):
    imgs, ctrl = tmp_path / "imgs", tmp_path / "ctrl"
    caption(png(imgs / "a.png", size=(64, 64)))
    png(ctrl / "a.png", size=(100, 60))
    body = (f'[[datasets]]\nimage_directory = "{imgs}"\ncontrol_directory = "{ctrl}"\n'
            f'cache_directory = "{tmp_path/"c"}"\n')
    (spec,) = config(tmp_path, body, KONTEXT)
    (item,) = collect_items(spec, KONTEXT).items
    assert media.load_item_pixels(item, spec).control[0].shape == (1, 32, 32, 3)  # item's bucket
    (spec,) = config(tmp_path, body + "no_resize_control = true\n", KONTEXT)
    assert media.load_item_pixels(item, spec).control[0].shape == (1, 48, 96, 3)  # rounded down to 16
    # area of 64x64 with ratio 5:3: widths 48/64/80 tried, 80x48 is exact
    (spec,) = config(tmp_path, body + "control_resolution = [64, 64]\n", KONTEXT)
    assert media.load_item_pixels(item, spec).control[0].shape == (1, 48, 80, 3)


def test_duplicate_stems_are_an_error(tmp_path):
    imgs = tmp_path / "imgs"
    caption(png(imgs / "x.png"))
    png(imgs / "x.jpg")
    (spec,) = config(tmp_path, f'[[datasets]]\nimage_directory = "{imgs}"\n')
    with pytest.raises(DatasetConfigError, match="share the name 'x'"):
        collect_items(spec, WAN)


def test_preview_and_cli(tmp_path, monkeypatch, capsys):
    imgs, vids = tmp_path / "imgs", tmp_path / "vids"
    caption(png(imgs / "cat.png"))
    png(imgs / "lost.png")
    caption(mp4(vids / "clip.mp4", frames=9))
    toml = tmp_path / "ds.toml"
    toml.write_text(f'[general]\ncaption_extension = ".txt"\nresolution = [32, 32]\n'
                    f'[[datasets]]\nimage_directory = "{imgs}"\ncache_directory = "{tmp_path/"c1"}"\n'
                    f'[[datasets]]\nvideo_directory = "{vids}"\ncache_directory = "{tmp_path/"c2"}"\n'
                    'target_frames = [1, 5]\nframe_extraction = "slide"\nframe_stride = 4\n')
    specs = load_dataset_config(toml, WAN)
    text = preview_all([collect_items(s, WAN) for s in specs])
    assert "[[datasets]][0] image dataset" in text and "items: 1 from 1 media file(s)" in text
    assert "cat.png -> cat_0064x0048_wan.safetensors, cat_wan_te.safetensors" in text
    assert "skipped: 1 file(s)" in text and "lost.png: caption file" in text
    assert "bucket 32x32 x 5 frames: 2 item(s)" in text and "bucket 32x32 x 1 frames: 3 item(s)" in text
    assert "clip.mp4 frames 4..8 (5) -> clip_00004-005_0064x0048_wan.safetensors" in text
    assert "total: 6 item(s) in 2 dataset(s), 1 file(s) skipped" in text

    import musubi_tuner.architectures as arch
    from musubi_tuner import dataset_preview

    monkeypatch.setattr(arch, "get_architecture", lambda name: type("A", (), {"traits": WAN})())
    dataset_preview.main(["--dataset_config", str(toml), "--arch", "wan"])
    assert "total: 6 item(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        dataset_preview.main(["--dataset_config", str(toml), "--arch", "wan", "--strict"])
    assert exit_info.value.code == 2 and "lost.png" in capsys.readouterr().err


def _png16(path: Path, values: np.ndarray) -> Path:
    """A 16-bit PNG (grey (H, W) or RGB (H, W, 3)) written by hand: Pillow cannot write 16-bit RGB."""
    import struct
    import zlib

    h, w = values.shape[:2]
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2 if values.ndim == 3 else 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_grey_images_are_scaled_not_clipped(tmp_path, mode):
    values = np.array([[0, 257 * 10, 32768, 65535]], dtype=np.uint16)
    if mode == "I;16":
        path = _png16(tmp_path / "g.png", values)
        assert Image.open(path).mode == "I;16"
        rgb = media.load_image_rgb(path)
    else:
        img = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
        rgb = media.to_rgb8(img if mode == "I;16B" else img.convert("I"))
    assert rgb.mode == "RGB"
    assert np.asarray(rgb)[0].tolist() == [[0] * 3, [10] * 3, [128] * 3, [255] * 3]


def test_16_bit_rgb_png_keeps_its_colours(tmp_path):
    values = np.zeros((2, 2, 3), np.uint16)
    values[..., 0], values[..., 1], values[..., 2] = 0x8000, 0xFFFF, 0x1234
    rgb = media.load_image_rgb(_png16(tmp_path / "c.png", values))
    assert np.asarray(rgb)[0, 0].tolist() == [128, 255, 18]


def test_jsonl_with_a_utf8_bom(tmp_path):
    png(tmp_path / "a.png")
    jsonl = tmp_path / "meta.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps({"image_path": str(tmp_path / "a.png"), "caption": "x"}).encode())
    (spec,) = config(tmp_path, f'[[datasets]]\nimage_jsonl_file = "{jsonl}"\ncache_directory = "{tmp_path/"c"}"\n')
    assert [i.caption for i in collect_items(spec, WAN).items] == ["x"]
