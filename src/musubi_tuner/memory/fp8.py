"""fp8 weight storage for `nn.Linear` layers, computed in a higher precision.

`cast_linear_weights_to_fp8(model, skip_patterns)` stores the weight of every plain `nn.Linear` (whose
qualified name matches no skip pattern) as float8 and swaps the layer's class for `Fp8StorageLinear`,
which upcasts the weight (and bias) to the input's dtype inside `forward`. This halves weight memory
against bf16, works on any device (CPU has no fp8 matmul; we never need one), and keeps the layer an
`nn.Linear`, so PEFT/LoRA wrapping and `isinstance` checks still see a Linear.

What stays in higher precision: everything that is not a plain `nn.Linear` (embeddings, norms, convs,
Linear subclasses with their own forward), Linear layers matched by `skip_patterns`, and biases.

Use it last: `model.to(dtype)` / `.half()` after casting would turn the fp8 weights back into `dtype`
(they are floating point); move devices with `.to(device)` only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """fp8 weight (and optional scale: (out, in // block, 1) block-wise or (out, 1) per channel) -> `dtype`."""
    if scale is None:
        return weight.to(dtype)
    if scale.ndim == 3:
        out_features, in_features = weight.shape
        blocks = weight.to(dtype).view(out_features, scale.shape[1], -1)
        return (blocks * scale.to(dtype)).view(out_features, in_features)
    return weight.to(dtype) * scale.to(dtype)


class _Fp8Linear(torch.autograd.Function):
    """x @ dequant(W).T + b for a frozen fp8 W, keeping only the fp8 tensors for backward.

    Plain `F.linear(x, W.to(bf16))` would save the upcast copy for backward, so without gradient checkpointing
    every layer's full-precision weight would stay alive through the forward (more memory than no fp8 at all).
    """

    @staticmethod
    def forward(ctx, x, weight, scale, bias, dtype):
        ctx.save_for_backward(weight, scale)
        return F.linear(x, dequantize(weight, scale, dtype), bias)  # autocast, if on, applies here as usual

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale = ctx.saved_tensors
        grad_x = grad_out @ dequantize(weight, scale, grad_out.dtype)
        return grad_x, None, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
               compute_dtype: torch.dtype) -> torch.Tensor:
    dtype = compute_dtype if x.dtype in FP8_DTYPES else x.dtype
    x = x.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if torch.is_grad_enabled() and x.requires_grad:
        return _Fp8Linear.apply(x, weight, scale, bias, dtype)
    return F.linear(x, dequantize(weight, scale, dtype), bias)


class Fp8StorageLinear(nn.Linear):
    """An `nn.Linear` whose weight is stored in fp8 and upcast per call (made by `cast_linear_weights_to_fp8`)."""

    compute_dtype: torch.dtype
    """The weight's dtype before casting; used when the input itself arrives in fp8."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, None, self.bias, self.compute_dtype)


def selected_linears(module: nn.Module, skip_patterns: Iterable[str], include: Iterable[str] | None,
                     fp8_dtype: torch.dtype, names: set[str] | None = None) -> list[tuple[str, nn.Linear]]:
    """The plain `nn.Linear` layers the fp8 conversions touch: not matching `skip_patterns`, matching `include`
    when given (regexes searched in the qualified name), and among `names` when given (exact qualified names)."""
    if fp8_dtype not in FP8_DTYPES:
        raise ValueError(f"fp8_dtype must be one of {FP8_DTYPES}, got {fp8_dtype}")
    skips = [re.compile(p) for p in skip_patterns]
    includes = None if include is None else [re.compile(p) for p in include]
    return [(name, layer) for name, layer in module.named_modules()
            if type(layer) is nn.Linear and not any(p.search(name) for p in skips)
            and (includes is None or any(p.search(name) for p in includes))
            and (names is None or name in names)]


def cast_linear_weights_to_fp8(
    module: nn.Module,
    skip_patterns: Iterable[str] = (),
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    include: Iterable[str] | None = None,
    names: set[str] | None = None,
) -> list[str]:
    """Store the weights of `module`'s plain `nn.Linear` layers in `fp8_dtype`, in place.

    Patterns are regexes searched (`re.search`) in each Linear's qualified name (as in `named_modules()`);
    plain substrings work too, as in the reference's lists (target `"blocks"`, exclude `"norm"`).
    skip_patterns: a match keeps that layer in its current dtype (wins over `include`).
    include: if given, only layers matching one of these are cast (None: every Linear).
    names: if given, only layers with these exact qualified names are cast.
    Values beyond the fp8 range are clamped (a plain cast would give NaN for e4m3fn).
    Returns the qualified names of the layers cast, in module order.
    """
    limit = torch.finfo(fp8_dtype).max
    cast: list[str] = []
    for name, layer in selected_linears(module, skip_patterns, include, fp8_dtype, names):
        weight = layer.weight.detach()
        layer.compute_dtype = weight.dtype
        layer.weight = nn.Parameter(weight.clamp(-limit, limit).to(fp8_dtype), requires_grad=False)
        layer.__class__ = Fp8StorageLinear
        cast.append(name)
    return cast


# ---- block-wise scaled fp8 (--fp8_scaled) ---------------------------------------------------------------------
SCALE_BLOCK = 64
"""Input features per scale, as the reference's default block-wise quantization."""


class ScaledFp8Linear(nn.Linear):
    """fp8 weight with an fp32 scale per (output row, block of 64 inputs); dequantized per call.

    `scale_weight` has shape (out, in // 64, 1), or (out, 1) per output channel when `in` is not a multiple of 64.
    """

    compute_dtype: torch.dtype

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.weight, self.scale_weight, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.scale_weight, self.bias, self.compute_dtype)


def quantize_weight_scaled(weight: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                           block: int = SCALE_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, fp32 scale): block-wise over the input dim when it divides evenly, else per output channel."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    limit = torch.finfo(fp8_dtype).max
    if in_features % block == 0:
        w = w.view(out_features, in_features // block, block)
    scale = (w.abs().amax(dim=-1, keepdim=True) / limit).clamp(min=1e-8)
    quantized = (w / scale).clamp(-limit, limit).to(fp8_dtype).view(out_features, in_features)
    return quantized, scale


def quantize_linear_weights_scaled_fp8(
    module: nn.Module,
    skip_patterns: Iterable[str] = (),
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    include: Iterable[str] | None = None,
    names: set[str] | None = None,
) -> list[str]:
    """Like `cast_linear_weights_to_fp8`, but with per-block scales (much smaller rounding error). Merge LoRAs
    BEFORE calling this; the same pattern rules apply. Returns the qualified names of the layers quantized."""
    done: list[str] = []
    for name, layer in selected_linears(module, skip_patterns, include, fp8_dtype, names):
        layer.compute_dtype = layer.weight.dtype
        quantized, scale = quantize_weight_scaled(layer.weight, fp8_dtype)
        layer.weight = nn.Parameter(quantized, requires_grad=False)
        layer.register_buffer("scale_weight", scale)
        layer.__class__ = ScaledFp8Linear
        done.append(name)
    return done


def reference_fp8_layers(arch, dit: nn.Module, scaled: bool) -> list[str]:
    """The DiT Linear layers `--fp8_base` (`--fp8`) stores in fp8, by the reference's rule, in module order.

    Plain fp8: every Linear (the reference casts the whole DiT to float8_e4m3fn; we cast the Linear weights, which
    are all but a fraction of a percent of the parameters, and keep norms, convolutions and biases as they are).
    Scaled: a Linear whose ORIGINAL weight key (`double_blocks.0.img_attn_qkv.weight`) contains one of the family's
    `fp8_scaled_keys` targets and none of its excludes, as the reference's `optimize_state_dict_with_fp8`; the names
    come from `arch.lora_candidates`, which covers every block Linear (the targets are all inside the blocks).
    """
    linears = [name for name, layer in dit.named_modules() if type(layer) is nn.Linear]
    if not scaled:
        return linears
    targets, excludes = arch.fp8_scaled_keys
    chosen = {part.module_path for target in arch.lora_candidates(dit)
              if any(t in target.original_name + ".weight" for t in targets)
              and not any(e in target.original_name + ".weight" for e in excludes)
              for part in target.parts}
    return [name for name in linears if name in chosen]


def store_dit_in_fp8(dit: nn.Module, arch, scaled: bool) -> list[str]:
    """--fp8_base / --fp8 (and --fp8_scaled): the Linear weights the reference stores in fp8 (`reference_fp8_layers`)
    become fp8; returns their names."""
    names = set(reference_fp8_layers(arch, dit, scaled))
    convert = quantize_linear_weights_scaled_fp8 if scaled else cast_linear_weights_to_fp8
    return convert(dit, names=names)
