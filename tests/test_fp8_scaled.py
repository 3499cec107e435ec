"""--fp8_scaled: block-wise scaled fp8 storage."""

import torch
import torch.nn.functional as F
from torch import nn

from musubi_tuner.memory.fp8 import (
    ScaledFp8Linear,
    cast_linear_weights_to_fp8,
    quantize_linear_weights_scaled_fp8,
    quantize_weight_scaled,
)


def _rows_of_different_magnitude(out_features=8, in_features=128):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=gen)
    return w * torch.logspace(-6, 0, out_features)[:, None]  # 1e-6 rows underflow in plain e4m3


def test_block_scales_have_the_reference_shape_and_bound_the_error():
    w = _rows_of_different_magnitude()
    q, scale = quantize_weight_scaled(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (8, 2, 1) and scale.dtype == torch.float32
    deq = (q.float().view(8, 2, 64) * scale).view(8, 128)
    rel = ((deq - w).norm(dim=1) / w.norm(dim=1)).max()
    assert rel < 0.05
    plain = w.to(torch.float8_e4m3fn).float()
    assert ((plain - w).norm(dim=1) / w.norm(dim=1)).max() > 0.5  # why scales matter


def test_per_channel_scale_when_the_input_width_is_not_a_multiple_of_64():
    q, scale = quantize_weight_scaled(torch.randn(4, 48))
    assert scale.shape == (4, 1)


def test_forward_equals_linear_on_the_dequantized_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 16), nn.ReLU(), nn.Linear(16, 8))
    model[0].weight.data = _rows_of_different_magnitude(16, 128)
    x = torch.randn(3, 128)
    reference = model(x)
    names = quantize_linear_weights_scaled_fp8(model, include=["0"])
    assert names == ["0"] and isinstance(model[0], ScaledFp8Linear) and type(model[2]) is nn.Linear
    expected = F.linear(x, model[0].dequantized_weight(torch.float32), model[0].bias)
    assert torch.equal(model[0](x), expected)
    torch.testing.assert_close(model(x), reference, rtol=0.1, atol=1e-3)


def test_scaled_is_closer_to_the_original_than_plain_fp8():
    torch.manual_seed(0)
    base = nn.Linear(128, 16, bias=False)
    base.weight.data = _rows_of_different_magnitude(16, 128)
    x = torch.randn(5, 128)
    ref = base(x)
    plain, scaled = nn.Linear(128, 16, bias=False), nn.Linear(128, 16, bias=False)
    plain.load_state_dict(base.state_dict())
    scaled.load_state_dict(base.state_dict())
    cast_linear_weights_to_fp8(nn.ModuleDict({"l": plain}))
    quantize_linear_weights_scaled_fp8(nn.ModuleDict({"l": scaled}))
    def worst_relative_error(y):  # per output feature, so small-magnitude rows count as much as large ones
        return ((y - ref).abs().amax(dim=0) / ref.abs().amax(dim=0)).max()

    assert worst_relative_error(scaled(x)) < 0.1 < worst_relative_error(plain(x))


def test_backward_keeps_only_fp8_weights_and_gives_the_exact_input_gradient():
    """Without gradient checkpointing, an upcast weight saved for backward would cost more than no fp8 at all."""
    torch.manual_seed(0)
    for quantize in (cast_linear_weights_to_fp8, quantize_linear_weights_scaled_fp8):
        layer = nn.Linear(128, 64)
        quantize(nn.ModuleDict({"l": layer}))
        x = torch.randn(4, 128, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = layer(x)
        big = [t for t in saved if t.shape == (64, 128)]
        assert big and all(t.dtype == torch.float8_e4m3fn for t in big), [t.dtype for t in big]
        y.square().sum().backward()
        scale = getattr(layer, "scale_weight", None)
        from musubi_tuner.memory.fp8 import dequantize

        w = dequantize(layer.weight, scale, torch.float32)
        x_ref = x.detach().clone().requires_grad_(True)
        F.linear(x_ref, w, layer.bias).square().sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
