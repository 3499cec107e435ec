"""LoRA modules on a toy DiT: attaching, forward math, dropouts, LoRA+, filtering, dims from weights."""

import copy
import math

import pytest
import torch
from _lora_toy import DIM, ToyArch, ToyDiT, forward_with_lora, randomize_lora
from torch import nn

from musubi_tuner.errors import CheckpointError, UserError
from musubi_tuner.networks import lora
from musubi_tuner.networks.modules import resolve_network_module
from musubi_tuner.networks.targets import LoraPart, LoraTarget


def _net(dit, dim=4, alpha=2.0, **kw):
    net = lora.create_network(ToyArch(), dit, dim, alpha, **kw)
    randomize_lora(net)
    return net


def test_module_init_scale_and_alpha_rules():
    target = LoraTarget("a.b", (LoraPart("x", nn.Linear(6, 5)),))
    m = lora.LoRAModule(target, rank=3, alpha=1.5)
    assert m.lora_down.weight.shape == (3, 6) and m.lora_up.weight.shape == (5, 3)
    assert torch.count_nonzero(m.lora_up.weight) == 0 and torch.count_nonzero(m.lora_down.weight) > 0
    assert m.scale == 0.5 and float(m.alpha) == 1.5
    assert lora.LoRAModule(target, 3, 0).scale == 1.0 and float(lora.LoRAModule(target, 3, None).alpha) == 3.0
    bound = 1 / math.sqrt(6)  # kaiming_uniform(a=sqrt(5)) on fan_in 6
    assert m.lora_down.weight.abs().max() <= bound


def test_apply_keeps_base_state_dict_and_remove_restores():
    dit = ToyDiT()
    x = torch.randn(2, 5, DIM)
    keys, base = list(dit.state_dict()), dit(x)
    net = _net(dit)
    net.apply_to()
    assert list(dit.state_dict()) == keys
    assert not torch.allclose(dit(x), base)
    net.remove()
    assert all("forward" not in m.__dict__ for m in dit.modules())
    assert torch.equal(dit(x), base)


def test_forward_equals_merged_weights_and_multiplier():
    dit = ToyDiT()
    x = torch.randn(2, 5, DIM)
    net = _net(dit, dim=4, alpha=3.0, multiplier=0.7)
    live = forward_with_lora(dit, net, x)
    merged = copy.deepcopy(dit)
    twin = lora.create_network(ToyArch(), merged, 4, 3.0)
    twin.load_state_dict(net.state_dict())
    twin.merge_to_base(0.7)
    with torch.no_grad():
        assert torch.allclose(merged(x), live, atol=1e-6, rtol=0)


def test_fused_layer_computes_down_once_per_input():
    dit = ToyDiT(depth=1)
    net = _net(dit)
    calls = []
    qkv = net.get_submodule("lora_unet_double_blocks_0_img_attn_qkv")
    qkv.lora_down.register_forward_hook(lambda *a: calls.append(1))
    net.apply_to()
    dit(torch.randn(1, 3, DIM))
    dit(torch.randn(1, 3, DIM))
    assert len(calls) == 2  # one per block forward, shared by to_q/to_k/to_v
    assert qkv._shared is None  # no input kept alive after all parts were served


def test_fused_delta_is_up_rows_times_shared_down():
    dit = ToyDiT(depth=1)
    net = _net(dit, dim=2, alpha=1.0)
    qkv = net.get_submodule("lora_unet_double_blocks_0_img_attn_qkv")
    block = dit.blocks[0]
    x = torch.randn(4, DIM)
    base = [block.to_q(x), block.to_k(x), block.to_v(x)]
    net.apply_to()
    delta = (x @ qkv.lora_down.weight.T @ qkv.lora_up.weight.T) * 0.5
    for i, part in enumerate((block.to_q, block.to_k, block.to_v)):
        assert torch.allclose(part(x), base[i] + delta[:, i * DIM : (i + 1) * DIM], atol=1e-6)


def _single_linear_lora(**kw):
    linear = nn.Linear(6, 5)
    module = lora.LoRAModule(LoraTarget("fc", (LoraPart("fc", linear),)), rank=4, alpha=4, **kw)
    nn.init.normal_(module.lora_up.weight)
    module.apply_to()
    return linear, module


def test_dropouts_only_in_training():
    linear, module = _single_linear_lora(dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    x = torch.randn(3, 7, 6)
    module.eval()
    expected = (
        torch.nn.functional.linear(x, linear.weight, linear.bias)
        + x @ module.lora_down.weight.T @ module.lora_up.weight.T
    )
    assert torch.allclose(linear(x), expected, atol=1e-6)
    module.train()
    assert not torch.allclose(linear(x), expected, atol=1e-6)


def test_rank_dropout_masks_ranks_per_sample_and_rescales():
    linear, module = _single_linear_lora(rank_dropout=0.25)
    module.train()
    x = torch.randn(3, 7, 6)
    torch.manual_seed(5)
    out = linear(x)
    torch.manual_seed(5)
    mask = (torch.rand(3, 4) > 0.25).float().unsqueeze(1)
    lx = (x @ module.lora_down.weight.T) * mask
    expected = torch.nn.functional.linear(x, linear.weight, linear.bias) + lx @ module.lora_up.weight.T / 0.75
    assert torch.allclose(out, expected, atol=1e-6)


def test_module_dropout_one_skips_module_in_training():
    linear, module = _single_linear_lora(module_dropout=1.0)
    x = torch.randn(2, 6)
    module.train()
    assert torch.equal(linear(x), torch.nn.functional.linear(x, linear.weight, linear.bias))


def test_loraplus_param_groups():
    net = lora.create_network(ToyArch(), ToyDiT(), 4, 1, network_args=["loraplus_lr_ratio=16"])
    groups = net.prepare_optimizer_params(1e-4)
    ups = {id(m.lora_up.weight) for m in net.loras}
    assert [g["lr"] for g in groups] == [1e-4, pytest.approx(16e-4)]
    assert {id(p) for p in groups[1]["params"]} == ups and not ups & {id(p) for p in groups[0]["params"]}
    single = lora.create_network(ToyArch(), ToyDiT(), 4, 1).prepare_optimizer_params(2e-4)
    assert len(single) == 1 and len(single[0]["params"]) == 2 * 8


def _names(net):
    return {m.original_name.split(".", 2)[2] for m in net.loras}


def test_default_exclude_include_rules():
    dit = ToyDiT(depth=1)
    assert _names(lora.create_network(ToyArch(), dit, 4, 1)) == {
        "img_attn.qkv",
        "img_attn.proj",
        "img_mlp.0",
        "img_mlp.2",
    }
    # a user exclude list replaces the conditional default (img_mod comes back), as the reference does for FLUX
    user = lora.create_network(ToyArch(), dit, 4, 1, network_args=["exclude_patterns=[r'.*img_mlp.*']"])
    assert _names(user) == {"img_attn.qkv", "img_attn.proj", "img_mod.lin"}
    both = lora.create_network(
        ToyArch(), dit, 4, 1, network_args={"exclude_patterns": [r".*img_mlp.*"], "include_patterns": [r".*img_mlp\.0"]}
    )
    assert _names(both) == {"img_attn.qkv", "img_attn.proj", "img_mod.lin", "img_mlp.0"}


def test_bad_network_args_are_user_errors():
    dit = ToyDiT(depth=1)
    with pytest.raises(UserError, match="invalid regex"):
        lora.create_network(ToyArch(), dit, 4, 1, network_args=["exclude_patterns=['(']"])
    with pytest.raises(UserError, match="expected a number"):
        lora.create_network(ToyArch(), dit, 4, 1, network_args=["rank_dropout=abc"])
    with pytest.raises(UserError, match="no LoRA modules"):
        lora.create_network(ToyArch(), dit, 4, 1, network_args=["exclude_patterns=['.*']"])


def test_dim_from_weights_and_wrong_dim_hint():
    dit = ToyDiT(depth=1)
    net = _net(dit, dim=3, alpha=1.5)
    sd = net.state_dict_reference()
    sd["lora_unet_double_blocks_0_img_attn_proj.lora_down.weight"] = torch.randn(5, DIM)
    sd["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"] = torch.randn(DIM, 5)
    rebuilt = lora.create_network_from_weights(ToyArch(), dit, sd)
    rebuilt.load_weights(sd)
    ranks = {m.original_name: (m.lora_dim, float(m.alpha)) for m in rebuilt.loras}
    assert ranks["double_blocks.0.img_attn.proj"] == (5, 1.5) and ranks["double_blocks.0.img_attn.qkv"] == (3, 1.5)
    assert all(torch.equal(v, sd[k]) for k, v in rebuilt.state_dict_reference().items())
    with pytest.raises(CheckpointError, match="--dim_from_weights"):
        lora.create_network(ToyArch(), dit, 3, 1.5).load_weights(sd)


def test_reference_written_file_loads_and_trains_on():
    dit = ToyDiT(depth=1).requires_grad_(False)
    x = torch.randn(2, 3, DIM)
    gen = torch.Generator().manual_seed(3)
    ref = {}  # written by hand with the reference tool's exact keys (alpha stored as a bf16 scalar, as it saves)
    for name, (out_f, in_f) in {
        "img_attn_qkv": (3 * DIM, DIM),
        "img_attn_proj": (DIM, DIM),
        "img_mlp_0": (2 * DIM, DIM),
        "img_mlp_2": (DIM, 2 * DIM),
    }.items():
        stem = f"lora_unet_double_blocks_0_{name}"
        ref[f"{stem}.lora_down.weight"] = torch.randn(4, in_f, generator=gen)
        ref[f"{stem}.lora_up.weight"] = torch.randn(out_f, 4, generator=gen)
        ref[f"{stem}.alpha"] = torch.tensor(2.0, dtype=torch.bfloat16)
    net = lora.create_network(ToyArch(), dit, 4, 1.0)
    net.load_weights(ref)
    assert set(net.state_dict_reference()) == set(ref)
    assert all(m.scale == 0.5 for m in net.loras)
    net.apply_to()
    opt = torch.optim.SGD(net.prepare_optimizer_params(0.1), lr=0.1)
    before = net.state_dict_reference()
    dit(x).square().mean().backward()
    opt.step()
    after = net.state_dict_reference()
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_" in k)
    assert not any(p.grad is not None for p in dit.parameters())


def test_unknown_keys_in_weights_are_named():
    net = lora.create_network(ToyArch(), ToyDiT(depth=1), 4, 1)
    bad = {
        "lora_unet_other_layer.lora_down.weight": torch.zeros(4, 2),
        "lora_unet_other_layer.lora_up.weight": torch.zeros(2, 4),
    }
    with pytest.raises(UserError, match="lora_unet_other_layer"):
        net.load_weights(bad)


def test_max_norm_regularization_caps_delta_norm():
    net = _net(ToyDiT(depth=1), dim=4, alpha=4)
    scaled, _, max_norm = net.apply_max_norm_regularization(0.05, "cpu")
    assert scaled > 0 and max_norm == pytest.approx(0.05, rel=1e-4)
    for m in net.loras:
        assert (m.lora_up.weight @ m.lora_down.weight * m.scale).norm() <= 0.05 + 1e-6


def test_network_module_registry():
    assert resolve_network_module("networks.lora_wan").ARCHITECTURE == "wan"
    assert resolve_network_module("musubi_tuner.networks.lora_flux").ARCHITECTURE == "flux_kontext"
    with pytest.raises(UserError, match="networks.lora_wan"):
        resolve_network_module("networks.nope")


def test_gradient_checkpointing_gives_the_same_grads_with_dropouts():
    from torch.utils.checkpoint import checkpoint

    dit = ToyDiT(depth=2).requires_grad_(False)
    net = _net(dit, network_args=["rank_dropout=0.3", "module_dropout=0.2"], network_dropout=0.1)
    net.apply_to()
    net.train()
    x = torch.randn(2, 5, DIM)

    def grads(use_checkpoint: bool) -> list[torch.Tensor]:
        net.zero_grad()
        torch.manual_seed(11)
        h = x
        for block in dit.blocks:
            h = checkpoint(block, h, use_reentrant=False) if use_checkpoint else block(h)
        h.square().mean().backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in net.parameters()]

    plain, ckpt = grads(False), grads(True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, ckpt))
    assert any(g.abs().sum() > 0 for g in plain)
