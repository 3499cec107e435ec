"""Small helpers shared by architecture modules (no family knowledge here).

Pixel tensors from the dataset and generation code are uint8 (B, F, H, W, 3); VAEs take float
(B, 3, F, H, W) in [-1, 1]. Image-only families (FLUX) drop the F axis after the conversion.
"""

from __future__ import annotations

import torch
from torch import nn

from musubi_tuner.errors import UserError

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip


def str_to_dtype(name: str | None, default: torch.dtype, flag: str) -> torch.dtype:
    """A dtype flag value (`bfloat16`, `fp16`, ...) -> torch dtype; None gives `default`."""
    if name is None:
        return default
    if name not in _DTYPES:
        raise UserError(f"{flag} {name!r} is not a dtype; use one of float32, float16, bfloat16")
    return _DTYPES[name]


def pixels_to_model_range(pixels: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (B, F, H, W, 3) -> float (B, 3, F, H, W) in [-1, 1]."""
    video = pixels.permute(0, 4, 1, 2, 3).to(device=device, dtype=torch.float32)
    return (video / 127.5 - 1.0).to(dtype)


def model_range_to_pixels(video: torch.Tensor) -> torch.Tensor:
    """float (B, 3, F, H, W) in [-1, 1] -> uint8 (B, F, H, W, 3)."""
    video = ((video.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return video.permute(0, 2, 3, 4, 1).cpu()


def dit_compute_dtype(dit: nn.Module) -> torch.dtype:
    """The dtype a DiT's inputs should have: its float weights' dtype, bf16 when they are stored in fp8.

    Modules the diffusers class keeps in fp32 (`_keep_in_fp32_modules`: Wan's `scale_shift_table`, norms, time
    embedder) do not count: Wan's first parameter is such a table, which made a bf16 DiT get fp32 inputs."""
    keep = set(getattr(dit, "_keep_in_fp32_modules", None) or ())
    weights = [p for name, p in dit.named_parameters() if p.is_floating_point() and keep.isdisjoint(name.split("."))]
    dtype = (weights or [next(p for p in dit.parameters() if p.is_floating_point())])[0].dtype
    return torch.bfloat16 if dtype.itemsize == 1 else dtype


def video_prompt_spec(args, **extra):
    """The video generate scripts' shared flags (`--prompt`, `--video_size H W`, `--video_length`, `--infer_steps`,
    `--guidance_scale`, `--flow_shift`, `--image_path`, ...) as a PromptSpec; `extra`: the family's own fields."""
    from musubi_tuner.inference.prompts import PromptSpec

    height, width = args.video_size if args.video_size else (None, None)
    return PromptSpec(prompt=args.prompt or "", negative_prompt=args.negative_prompt, width=width, height=height,
                      frames=args.video_length, seed=args.seed, steps=args.infer_steps,
                      guidance_scale=args.guidance_scale, flow_shift=args.flow_shift, image_path=args.image_path,
                      **extra)
