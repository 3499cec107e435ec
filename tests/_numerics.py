"""Comparing a model loaded from a file with the model it was saved from.

Weights must be bit-identical. Outputs are compared to 1e-5: MKL chooses its CPU kernels by memory alignment, and
tensors memory-mapped from a safetensors file sit wherever the header ends (not 64-byte aligned), so the same
weights can sum in another order (differences of ~1e-6 seen on a tiny Wan DiT; none once the weights are copied).
"""

from __future__ import annotations

import torch

OUTPUT_ATOL = 1e-5


def assert_same_weights(loaded: torch.nn.Module, source: torch.nn.Module) -> None:
    want, got = source.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"weights differ: {different[:5]}"


def assert_same_outputs(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=0, atol=OUTPUT_ATOL), (got - want).abs().max()
