"""LoHa and LoKr weights in files: their keys, their weight delta, and reading/writing them in any layout.

Keys are the reference's (the LyCORIS ones), per module stem (`lora_unet_<original path>` or, in the `other`
layout, `diffusion_model.<original dotted path>`):
- LoHa: `hada_w1_a` (out x r), `hada_w1_b` (r x in), `hada_w2_a`, `hada_w2_b`, `alpha`;
  delta = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r.
- LoKr: `lokr_w1` (out_l x in_m) and either `lokr_w2_a` (out_k x r) + `lokr_w2_b` (r x in_n) or a full `lokr_w2`
  (out_k x in_n), `alpha`; delta = kron(w1, w2) * alpha / d with d = r, or max(w2's shape) for a full w2 (the
  reference's rule). The reference also stores a top-level `lokr_factor` (int64) beside the modules.

A module spans the ORIGINAL layer, fused ones included (its delta covers all the layer's output rows), so these
files convert to the `default` and `other` layouts by renaming only; the `diffusers` per-part layout has no LoHa/LoKr
form.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from musubi_tuner.errors import CheckpointError, UserError

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_KEYS = ("lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
LOKR_FACTOR_KEY = "lokr_factor"
_KEY_RE = re.compile(r"^(?P<stem>.+)\.(?P<kind>hada_w[12]_[ab]|lokr_w1|lokr_w2(?:_[ab])?|alpha)$")


def _scale(alpha: torch.Tensor | float | None, dim: int) -> float:
    alpha = 0.0 if alpha is None else float(alpha)
    return 1.0 if alpha == 0 else alpha / dim  # alpha 0/None: no scaling, as every reader does


@dataclass
class LohaWeights:
    kind: ClassVar[str] = "LoHa"
    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    alpha: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.w1_b.shape[0]

    @property
    def scale(self) -> float:
        return _scale(self.alpha, self.rank)

    @property
    def shape(self) -> tuple[int, int]:
        return self.w1_a.shape[0], self.w1_b.shape[1]

    def scaled_delta(self, multiplier: float = 1.0, device=None) -> torch.Tensor:
        """multiplier * delta in fp32, (out, in)."""
        w1_a, w1_b, w2_a, w2_b = (t.to(device, torch.float32) for t in (self.w1_a, self.w1_b, self.w2_a, self.w2_b))
        return ((w1_a @ w1_b) * (w2_a @ w2_b)) * (multiplier * self.scale)

    def delta(self) -> torch.Tensor:
        return self.scaled_delta(1.0)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(zip(LOHA_KEYS, (self.w1_a, self.w1_b, self.w2_a, self.w2_b)))


@dataclass
class LokrWeights:
    kind: ClassVar[str] = "LoKr"
    w1: torch.Tensor
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    alpha: torch.Tensor | None = None

    @property
    def low_rank(self) -> bool:
        return self.w2 is None

    @property
    def rank(self) -> int:
        return self.w2_a.shape[1] if self.low_rank else max(self.w2.shape)

    @property
    def scale(self) -> float:
        return _scale(self.alpha, self.rank)

    @property
    def w2_shape(self) -> tuple[int, int]:
        return (self.w2_a.shape[0], self.w2_b.shape[1]) if self.low_rank else tuple(self.w2.shape)

    @property
    def shape(self) -> tuple[int, int]:
        out_k, in_n = self.w2_shape
        return self.w1.shape[0] * out_k, self.w1.shape[1] * in_n

    def scaled_delta(self, multiplier: float = 1.0, device=None) -> torch.Tensor:
        w1 = self.w1.to(device, torch.float32)
        if self.low_rank:
            w2 = self.w2_a.to(device, torch.float32) @ self.w2_b.to(device, torch.float32)
        else:
            w2 = self.w2.to(device, torch.float32)
        return torch.kron(w1, w2) * (multiplier * self.scale)

    def delta(self) -> torch.Tensor:
        return self.scaled_delta(1.0)

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.low_rank:
            return {"lokr_w1": self.w1, "lokr_w2_a": self.w2_a, "lokr_w2_b": self.w2_b}
        # ComfyUI scales a full w2 by 1.0 whatever the alpha; bake the scale in and write alpha = max(shape) so
        # that every reader (the reference: alpha / max(shape) = 1) gets the same delta.
        return {"lokr_w1": self.w1, "lokr_w2": (self.w2.float() * self.scale).to(self.w2.dtype)}

    def file_alpha(self) -> torch.Tensor:
        if self.low_rank:
            return self.alpha if self.alpha is not None else torch.tensor(float(self.rank))
        return torch.tensor(float(self.rank))


AdapterWeights = LohaWeights | LokrWeights


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(larger, smaller) factors of `dimension` for a Kronecker split: (dimension / factor, factor) when `factor` > 0
    divides it, else the most square pair (the reference's rule)."""
    if factor > 0 and dimension % factor == 0:
        return dimension // factor, factor
    best = (dimension, 1)
    for a in range(2, math.isqrt(dimension) + 1):
        if dimension % a == 0 and dimension // a - a < best[0] - best[1]:
            best = (dimension // a, a)
    return best


def is_lycoris_key(key: str) -> bool:
    return key == LOKR_FACTOR_KEY or any(f".{k}" in key for k in LOHA_KEYS + LOKR_KEYS)


def split_lycoris(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """({stem: {kind: tensor}} of the LoHa/LoKr modules, the rest of the state dict). A module's `.alpha` goes
    with it; `lokr_factor` is dropped (shapes say everything)."""
    stems = {m["stem"] for k in state_dict if (m := _KEY_RE.match(k)) and m["kind"] != "alpha"}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    for key, value in state_dict.items():
        match = _KEY_RE.match(key)
        if match and match["stem"] in stems:
            grouped.setdefault(match["stem"], {})[match["kind"]] = value
        elif key != LOKR_FACTOR_KEY:
            rest[key] = value
    return grouped, rest


def weights_from_tensors(stem: str, tensors: dict[str, torch.Tensor]) -> AdapterWeights:
    """One module's tensors (keys without the stem) -> LohaWeights / LokrWeights; incomplete sets are an error."""
    alpha = tensors.get("alpha")
    if any(k.startswith("hada_") for k in tensors):
        missing = [k for k in LOHA_KEYS if k not in tensors]
        if missing:
            raise CheckpointError(f"LoHa module {stem!r} lacks {missing}")
        return LohaWeights(*(tensors[k] for k in LOHA_KEYS), alpha=alpha)
    has_full, has_low = "lokr_w2" in tensors, "lokr_w2_a" in tensors and "lokr_w2_b" in tensors
    if "lokr_w1" not in tensors or not (has_full or has_low):
        raise CheckpointError(f"LoKr module {stem!r} needs lokr_w1 and lokr_w2 (or lokr_w2_a + lokr_w2_b); "
                              "factored w1 (lokr_w1_a/_b) and conv (lokr_t2) forms are not supported")
    if has_full:
        return LokrWeights(tensors["lokr_w1"], w2=tensors["lokr_w2"], alpha=alpha)
    return LokrWeights(tensors["lokr_w1"], w2_a=tensors["lokr_w2_a"], w2_b=tensors["lokr_w2_b"], alpha=alpha)


def parse_adapter_state_dict(state_dict: dict[str, torch.Tensor], index) -> tuple[dict, list[str]]:
    """Any file (LoRA, LoHa, LoKr or a mix) -> ({original name: LoraWeights | LohaWeights | LokrWeights},
    keys whose module is unknown). index: a `lora_formats.NameIndex`."""
    from musubi_tuner.networks.lora_formats import parse_lora_state_dict

    grouped, rest = split_lycoris(state_dict)
    canonical, unmatched = parse_lora_state_dict(rest, index)
    for stem, tensors in grouped.items():
        where = index.resolve(stem)
        if where is None:
            unmatched.extend(f"{stem}.{kind}" for kind in tensors)
            continue
        name, part = where
        if part is not None:
            raise CheckpointError(f"LoHa/LoKr module {stem!r} names one diffusers part of the fused layer {name!r}; "
                                  "LoHa/LoKr must span the original layer")
        if name in canonical:
            raise CheckpointError(f"module {name!r} appears twice in the file (as {stem!r} and another spelling)")
        canonical[name] = weights_from_tensors(stem, tensors)
    return canonical, unmatched


def lycoris_to_layout(canonical: dict[str, AdapterWeights], target_format: str, prefix: str | None) -> dict:
    """LoHa/LoKr modules in the `default` (`lora_unet_*`) or `other` (`<prefix>.<dotted name>`) layout, alpha kept."""
    from musubi_tuner.networks.lora_formats import lora_name_for

    if target_format == "diffusers":
        raise UserError("LoHa/LoKr files have no diffusers layout (their delta is not split per diffusers layer); "
                        "use --target default or other")
    out: dict[str, torch.Tensor] = {}
    for name, w in canonical.items():
        stem = lora_name_for(name) if target_format == "default" else (f"{prefix}.{name}" if prefix else name)
        out.update({f"{stem}.{k}": v for k, v in w.tensors().items()})
        alpha = w.file_alpha() if isinstance(w, LokrWeights) else w.alpha
        out[f"{stem}.alpha"] = alpha if alpha is not None else torch.tensor(float(w.rank))
    return out
