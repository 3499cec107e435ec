"""FLUX token layout: 2x2 latent packing, position ids, Kontext control-image sizes, time shift.

A latent (B, C, H, W) becomes H/2 * W/2 tokens of C*4 features (channel-major, then the 2x2 patch
row-major), as in `FluxPipeline._pack_latents`. Each token's id is (index, row, col); Kontext
gives control-image tokens index 1 and target tokens index 0.
"""

from __future__ import annotations

import torch

PREFERRED_KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
)
"""The (width, height) pairs Kontext was trained at (BFL; same list in diffusers' Kontext pipeline)."""


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4). H and W must be even."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2, got {h}x{w}")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, height/2 * width/2, C*4) -> (B, C, height, width); height/width in latent pixels."""
    b, n, d = tokens.shape
    if n != (height // 2) * (width // 2) or d % 4:
        raise ValueError(f"{n} tokens of {d} features do not unpack to a {height}x{width} latent")
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def prepare_image_ids(packed_height: int, packed_width: int, index: int = 0) -> torch.Tensor:
    """Ids (packed_height * packed_width, 3) = (index, row, col) in packed-token units.

    index 0: the image being generated; index 1: the Kontext control image.
    """
    rows = torch.arange(packed_height).repeat_interleave(packed_width)
    cols = torch.arange(packed_width).repeat(packed_height)
    return torch.stack([torch.full_like(rows, index), rows, cols], dim=-1).float()


def prepare_text_ids(length: int) -> torch.Tensor:
    """Text token ids: all zeros, (length, 3)."""
    return torch.zeros(length, 3)


def nearest_preferred_resolution(width: int, height: int) -> tuple[int, int]:
    """The preferred Kontext (width, height) whose aspect ratio is closest to width/height.

    Ties go to the smaller width, as in the reference (it minimises (|ratio diff|, w, h)).
    """
    ratio = width / height
    _, w, h = min((abs(ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return w, h


def flux_time_shift_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX resolution-dependent shift `mu`: linear in the image-token count through (256, 0.5)
    and (4096, 1.15). Sigmas are then shifted as exp(mu) / (exp(mu) + (1/t - 1))."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def flux_shift_sigmas(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """Apply the FLUX time shift to sigmas in (0, 1]: exp(mu) / (exp(mu) + (1/sigma - 1))."""
    e = torch.exp(torch.as_tensor(mu, dtype=sigmas.dtype))
    return e / (e + (1.0 / sigmas - 1.0))
