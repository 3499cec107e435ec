"""LoRA state-dict layouts and exact conversion between them.

Three layouts are read and written:

- ``default`` (the reference tool's): ``lora_unet_<original path, "." -> "_">`` with ``.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha``; scale = alpha / rank.
- ``other`` (ComfyUI / diffusion-pipe): ``<prefix>.<original dotted path>.lora_A.weight`` / ``.lora_B.weight``
  (prefix ``diffusion_model`` by default). alpha is baked in (A and B each times sqrt(alpha/rank)) and no alpha key
  is written, so readers that use scale 1.0 without alpha (ComfyUI) get the same weights.
- ``diffusers``: ``<prefix>.<diffusers module path>.lora_A.weight`` / ``.lora_B.weight`` (prefix ``transformer``).
  A fused original layer becomes one entry per diffusers part, all with the same lora_A and a row slice of lora_B.

Every conversion goes through one canonical form, ``{original dotted name: LoraWeights}``. Names are recovered with a
`NameIndex` built from what is known (the architecture's LoRA targets, or the keys of a base checkpoint); string
heuristics are only the fallback when nothing is known, as the reference does.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from musubi_tuner.errors import CheckpointError, UserError
from musubi_tuner.networks.targets import LoraTarget

logger = logging.getLogger(__name__)

LORA_PREFIX = "lora_unet_"
FORMATS = ("default", "other", "diffusers")
DEFAULT_PREFIX = {"other": "diffusion_model", "diffusers": "transformer"}
# Prefixes in front of dotted module paths that readers accept (diffusion-pipe writes `transformer.` + original names).
_KNOWN_DOTTED_PREFIXES = ("diffusion_model.", "transformer.", "model.diffusion_model.")
# Keys some tools store beside the LoRA matrices; they carry no weights.
_FLAG_KEYS = ("use_rslora_flag", "use_dora_flag")

_KEY_RE = re.compile(
    r"^(?P<stem>.+?)\.(?:(?P<kohya>lora_down|lora_up)\.weight|lora_(?P<peft>[AB])(?:\.[^.]+)?\.weight|(?P<alpha>alpha))$"
)


@dataclass
class LoraWeights:
    """One LoRA module: delta W = scale * up @ down, scale = alpha / rank (alpha None or 0: 1.0)."""

    down: torch.Tensor
    """(rank, in_features)"""
    up: torch.Tensor
    """(out_features, rank)"""
    alpha: torch.Tensor | None = None
    """Scalar; None means the scale is already baked into down/up."""

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        if self.alpha is None:
            return 1.0
        alpha = float(self.alpha)
        return 1.0 if alpha == 0 else alpha / self.rank

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the layer it adapts."""
        return self.up.shape[0], self.down.shape[1]

    def delta(self) -> torch.Tensor:
        """The weight delta in fp32, shape (out, in)."""
        return (self.up.float() @ self.down.float()) * self.scale

    def scaled_delta(self, multiplier: float = 1.0, device: torch.device | str | None = None) -> torch.Tensor:
        """multiplier * delta in fp32 on `device` (the matmul runs there)."""
        up, down = self.up.to(device, torch.float32), self.down.to(device, torch.float32)
        return (up @ down) * (multiplier * self.scale)


def lora_name_for(original_name: str) -> str:
    """Reference key stem of an original module path."""
    return LORA_PREFIX + original_name.replace(".", "_")


# ---------------------------------------------------------------------------------------------------------------------
# name recovery


class NameIndex:
    """Resolves every spelling of a LoRA module name to its original dotted path (or to a diffusers part of it)."""

    def __init__(self, original_names: Iterable[str] = (), targets: Sequence[LoraTarget] = ()):
        self.targets = {t.original_name: t for t in targets}
        self.originals = set(original_names) | set(self.targets)
        self.parts: dict[str, tuple[str, int]] = {}
        for t in targets:
            for i, part in enumerate(t.parts):
                self.parts[part.module_path] = (t.original_name, i)
        self.underscored: dict[str, tuple[str, int | None]] = {}
        for path, where in self.parts.items():  # lowest priority: kohya-style keys over diffusers names
            self.underscored[lora_name_for(path)] = where
        for name in self.originals:
            self.underscored[lora_name_for(name)] = (name, None)

    @property
    def empty(self) -> bool:
        return not self.originals

    def resolve(self, stem: str) -> tuple[str, int | None] | None:
        """(original name, part index or None for the whole layer), or None when the name is unknown."""
        if stem.startswith(LORA_PREFIX):
            if stem in self.underscored:
                return self.underscored[stem]
            return (heuristic_original_name(stem), None) if self.empty else None
        candidates = [stem[len(p) :] for p in _KNOWN_DOTTED_PREFIXES if stem.startswith(p)] + [stem]
        for name in candidates:
            if name in self.originals:
                return name, None
            if name in self.parts:
                return self.parts[name]
        if self.empty and len(candidates) > 1:
            return candidates[0], None  # reference behaviour: strip the prefix, keep the dotted path
        return None


def heuristic_original_name(lora_name: str) -> str:
    """Reference fix-ups for `lora_unet_*` -> dotted name when no model is known (Wan, HunyuanVideo names)."""
    name = lora_name[len(LORA_PREFIX) :].replace("_", ".")
    if ".cross.attn." in name or ".self.attn." in name:
        for wrong, right in (
            ("cross.attn", "cross_attn"),
            ("self.attn", "self_attn"),
            ("k.img", "k_img"),
            ("v.img", "v_img"),
        ):
            name = name.replace(wrong, right)
    else:
        for wrong, right in (
            ("double.blocks.", "double_blocks."),
            ("single.blocks.", "single_blocks."),
            ("img.", "img_"),
            ("txt.", "txt_"),
            ("attn.", "attn_"),
        ):
            name = name.replace(wrong, right)
    return name


# ---------------------------------------------------------------------------------------------------------------------
# reading any layout into the canonical form


def _split_key(key: str) -> tuple[str, str] | None:
    match = _KEY_RE.match(key)
    if match is None:
        return None
    if match["alpha"]:
        return match["stem"], "alpha"
    kind = match["kohya"] or {"A": "lora_down", "B": "lora_up"}[match["peft"]]
    return match["stem"], "down" if kind == "lora_down" else "up"


def detect_format(state_dict: dict[str, torch.Tensor], index: NameIndex | None = None) -> str:
    """`default`, `other` or `diffusers` (by the first LoRA key; `index` tells diffusers parts from original names)."""
    for key in state_dict:
        split = _split_key(key)
        if split is None:
            continue
        stem = split[0]
        if stem.startswith(LORA_PREFIX):
            return "default"
        if index is not None and not index.empty:
            where = index.resolve(stem)
            if where is not None and where[1] is not None:
                return "diffusers"
            return "other"
        return "diffusers" if stem.startswith("transformer.") else "other"
    raise CheckpointError("no LoRA keys found (expected *.lora_down.weight / *.lora_A.weight)")


def _check_unsupported(state_dict: dict[str, torch.Tensor]) -> None:
    for key in state_dict:
        if any(tag in key for tag in ("hada_w", "lokr_w", ".dora_scale", "dora_layer")):
            raise CheckpointError(f"key {key!r}: this LoHa/LoKr form (factored w1, conv) or DoRA is not supported; "
                                  "use a LoRA, a LoHa or a linear LoKr file")
    if "use_dora_flag" in state_dict and bool(state_dict["use_dora_flag"]):
        raise CheckpointError("this LoRA was trained with DoRA (use_dora_flag=True), which is not supported")


def parse_lora_state_dict(
    state_dict: dict[str, torch.Tensor], index: NameIndex | None = None
) -> tuple[dict[str, LoraWeights], list[str]]:
    """Any supported layout -> ({original name: LoraWeights}, keys whose module is unknown).

    Diffusers per-part entries of one fused layer are re-fused (see `fuse_parts`).
    """
    index = index or NameIndex()
    _check_unsupported(state_dict)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    unmatched: list[str] = []
    for key, value in state_dict.items():
        if key in _FLAG_KEYS:
            continue
        split = _split_key(key)
        if split is None:
            unmatched.append(key)
            continue
        grouped.setdefault(split[0], {})[split[1]] = value

    whole: dict[str, LoraWeights] = {}
    parts: dict[str, dict[int, LoraWeights]] = {}
    for stem, tensors in grouped.items():
        where = index.resolve(stem)
        if where is None:
            unmatched.extend(f"{stem}.{kind}" for kind in tensors)
            continue
        if "down" not in tensors or "up" not in tensors:
            raise CheckpointError(f"LoRA module {stem!r} lacks its {'up' if 'down' in tensors else 'down'} matrix")
        weights = LoraWeights(tensors["down"], tensors["up"], tensors.get("alpha"))
        name, part = where
        if part is None:
            if name in whole:
                raise CheckpointError(f"LoRA module {name!r} appears twice (as {stem!r} and another spelling)")
            whole[name] = weights
        else:
            parts.setdefault(name, {})[part] = weights
    for name, by_part in parts.items():
        if name in whole:
            raise CheckpointError(f"LoRA file has {name!r} both as one layer and as diffusers parts")
        whole[name] = fuse_parts(index.targets[name], by_part)
    if "use_rslora_flag" in state_dict and bool(state_dict["use_rslora_flag"]):
        whole = {n: _rslora_to_plain(w) for n, w in whole.items()}
    return whole, unmatched


def _rslora_to_plain(w: LoraWeights) -> LoraWeights:
    # rsLoRA scales by alpha/sqrt(r); the same delta with the alpha/r rule needs alpha*sqrt(r).
    alpha = float(w.alpha) if w.alpha is not None else math.sqrt(w.rank)
    return LoraWeights(w.down, w.up, torch.tensor(alpha * math.sqrt(w.rank)))


def fuse_parts(target: LoraTarget, by_part: dict[int, LoraWeights]) -> LoraWeights:
    """Per-part LoRAs of one fused layer -> one LoRA over the whole layer, with the same weight delta.

    Parts that share an identical down matrix and alpha fuse exactly at the same rank (up rows concatenated, absent
    parts as zero rows). Otherwise the ranks are concatenated: down stacked, up block-diagonal.
    """
    sizes = target.split_sizes
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    present = sorted(by_part)
    first = by_part[present[0]]
    same_down = all(torch.equal(by_part[i].down, first.down) for i in present)
    same_alpha = all(_alpha_value(by_part[i]) == _alpha_value(first) for i in present)
    if same_down and same_alpha:
        up = first.up.new_zeros((target.out_features, first.rank))
        for i in present:
            up[offsets[i] : offsets[i] + sizes[i]] = by_part[i].up
        return LoraWeights(first.down, up, first.alpha)
    # Each part's scale goes into its up block (a no-op, hence exact, when no part has an alpha).
    dtype = first.down.dtype
    total = sum(by_part[i].rank for i in present)
    down = torch.cat([by_part[i].down.to(dtype) for i in present])
    up = first.up.new_zeros((target.out_features, total))
    col = 0
    for i in present:
        w = by_part[i]
        block = w.up if w.scale == 1.0 else (w.up.float() * w.scale).to(w.up.dtype)
        up[offsets[i] : offsets[i] + sizes[i], col : col + w.rank] = block
        col += w.rank
    return LoraWeights(down, up, None)


def _alpha_value(w: LoraWeights) -> float | None:
    return None if w.alpha is None else float(w.alpha)


# ---------------------------------------------------------------------------------------------------------------------
# writing the canonical form


def to_default(canonical: dict[str, LoraWeights]) -> dict[str, torch.Tensor]:
    """Reference layout; a missing alpha becomes alpha = rank (scale 1), as the reference's converter does."""
    out: dict[str, torch.Tensor] = {}
    for name, w in canonical.items():
        stem = lora_name_for(name)
        out[f"{stem}.lora_down.weight"] = w.down
        out[f"{stem}.lora_up.weight"] = w.up
        out[f"{stem}.alpha"] = w.alpha if w.alpha is not None else torch.tensor(float(w.rank))
    return out


def _baked(w: LoraWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """down, up with the scale split evenly into both (sqrt each), in their own dtypes."""
    if w.scale == 1.0:
        return w.down, w.up
    root = math.sqrt(w.scale)
    return (w.down.float() * root).to(w.down.dtype), (w.up.float() * root).to(w.up.dtype)


def _dotted_key(prefix: str | None, path: str, matrix: str, adapter_name: str | None) -> str:
    head = f"{prefix}." if prefix else ""
    adapter = f".{adapter_name}" if adapter_name else ""
    return f"{head}{path}.lora_{matrix}{adapter}.weight"


def to_other(
    canonical: dict[str, LoraWeights], prefix: str | None = "diffusion_model", adapter_name: str | None = None
) -> dict[str, torch.Tensor]:
    """`<prefix>.<original path>.lora_A/B.weight`, alpha baked in, no alpha keys."""
    out: dict[str, torch.Tensor] = {}
    for name, w in canonical.items():
        down, up = _baked(w)
        out[_dotted_key(prefix, name, "A", adapter_name)] = down
        out[_dotted_key(prefix, name, "B", adapter_name)] = up
    return out


def to_diffusers(
    canonical: dict[str, LoraWeights],
    targets: Sequence[LoraTarget],
    prefix: str | None = "transformer",
    adapter_name: str | None = None,
) -> dict[str, torch.Tensor]:
    """`<prefix>.<diffusers path>.lora_A/B.weight`; fused layers split into parts sharing lora_A; alpha baked."""
    by_name = {t.original_name: t for t in targets}
    missing = [n for n in canonical if n not in by_name]
    if missing:
        raise UserError(
            f"no diffusers module is known for LoRA module(s) {missing[:5]} ({len(missing)} in all); wrong --arch?"
        )
    out: dict[str, torch.Tensor] = {}
    for name, w in canonical.items():
        target = by_name[name]
        if w.up.shape[0] != target.out_features or w.down.shape[1] != target.in_features:
            raise UserError(
                f"LoRA module {name!r} has shape {tuple(w.up.shape[:1]) + tuple(w.down.shape[1:])} (out, in) but the "
                f"model layer is ({target.out_features}, {target.in_features}); wrong --arch or model size?"
            )
        down, up = _baked(w)
        row = 0
        for part in target.parts:
            rows = part.module.out_features
            # each part gets its own copy: safetensors refuses tensors that share memory
            out[_dotted_key(prefix, part.module_path, "A", adapter_name)] = (
                down if len(target.parts) == 1 else down.clone()
            )
            out[_dotted_key(prefix, part.module_path, "B", adapter_name)] = up[row : row + rows].contiguous()
            row += rows
    return out


def convert_state_dict(
    state_dict: dict[str, torch.Tensor],
    target_format: str,
    index: NameIndex | None = None,
    prefix: str | None = None,
    adapter_name: str | None = None,
) -> dict[str, torch.Tensor]:
    """Any layout -> `target_format`. `diffusers` needs an index built from the architecture's targets."""
    if target_format not in FORMATS:
        raise UserError(f"unknown LoRA format {target_format!r}; choose one of: {', '.join(FORMATS)}")
    index = index or NameIndex()
    if index.empty:
        logger.warning("no model names known: LoRA module names are recovered by the reference's string rules")
    from musubi_tuner.networks.lycoris_weights import lycoris_to_layout, parse_adapter_state_dict

    canonical, unmatched = parse_adapter_state_dict(state_dict, index)
    if unmatched:
        raise CheckpointError(f"{len(unmatched)} LoRA key(s) name no known module, e.g. {unmatched[:5]}")
    # LoHa/LoKr modules are renamed only, alpha kept (as the reference's converter copies them)
    lycoris = {n: w for n, w in canonical.items() if not isinstance(w, LoraWeights)}
    canonical = {n: w for n, w in canonical.items() if isinstance(w, LoraWeights)}
    prefix = DEFAULT_PREFIX.get(target_format) if prefix is None else (prefix if prefix not in ("", "-") else None)
    out = lycoris_to_layout(lycoris, target_format, prefix) if lycoris else {}
    if target_format == "default":
        return {**to_default(canonical), **out}
    if target_format == "other":
        return {**to_other(canonical, prefix, adapter_name), **out}
    if not index.targets:
        raise UserError("converting to the diffusers layout needs the model's layer map: pass --arch")
    return to_diffusers(canonical, list(index.targets.values()), prefix, adapter_name)
