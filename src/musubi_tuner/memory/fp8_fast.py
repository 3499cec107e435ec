"""--fp8_fast (generation, with --fp8): fp8 x fp8 matmuls through `torch._scaled_mm` instead of upcasting the
weight, on GPUs with fp8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell). Elsewhere it warns and
keeps the plain fp8 path, whose numbers it does not change.

As the reference: the activation is cast to float8_e5m2 with a unit scale, the weight is the stored e4m3fn tensor
with its per-tensor scale (1 for plain --fp8), and bias and output stay in the compute dtype. e5m2 keeps 2 mantissa
bits, so outputs move by a few percent against the plain path (speed over quality, as the reference's docs say).
Layers with block-wise scales (--fp8_scaled) keep the dequantizing path: `_scaled_mm` takes per-tensor scales only.
Only the layers inside the transformer blocks switch; the embedders and the head keep the plain fp8 path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from musubi_tuner.memory.fp8 import Fp8StorageLinear, fp8_linear

logger = logging.getLogger(__name__)

INPUT_DTYPE = torch.float8_e5m2
MIN_CAPABILITY = (8, 9)
_ALIGN = 16  # `_scaled_mm` needs both matrix dims of the fp8 operands divisible by 16


def scaled_mm_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and \
        torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def emulated_scaled_mm(a, b, *, scale_a, scale_b, bias=None, out_dtype):
    """`torch._scaled_mm`'s math in plain torch (fp32 accumulate): (a * scale_a) @ (b * scale_b) + bias."""
    out = (a.float() * scale_a.float()) @ (b.float() * scale_b.float())
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


class Fp8FastLinear(Fp8StorageLinear):
    """An fp8-stored Linear whose forward runs one fp8 matmul when the shapes allow it."""

    matmul: Callable = staticmethod(torch._scaled_mm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if torch.is_grad_enabled() and x.requires_grad or rows.shape[0] % _ALIGN or rows.shape[1] % _ALIGN \
                or self.out_features % _ALIGN:
            return fp8_linear(x, self.weight, None, self.bias, self.compute_dtype)
        dtype = self.compute_dtype if x.dtype.is_floating_point and x.element_size() == 1 else x.dtype
        limit = torch.finfo(INPUT_DTYPE).max
        one = torch.ones((), dtype=torch.float32, device=x.device)
        bias = None if self.bias is None else self.bias.to(dtype)
        out = self.matmul(rows.clamp(-limit, limit).to(INPUT_DTYPE), self.weight.t(), scale_a=one, scale_b=one,
                          bias=bias, out_dtype=dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


def enable_fp8_fast(dit: nn.Module, device: torch.device, matmul: Callable | None = None) -> int:
    """Switch the DiT's fp8-stored Linear layers to `Fp8FastLinear`; returns how many (0 after a fallback warning).
    `matmul` replaces `torch._scaled_mm` (tests: `emulated_scaled_mm`, which also runs on a CPU)."""
    if matmul is None and not scaled_mm_supported(device):
        logger.warning("--fp8_fast: fp8 matmuls need a CUDA GPU with compute capability %d.%d or newer; %s has none, "
                       "so the plain fp8 path is used", *MIN_CAPABILITY, device)
        return 0
    # Only the transformer blocks' layers, as the reference (its fp8_fast skips the embedders, and Wan's runs only on
    # the fp8_scaled block targets): with plain --fp8 every Linear is stored in fp8, but e5m2 activations in the
    # embedders and the head would double the output error. A model without declared blocks: every layer.
    from musubi_tuner.memory.block_swap import repeated_blocks

    scope = repeated_blocks(dit) or [dit]
    layers = [m for block in scope for m in block.modules() if type(m) is Fp8StorageLinear]
    for layer in layers:
        layer.__class__ = Fp8FastLinear
        if matmul is not None:
            layer.matmul = matmul
    if not layers:
        logger.warning("--fp8_fast: no per-tensor fp8 Linear layers (block-scaled --fp8_scaled layers keep their path)")
    return len(layers)
