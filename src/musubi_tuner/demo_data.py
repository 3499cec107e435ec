"""A small synthetic dataset made on the fly: images and short clips of moving shapes, with captions."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")


def draw_frame(size: int, shape: str, color: tuple[int, int, int], cx: float, cy: float) -> np.ndarray:
    image = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    r = size * 0.18
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    else:
        draw.rectangle(box, fill=color)
    return np.asarray(image)


def moving_clip(size: int, frames: int, shape: str, color: tuple[int, int, int], phase: float) -> np.ndarray:
    """A shape moving on a circle: frames (F, H, W, 3) uint8."""
    out = []
    for f in range(frames):
        angle = phase + 2 * math.pi * f / frames
        cx = size / 2 + size * 0.25 * math.cos(angle)
        cy = size / 2 + size * 0.25 * math.sin(angle)
        out.append(draw_frame(size, shape, color, cx, cy))
    return np.stack(out)


def make_demo_dataset(root: Path, size: int = 64, frames: int = 9, fps: float = 16.0) -> dict[str, Path]:
    """Write images/ and videos/ with .txt captions; returns the two folders."""
    from musubi_tuner.inference.outputs import save_video_mp4

    images, videos = root / "images", root / "videos"
    images.mkdir(parents=True, exist_ok=True)
    videos.mkdir(parents=True, exist_ok=True)
    for i, (name, color) in enumerate(COLORS.items()):
        shape = SHAPES[i % 2]
        frame = moving_clip(size, 1, shape, color, phase=i)[0]
        Image.fromarray(frame).save(images / f"{name}_{shape}.png")
        (images / f"{name}_{shape}.txt").write_text(f"a {name} {shape} on a white background")
    for i, (name, color) in enumerate(list(COLORS.items())[:2]):
        shape = SHAPES[i % 2]
        save_video_mp4(moving_clip(size, frames, shape, color, phase=0.5 * i), videos / f"{name}_{shape}_moving.mp4", fps)
        (videos / f"{name}_{shape}_moving.txt").write_text(f"a {name} {shape} moving in a circle")
    return {"images": images, "videos": videos}


def make_validation_images(folder: Path, size: int = 64) -> Path:
    """Held-out shapes (other phases than the training images) with captions, for `[[validation_datasets]]`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, color) in enumerate(list(COLORS.items())[:2]):
        shape = SHAPES[i % 2]
        Image.fromarray(moving_clip(size, 1, shape, color, phase=0.5 + i)[0]).save(folder / f"{name}_{shape}_held_out.png")
        (folder / f"{name}_{shape}_held_out.txt").write_text(f"a {name} {shape} on a white background")
    return folder


def make_edit_dataset(root: Path, size: int = 64, count: int = 4) -> dict[str, Path]:
    """Image-editing pairs: images/ hold targets (a red shape), controls/ the same shape in another colour.

    Captions ask for the edit ("make the square red"); control files share the target's stem.
    """
    images, controls = root / "images", root / "controls"
    images.mkdir(parents=True, exist_ok=True)
    controls.mkdir(parents=True, exist_ok=True)
    sources = [c for name, c in COLORS.items() if name != "red"]
    for i in range(count):
        shape = SHAPES[i % 2]
        angle = 2 * math.pi * i / count
        cx, cy = size / 2 + size * 0.2 * math.cos(angle), size / 2 + size * 0.2 * math.sin(angle)
        stem = f"edit_{i:02d}_{shape}"
        Image.fromarray(draw_frame(size, shape, COLORS["red"], cx, cy)).save(images / f"{stem}.png")
        Image.fromarray(draw_frame(size, shape, sources[i % len(sources)], cx, cy)).save(controls / f"{stem}.png")
        (images / f"{stem}.txt").write_text(f"make the {shape} red")
    return {"images": images, "controls": controls}
