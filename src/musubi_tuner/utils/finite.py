"""One cheap NaN/Inf test for tensors from files (caches, LoRAs): one `isfinite().all()` per tensor."""

from __future__ import annotations

import torch


def is_finite(tensor: torch.Tensor) -> bool:
    """True for non-float tensors; fp8 is widened first (isfinite is not implemented for it everywhere)."""
    if not tensor.is_floating_point():
        return True
    wide = tensor.float() if tensor.element_size() == 1 else tensor
    return bool(torch.isfinite(wide).all())


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The first key whose tensor holds NaN/Inf, or None."""
    return next((key for key, tensor in tensors.items() if not is_finite(tensor)), None)
