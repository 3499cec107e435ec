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


class Fp8StorageLinear(nn.Linear):
    """An `nn.Linear` whose weight is stored in fp8 and upcast per call (made by `cast_linear_weights_to_fp8`)."""

    compute_dtype: torch.dtype
    """The weight's dtype before casting; used when the input itself arrives in fp8."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype if x.dtype in FP8_DTYPES else x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.weight.to(dtype), bias)


def cast_linear_weights_to_fp8(
    module: nn.Module,
    skip_patterns: Iterable[str] = (),
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    include: Iterable[str] | None = None,
) -> list[str]:
    """Store the weights of `module`'s plain `nn.Linear` layers in `fp8_dtype`, in place.

    Patterns are regexes searched (`re.search`) in each Linear's qualified name (as in `named_modules()`);
    plain substrings work too, as in the reference's lists (target `"blocks"`, exclude `"norm"`).
    skip_patterns: a match keeps that layer in its current dtype (wins over `include`).
    include: if given, only layers matching one of these are cast (None: every Linear).
    Values beyond the fp8 range are clamped (a plain cast would give NaN for e4m3fn).
    Returns the qualified names of the layers cast, in module order.
    """
    if fp8_dtype not in FP8_DTYPES:
        raise ValueError(f"fp8_dtype must be one of {FP8_DTYPES}, got {fp8_dtype}")
    skips = [re.compile(p) for p in skip_patterns]
    includes = None if include is None else [re.compile(p) for p in include]
    limit = torch.finfo(fp8_dtype).max
    cast: list[str] = []
    for name, layer in module.named_modules():
        if type(layer) is not nn.Linear or any(p.search(name) for p in skips):
            continue
        if includes is not None and not any(p.search(name) for p in includes):
            continue
        weight = layer.weight.detach()
        layer.compute_dtype = weight.dtype
        layer.weight = nn.Parameter(weight.clamp(-limit, limit).to(fp8_dtype), requires_grad=False)
        layer.__class__ = Fp8StorageLinear
        cast.append(name)
    return cast
