"""Filling a model built on the meta device from a state dict read on the CPU, one tensor at a time.

Each tensor is cast on its way to the target device, so a fp32 file never exists on the GPU in fp32 when bf16
is asked for, and the file's copy of a tensor is dropped as soon as it is moved (one copy of the weights at a
time). diffusers' `_keep_in_fp32_modules` stay fp32, as `from_pretrained(torch_dtype=...)` keeps them.
"""

from __future__ import annotations

import torch

from musubi_tuner.errors import CheckpointError
from musubi_tuner.models.file_kinds import sample_keys

__all__ = ["assign_weights", "sample_keys"]


def _fp32_module(key: str, keep_in_fp32: list[str]) -> bool:
    # Same rule as diffusers' from_pretrained: a key part equal to a listed module name.
    return any(name in key.split(".") for name in keep_in_fp32)


def assign_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], *, dtype: torch.dtype | None,
                   source: str, flag: str, device: str | torch.device = "cpu", what: str = "model") -> None:
    """Fill a meta-device `model` from `state` (consumed: entries are popped), casting floating tensors to `dtype`
    (None keeps the file's) on their way to `device`. Key mismatches raise a CheckpointError naming `flag source`
    and `what` the file should be."""
    expected = set(model.state_dict())
    ignored = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    unexpected = sorted(k for k in state if k not in expected and not any(p in k for p in ignored))
    missing = sorted(expected - set(state))
    if missing or unexpected:
        raise CheckpointError(f"{flag} {source}: weights do not match the {what} layout "
                              f"(missing: {sample_keys(missing, 4)}; unexpected: {sample_keys(unexpected, 4)}); "
                              f"is the file complete and a {what}?")
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    cast = {}
    for key in expected:
        tensor = state.pop(key)
        target = torch.float32 if _fp32_module(key, keep) else (dtype or tensor.dtype)
        cast[key] = tensor.to(device, target) if tensor.is_floating_point() else tensor.to(device)
    try:
        model.load_state_dict(cast, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{flag} {source}: tensor shapes do not match the inferred {what} config ({exc})") from exc
