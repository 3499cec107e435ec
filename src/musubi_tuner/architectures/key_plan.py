"""One table of original <-> diffusers tensor names drives a DiT's weight conversion in both directions.

Shared by the families whose original checkpoints fuse several diffusers Linears into one tensor (FLUX and
HunyuanVideo: `qkv`, single-block `linear1`). An entry maps one original tensor to one or more diffusers
tensors, split on rows: every part but the last is `hidden` rows, the last takes the rest (q, k, v = hidden
each; the single-block MLP = mlp_ratio * hidden). `swap` marks a final modulation stored as (shift, scale)
in the original and (scale, shift) in diffusers. Splits are views, so no weight is copied.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from musubi_tuner.errors import CheckpointError


@dataclass(frozen=True)
class KeyEntry:
    """One original tensor <-> one or more diffusers tensors (row split), optionally half-swapped."""

    original: str
    diffusers: tuple[str, ...]
    swap: bool = False


def linear_entries(original: str, diffusers: tuple[str, ...], swap: bool = False) -> list[KeyEntry]:
    """The weight and bias entries of one Linear (a bias absent from a file is an error when converting)."""
    return [KeyEntry(f"{original}.{p}", tuple(f"{d}.{p}" for d in diffusers), swap) for p in ("weight", "bias")]


def block_count(keys: Iterable[str], prefix: str) -> int:
    """1 + the highest block index under `prefix` (e.g. `double_blocks.`); 0 when there is none."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if indices and indices != set(range(max(indices) + 1)):
        raise CheckpointError(
            f"{prefix}N blocks are not numbered 0..{max(indices)} without gaps; the file is incomplete"
        )
    return max(indices) + 1 if indices else 0


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _split_rows(t: torch.Tensor, parts: int, hidden: int) -> tuple[torch.Tensor, ...]:
    sizes = [hidden] * (parts - 1) + [t.shape[0] - hidden * (parts - 1)]
    return torch.split(t, sizes, dim=0)  # views: no copy of the weights


def _check_consumed(sd: Mapping, used: set[str], layout: str, hint: str) -> None:
    extra = sorted(set(sd) - used)
    if extra:
        shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise CheckpointError(f"{len(extra)} unexpected keys in a {layout} state dict ({shown}); {hint}")


def original_to_diffusers(sd: Mapping[str, torch.Tensor], plan: list[KeyEntry], hidden: int, *,
                          layout: str, hint: str) -> dict[str, torch.Tensor]:
    """Original-layout state dict -> diffusers state dict following `plan`; every key must be used once.

    layout: how errors name the input (e.g. "FLUX BFL"); hint: what the flag expects. The input is not modified.
    """
    out: dict[str, torch.Tensor] = {}
    for e in plan:
        if e.original not in sd:
            raise CheckpointError(f"missing key {e.original} in the {layout} DiT file; {hint}")
        t = _swap_halves(sd[e.original]) if e.swap else sd[e.original]
        out.update(zip(e.diffusers, _split_rows(t, len(e.diffusers), hidden) if len(e.diffusers) > 1 else (t,)))
    _check_consumed(sd, {e.original for e in plan}, layout, hint)
    return out


def diffusers_to_original(sd: Mapping[str, torch.Tensor], plan: list[KeyEntry], *, layout: str,
                          hint: str) -> dict[str, torch.Tensor]:
    """Exact inverse of `original_to_diffusers` (fused tensors re-joined by concatenation)."""
    out: dict[str, torch.Tensor] = {}
    for e in plan:
        missing = [k for k in e.diffusers if k not in sd]
        if missing:
            raise CheckpointError(f"missing key {missing[0]} in a diffusers {layout} transformer state dict")
        t = torch.cat([sd[k] for k in e.diffusers], dim=0) if len(e.diffusers) > 1 else sd[e.diffusers[0]]
        out[e.original] = _swap_halves(t) if e.swap else t
    _check_consumed(sd, {k for e in plan for k in e.diffusers}, f"diffusers {layout}", hint)
    return out


def default_axes_dims_rope(head_dim: int) -> tuple[int, int, int]:
    """RoPE split of a head over (time/index, y, x): (16, 56, 56) for the released 128; (4, 6, 6) for 16.

    The split is not stored in the weights. FLUX and HunyuanVideo both give each spatial axis 7/16 of the
    head (rounded down to even) and the first axis the rest; this rule keeps that for every width.
    """
    spatial = (7 * head_dim // 16) // 2 * 2
    return (head_dim - 2 * spatial, spatial, spatial)


_DOUBLE_RE = re.compile(r"(?<!single_)(?:double_blocks|transformer_blocks)[._](\d+)[._]")
_SINGLE_RE = re.compile(r"(?:single_blocks|single_transformer_blocks)[._](\d+)[._]")


def block_layout_from_lora(lora_sd: Mapping[str, torch.Tensor]) -> tuple[int, int, int]:
    """(double blocks, single blocks, hidden size) a LoRA file implies, in any of its layouts (FLUX, HunyuanVideo).

    Hidden size = the narrowest input of any down matrix (every block has hidden-wide inputs; only the
    MLP outputs are wider). Files without block layers give the released width, 3072.
    """
    doubles = [int(m.group(1)) for k in lora_sd if (m := _DOUBLE_RE.search(k))]
    singles = [int(m.group(1)) for k in lora_sd if (m := _SINGLE_RE.search(k))]
    downs = [v.shape[1] for k, v in lora_sd.items()
             if v.dim() == 2 and (".lora_down." in k or ".lora_A." in k)]
    hidden = min(downs) if downs else 3072
    return (max(doubles) + 1 if doubles else 0), (max(singles) + 1 if singles else 0), int(hidden)


def heads_for_width(hidden: int) -> tuple[int, int]:
    """(head size, head count) assumed for a width read from a LoRA alone: 128-wide heads as released, else the
    widest of 64/32/16 that divides it. Only shapes matter for LoRA conversion, so the split need not be exact."""
    head_dim = next(d for d in (128, 64, 32, 16, hidden) if hidden % d == 0)
    return head_dim, hidden // head_dim
