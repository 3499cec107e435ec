"""Media files: listing, captions, cheap probing, decoding and resizing to a bucket.

Pictures are resized to cover the bucket (LANCZOS when enlarging, box/area filter when shrinking)
and center-cropped, like the reference. Videos are decoded with PyAV; a "video" may also be a
directory of frames (images, sorted by name).
"""

from __future__ import annotations

import codecs
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from musubi_tuner.dataset.bucket import fit_area_bucket, round_down
from musubi_tuner.dataset.items import Item, ItemPixels
from musubi_tuner.errors import UserError

if TYPE_CHECKING:
    from musubi_tuner.dataset.config import DatasetSpec

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".avif"}
if importlib.util.find_spec("pillow_jxl") or importlib.util.find_spec("jxlpy"):  # JPEG-XL only with a plugin
    IMAGE_EXTENSIONS.add(".jxl")
VIDEO_EXTENSIONS = {".mp4", ".webm", ".avi", ".mkv", ".mov", ".flv", ".wmv", ".m4v", ".mpg", ".mpeg"}


class MediaError(UserError):
    """A media file that is missing or cannot be decoded (the message names it)."""


# ---- listing and captions -----------------------------------------------------------------------


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def list_images(directory: Path) -> list[Path]:
    """Image files directly in `directory`, sorted by name (extensions matched case-insensitively)."""
    return sorted(p for p in Path(directory).iterdir() if p.is_file() and is_image(p))


def list_videos(directory: Path) -> list[Path]:
    return sorted(p for p in Path(directory).iterdir() if p.is_file() and is_video(p))


def caption_path(media_path: Path, caption_extension: str) -> Path:
    """The caption file beside a media file (`clip.mp4` -> `clip.txt`)."""
    return media_path.with_name(media_path.stem + caption_extension)


def decode_text(data: bytes) -> str:
    """UTF-8 text; a byte-order mark picks UTF-16/UTF-32 instead, and is never part of the text."""
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):  # before UTF-16: FF FE 00 00 starts both
        return data.decode("utf-32")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16")
    return data.decode("utf-8-sig")


def read_caption(media_path: Path, caption_extension: str) -> str:
    """Caption next to a media file, whitespace-stripped (UTF-8, or UTF-16/32 with a BOM)."""
    path = caption_path(media_path, caption_extension)
    try:
        return decode_text(path.read_bytes()).strip()
    except FileNotFoundError:
        raise MediaError(f"caption file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MediaError(f"cannot read caption file {path}: {exc}; save it as UTF-8") from exc


# ---- probing ------------------------------------------------------------------------------------


def probe_image(path: Path) -> tuple[int, int]:
    """(width, height) of an image, checking the file without decoding all pixels."""
    try:
        with Image.open(path) as img:
            size = img.size
            img.verify()
        return size
    except FileNotFoundError:
        raise MediaError(f"image {path} not found") from None
    except Exception as exc:
        raise MediaError(f"cannot decode image {path}: {exc}") from exc


def probe_video(path: Path) -> tuple[int, tuple[int, int]]:
    """(frame count, (width, height)) of a video file or directory of frames.

    Files: packets are counted without decoding; only the first frame is decoded (its size is the
    size the reference reports, and it proves the stream decodes).
    """
    if path.is_dir():
        frames = list_images(path)
        if not frames:
            raise MediaError(f"frame directory {path} has no images")
        return len(frames), probe_image(frames[0])
    if not path.is_file():
        raise MediaError(f"video {path} not found")
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"video {path} has no video stream")
            stream = container.streams.video[0]
            count, size = 0, None
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue  # flush packet
                count += 1
                if size is None:
                    for frame in packet.decode():
                        size = (frame.width, frame.height)
                        break
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"cannot decode video {path}: {exc}") from exc
    if size is None:
        size = _first_frame_size(path)
    return count, size


def _first_frame_size(path: Path) -> tuple[int, int]:
    # Decoders with delay (B-frames) may emit the first frame only after several packets.
    import av

    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                return frame.width, frame.height
    except Exception as exc:
        raise MediaError(f"cannot decode video {path}: {exc}") from exc
    raise MediaError(f"video {path} has no decodable frames")


# ---- decoding -----------------------------------------------------------------------------------


def load_image_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return to_rgb8(img)
    except FileNotFoundError:
        raise MediaError(f"image {path} not found") from None
    except Exception as exc:
        raise MediaError(f"cannot decode image {path}: {exc}") from exc


def to_rgb8(img: Image.Image) -> Image.Image:
    """8-bit RGB; alpha is dropped (not composited), as the reference feeds RGB to the VAE.

    Pillow's own conversion clips 16-bit grey (`I;16`, `I;16B`, ... and `I`, which older Pillow and some TIFFs
    give) at 255, so such a picture comes out almost white: it is scaled from 0..65535 instead. 16-bit RGB PNGs
    already open as 8-bit `RGB` (their high bytes).
    """
    if not img.mode.startswith("I"):
        return img.convert("RGB")
    wide = np.asarray(img).astype(np.float64)
    grey = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))


def decode_frames(path: Path, indices: list[int] | tuple[int, ...]) -> list[np.ndarray]:
    """RGB uint8 (H, W, 3) frames at the given source indices (any order, repeats allowed)."""
    if not indices:
        return []
    if path.is_dir():
        files = list_images(path)
        missing = [i for i in indices if i >= len(files)]
        if missing:
            raise MediaError(f"frame directory {path} has {len(files)} frames; frame {missing[0]} was requested")
        return [np.asarray(load_image_rgb(files[i])) for i in indices]
    return _decode_video_frames(path, indices)


def _decode_video_frames(path: Path, indices: list[int] | tuple[int, ...]) -> list[np.ndarray]:
    import av

    wanted = set(indices)
    last = max(wanted)
    got: dict[int, np.ndarray] = {}
    try:
        with av.open(str(path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    got[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
    except Exception as exc:
        raise MediaError(f"cannot decode video {path}: {exc}") from exc
    if len(got) < len(wanted):
        first_missing = min(wanted - set(got))
        raise MediaError(f"video {path} decoded fewer frames than probed: frame {first_missing} is missing; "
                         "re-encode the video (e.g. ffmpeg -i in.mp4 -c:v libx264 out.mp4)")
    return [got[i] for i in indices]


# ---- resizing -----------------------------------------------------------------------------------


def resize_to_bucket(image: Image.Image | np.ndarray, bucket: tuple[int, int]) -> np.ndarray:
    """Scale to cover `bucket` (width, height), then center-crop; returns uint8 (H, W, C)."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    w, h = pil.size
    bw, bh = bucket
    if (w, h) != (bw, bh):
        scale = max(bw / w, bh / h)
        nw, nh = int(w * scale + 0.5), int(h * scale + 0.5)
        if (nw, nh) != (w, h):
            # LANCZOS when enlarging; BOX (area average, like OpenCV's INTER_AREA) when shrinking.
            pil = pil.resize((nw, nh), Image.LANCZOS if scale > 1 else Image.BOX)
        left, top = (nw - bw) // 2, (nh - bh) // 2
        pil = pil.crop((left, top, left + bw, top + bh))
    return np.asarray(pil)


def control_size(size: tuple[int, int], item_bucket: tuple[int, int], spec: DatasetSpec, step: int) -> tuple[int, int]:
    """Size a control image is brought to (the reference's no_resize_control / control_resolution rules)."""
    if spec.no_resize_control:
        res = spec.control_resolution
        if res is not None and size[0] * size[1] > res[0] * res[1]:
            return fit_area_bucket(size, res, step)
        if res is not None:
            return size  # the reference keeps a small control as is when a maximum is given
        return max(step, round_down(size[0], step)), max(step, round_down(size[1], step))
    if spec.control_resolution is not None:
        return fit_area_bucket(size, spec.control_resolution, step)
    return item_bucket


# ---- one item -----------------------------------------------------------------------------------


def load_item_pixels(item: Item, spec: DatasetSpec, *, bucket_step: int = 16) -> ItemPixels:
    """Decode one item's media (and control media), resized to its bucket, as uint8 (F, H, W, 3)."""
    if item.frame_indices is None:
        frames = [resize_to_bucket(load_image_rgb(item.media_path), item.bucket_size)]
        loaded = [_image_control(p, item, spec, bucket_step) for p in item.control_paths]
        control, alpha = [c for c, _ in loaded], [a for _, a in loaded]
        return ItemPixels(pixels=_stack(frames), control=control, control_alpha=alpha)
    else:
        raw = decode_frames(item.media_path, item.frame_indices)
        frames = [resize_to_bucket(f, item.bucket_size) for f in raw]
        control = [_video_control(p, item) for p in item.control_paths]
    return ItemPixels(pixels=_stack(frames), control=control)


def _image_control(path: Path, item: Item, spec: DatasetSpec, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(uint8 (1, H, W, 3) control, its alpha (H, W) resized alike or None)."""
    alpha = _load_alpha(path)
    img = load_image_rgb(path)
    size = control_size(img.size, item.bucket_size, spec, step)
    resized_alpha = None if alpha is None else torch.from_numpy(np.array(resize_to_bucket(alpha, size)))
    return _stack([resize_to_bucket(img, size)]), resized_alpha


def _load_alpha(path: Path) -> Image.Image | None:
    """The image's alpha channel (mode L), None when it has none."""
    try:
        with Image.open(path) as img:
            if "A" not in img.getbands() and "transparency" not in img.info:
                return None
            return img.convert("RGBA").getchannel("A")
    except Exception:  # decoding problems are reported by load_image_rgb
        return None


def _video_control(path: Path, item: Item) -> torch.Tensor:
    # Same source frames as the item; a shorter control repeats its last frame (as the reference pads it).
    count, _ = probe_video(path)
    indices = [min(i, count - 1) for i in item.frame_indices or [0]]
    return _stack([resize_to_bucket(f, item.bucket_size) for f in decode_frames(path, indices)])


def _stack(frames: list[np.ndarray]) -> torch.Tensor:
    arr = np.stack([np.ascontiguousarray(f[..., :3]) for f in frames])
    return torch.from_numpy(arr).to(torch.uint8)
