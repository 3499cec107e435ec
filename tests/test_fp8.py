"""memory/fp8.py: Linear weights stored in fp8, computed in the input's dtype; other layers untouched."""

import pytest
import torch
from torch import nn

from musubi_tuner.memory.fp8 import Fp8StorageLinear, cast_linear_weights_to_fp8


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8, bias=False))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 4)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block.mlp(block.proj(block.norm(x)))
        return self.head(x)


def _dequantised_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A plain Toy holding the fp8 weights upcast to `dtype` (load_state_dict converts on copy)."""
    ref = Toy().to(dtype)
    ref.load_state_dict(model.state_dict())
    return ref


def test_linear_weights_become_fp8_and_the_rest_keeps_its_dtype():
    model = Toy()
    names = cast_linear_weights_to_fp8(model, skip_patterns=["head"])
    assert names == [f"blocks.{i}.{n}" for i in (0, 1) for n in ("proj", "mlp.0", "mlp.2")]
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, nn.Linear) and type(layer) is Fp8StorageLinear
        assert layer.weight.dtype == torch.float8_e4m3fn and not layer.weight.requires_grad
        assert layer.bias is None or layer.bias.dtype == torch.float32
    assert model.head.weight.dtype == torch.float32 and type(model.head) is nn.Linear
    assert model.embed.weight.dtype == torch.float32
    assert model.blocks[0].norm.weight.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_equals_dequantised_reference_exactly(dtype):
    model = Toy()
    model.to(dtype)  # before casting, as loaders do: fp8 storage is applied last
    cast_linear_weights_to_fp8(model, skip_patterns=[r"^head$"])
    ids = torch.randint(0, 10, (2, 5))
    expected = _dequantised_copy(model, dtype)(ids)
    actual = model(ids)
    assert actual.dtype == dtype
    assert torch.equal(actual, expected)


def test_gradients_flow_to_inputs_through_fp8_layers():
    layer = nn.Linear(4, 3)
    cast_linear_weights_to_fp8(layer)
    x = torch.randn(2, 4, requires_grad=True)
    layer(x).sum().backward()
    expected = layer.weight.to(torch.float32).sum(dim=0).expand(2, 4)
    assert torch.equal(x.grad, expected)


def test_values_beyond_fp8_range_are_clamped_not_nan():
    layer = nn.Linear(2, 1, bias=False)
    layer.weight.data = torch.tensor([[1000.0, -1000.0]])
    cast_linear_weights_to_fp8(layer)
    assert layer.weight.to(torch.float32).tolist() == [[448.0, -448.0]]


def test_fp8_input_is_computed_in_the_original_weight_dtype():
    layer = nn.Linear(4, 2).to(torch.bfloat16)
    cast_linear_weights_to_fp8(layer)
    x = torch.randn(3, 4).to(torch.float8_e4m3fn)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    ref = torch.nn.functional.linear(x.to(torch.bfloat16), layer.weight.to(torch.bfloat16), layer.bias)
    assert torch.equal(out, ref)


def test_linear_subclasses_and_skips_are_left_alone():
    class MyLinear(nn.Linear):
        pass

    model = nn.ModuleDict({"attn_norm_proj": nn.Linear(2, 2), "custom": MyLinear(2, 2), "ffn": nn.Linear(2, 2)})
    assert cast_linear_weights_to_fp8(model, skip_patterns=["norm"]) == ["ffn"]
    assert model["custom"].weight.dtype == torch.float32


def test_include_limits_casting_to_matching_layers_and_skip_wins():
    model = Toy()
    names = cast_linear_weights_to_fp8(model, include=["blocks"], skip_patterns=[r"mlp\.2$"])
    assert names == ["blocks.0.proj", "blocks.0.mlp.0", "blocks.1.proj", "blocks.1.mlp.0"]
    assert model.head.weight.dtype == torch.float32


def test_rejects_non_fp8_storage_dtype():
    with pytest.raises(ValueError, match="fp8_dtype"):
        cast_linear_weights_to_fp8(nn.Linear(2, 2), fp8_dtype=torch.bfloat16)
