"""LoHa / LoKr: delta math against hand computations, fused layers, files (reference keys, round trip, convert),
merges (original layout and live model), ComfyUI's LoHa/LoKr rules, LoRA+ and max-norm."""

from __future__ import annotations

import pytest
import torch
from _lora_toy import DIM, ToyArch, ToyDiT, comfy_unconsumed_keys, forward_with_lora
from safetensors.torch import load_file

from musubi_tuner.errors import CheckpointError, UserError
from musubi_tuner.networks import lora
from musubi_tuner.networks.lora_files import NameIndex, convert_state_dict, save_lora_file
from musubi_tuner.networks.lycoris import LoHaNetwork, LoKrNetwork
from musubi_tuner.networks.lycoris_weights import factorization
from musubi_tuner.networks.merge import merge_lora_into_original_state_dict

QKV = "double_blocks.0.img_attn.qkv"
STEM = "lora_unet_double_blocks_0_img_attn_qkv"


def _randomize(network, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def _net(kind, dim=2, alpha=3.0, args=None, seed=3):
    dit = ToyDiT(depth=2)
    cls = {"loha": LoHaNetwork, "lokr": LoKrNetwork}[kind]
    net = lora.create_network(ToyArch(), dit, dim, alpha, network_args=args, network_class=cls)
    _randomize(net, seed)
    return dit, net


def _kron_by_hand(w1, w2):
    # delta[i * out_k + j, p * in_n + q] = w1[i, p] * w2[j, q], without torch.kron
    out_l, in_m = w1.shape
    out_k, in_n = w2.shape
    return torch.einsum("ip,jq->ijpq", w1, w2).reshape(out_l * out_k, in_m * in_n)


def test_factorization_follows_the_reference():
    assert factorization(3072) == (64, 48) and factorization(8) == (4, 2) and factorization(7) == (7, 1)
    assert factorization(16, 4) == (4, 4) and factorization(24, 8) == (3, 8)
    assert factorization(24, 5) == factorization(24)  # a factor that does not divide: automatic


def test_loha_delta_is_the_hadamard_product_and_spans_the_fused_layer():
    dit, net = _net("loha", dim=2, alpha=3.0)
    module = getattr(net, STEM)
    w1a, w1b, w2a, w2b = (getattr(module, k).detach() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    assert w1a.shape == (3 * DIM, 2) and w1b.shape == (2, DIM)  # the fused original: q, k and v rows
    expected = ((w1a @ w1b) * (w2a @ w2b)) * (3.0 / 2)
    assert torch.equal(module.weights().delta(), expected)
    # live: each diffusers part adds its rows of the one delta
    x = torch.randn(2, 5, DIM)
    block = dit.blocks[0]
    base = [part(x) for part in (block.to_q, block.to_k, block.to_v)]
    net.set_multiplier(0.7)
    net.apply_to()
    live = [part(x) for part in (block.to_q, block.to_k, block.to_v)]
    net.remove()
    for i, (b, out) in enumerate(zip(base, live)):
        assert torch.allclose(out, b + x @ (0.7 * expected[i * DIM : (i + 1) * DIM]).T, atol=1e-6)


@pytest.mark.parametrize("dim,factor,low_rank", [(1, -1, True), (8, 2, False)])
def test_lokr_delta_is_the_kronecker_product(dim, factor, low_rank):
    dit, net = _net("lokr", dim=dim, alpha=2.0, args=[f"factor={factor}"])
    module = getattr(net, STEM)  # out 24, in 8
    assert module.low_rank is low_rank
    w1 = module.lokr_w1.detach()
    w2 = module.lokr_w2_a.detach() @ module.lokr_w2_b.detach() if low_rank else module.lokr_w2.detach()
    out_l, out_k = factorization(3 * DIM, factor)
    in_m, in_n = factorization(DIM, factor)
    assert w1.shape == (out_l, in_m) and w2.shape == (out_k, in_n)
    d = dim if low_rank else max(out_k, in_n)  # the reference's divisor
    assert torch.equal(module.weights().delta(), _kron_by_hand(w1, w2) * (2.0 / d))


@pytest.mark.parametrize("kind,args", [("loha", None), ("lokr", None), ("lokr", ["factor=2"])])
def test_reference_keys_and_round_trip_through_a_file(kind, args, tmp_path):
    dit, net = _net(kind, dim=8 if args else 2, alpha=3.0, args=args)
    sd = net.state_dict_reference()
    names = {k.split(".", 1)[1] for k in sd if k.startswith(STEM + ".")}
    expected = {"loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
                "lokr": {"lokr_w1", "lokr_w2", "alpha"}}[kind]
    if kind == "lokr" and args is None:
        expected = {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}  # dim 8 < max(w2 shape) 12 -> low rank
    assert names == expected
    assert ("lokr_factor" in sd) == (args is not None)  # only a chosen factor is recorded, as the reference does
    path = tmp_path / "a.safetensors"
    save_lora_file(sd, path)
    loaded = load_file(str(path))
    rebuilt = lora.create_network_from_weights(ToyArch(), dit, loaded)
    assert type(rebuilt) is type(net) and len(rebuilt.loras) == len(net.loras)
    rebuilt.load_weights(str(path))
    for a, b in zip(net.loras, rebuilt.loras):
        assert torch.allclose(a.weights().delta(), b.weights().delta(), rtol=1e-6, atol=0), a.lora_name


def _comfy_delta(sd, stem):
    """ComfyUI's LoHa / LoKr weight rules (comfy/weight_adapter): LoHa scale alpha / w1_b rows; LoKr scale
    alpha / w2_b rows for a low-rank w2 and 1.0 for a full one."""
    alpha = sd.get(f"{stem}.alpha")
    if f"{stem}.hada_w1_a" in sd:
        w1a, w1b, w2a, w2b = (sd[f"{stem}.hada_{k}"].float() for k in ("w1_a", "w1_b", "w2_a", "w2_b"))
        scale = float(alpha) / w1b.shape[0] if alpha is not None else 1.0
        return (w1a @ w1b) * (w2a @ w2b) * scale
    w1 = sd[f"{stem}.lokr_w1"].float()
    if f"{stem}.lokr_w2" in sd:
        w2, dim = sd[f"{stem}.lokr_w2"].float(), None
    else:
        w2, dim = sd[f"{stem}.lokr_w2_a"].float() @ sd[f"{stem}.lokr_w2_b"].float(), sd[f"{stem}.lokr_w2_b"].shape[0]
    scale = float(alpha) / dim if alpha is not None and dim is not None else 1.0
    return torch.kron(w1, w2) * scale


@pytest.mark.parametrize("kind,dim,args", [("loha", 2, None), ("lokr", 1, None), ("lokr", 8, ["factor=2"])])
def test_comfyui_resolves_every_key_and_computes_our_delta(kind, dim, args):
    dit, net = _net(kind, dim=dim, alpha=3.0, args=args)
    original = ToyArch().dit_state_dict_to_original(dit.state_dict())
    for layout in ("default", "other"):
        sd = convert_state_dict(net.state_dict_reference(), layout, NameIndex(targets=net.targets))
        suffixes = (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".lokr_w1", ".lokr_w2", ".lokr_w2_a",
                    ".lokr_w2_b")
        stems = {k.rsplit(".", 1)[0] for k in sd if k.endswith(suffixes)}
        as_lora = {f"{s}.lora_up.weight": torch.zeros(1) for s in stems} | {k: v for k, v in sd.items() if
                                                                             k.endswith(".alpha")}
        assert comfy_unconsumed_keys(as_lora, original) == [], layout  # every module name resolves
        assert set(sd) - {f"{s}.{k.split('.')[-1]}" for s in stems for k in sd if k.startswith(s + ".")} == set()
        for module in net.loras:
            stem = STEM.replace(STEM, module.lora_name) if layout == "default" else f"diffusion_model.{module.original_name}"
            assert torch.allclose(_comfy_delta(sd, stem), module.weights().delta(), rtol=1e-5, atol=1e-7), stem


@pytest.mark.parametrize("kind,dim,args", [("loha", 2, None), ("lokr", 1, None), ("lokr", 8, ["factor=2"])])
def test_merge_into_the_original_checkpoint_reproduces_the_live_forward(kind, dim, args):
    dit, net = _net(kind, dim=dim, alpha=3.0, args=args)
    original = ToyArch().dit_state_dict_to_original(dit.state_dict())
    sd = net.state_dict_reference()
    merged = merge_lora_into_original_state_dict(dict(original), sd, 0.6)
    key = f"{QKV}.weight"
    expected = original[key] + getattr(net, STEM).weights().scaled_delta(0.6)
    assert torch.allclose(merged[key], expected, rtol=1e-6, atol=1e-7)
    x = torch.randn(2, 5, DIM)
    live = forward_with_lora(dit, net, x, 0.6)
    fresh = ToyDiT(depth=2)
    fresh.load_state_dict(ToyArch().original_to_dit(merged))
    with torch.no_grad():
        assert torch.allclose(fresh(x), live, atol=1e-5)
    # the generate scripts' path: merged into the diffusers model from the file
    from musubi_tuner.inference.lora_merge import merge_loras_into_dit  # noqa: F401  (same network code below)

    rebuilt = lora.create_network_from_weights(ToyArch(), fresh, sd)
    assert type(rebuilt) is type(net)


def test_merge_is_exact_in_bf16():
    dit, net = _net("loha")
    base = {k: v.to(torch.bfloat16) for k, v in ToyArch().dit_state_dict_to_original(dit.state_dict()).items()}
    sd = net.state_dict_reference()
    merged = merge_lora_into_original_state_dict(dict(base), sd, 0.8)
    w = {k: sd[f"{STEM}.hada_{k}"] for k in ("w1_a", "w1_b", "w2_a", "w2_b")}
    delta = ((w["w1_a"] @ w["w1_b"]) * (w["w2_a"] @ w["w2_b"])) * (0.8 * float(sd[f"{STEM}.alpha"]) / 2)
    key = f"{QKV}.weight"
    assert torch.equal(merged[key], (base[key].float() + delta).to(torch.bfloat16))


def test_convert_keeps_alpha_and_refuses_diffusers(tmp_path):
    _, net = _net("loha")
    sd = net.state_dict_reference()
    other = convert_state_dict(sd, "other", NameIndex(targets=net.targets))
    assert torch.equal(other[f"diffusion_model.{QKV}.hada_w1_a"], sd[f"{STEM}.hada_w1_a"])
    assert float(other[f"diffusion_model.{QKV}.alpha"]) == 3.0
    back = convert_state_dict(other, "default", NameIndex(targets=net.targets))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(UserError, match="no diffusers layout"):
        convert_state_dict(sd, "diffusers", NameIndex(targets=net.targets))


def test_wrong_kind_or_shape_is_a_clear_error():
    dit, loha = _net("loha")
    plain = lora.create_network(ToyArch(), dit, 2, 1.0)
    with pytest.raises(CheckpointError, match="LoHa module.*this network is LoRA"):
        plain.load_weights(loha.state_dict_reference())
    _, bigger = _net("loha", dim=3)
    with pytest.raises(CheckpointError, match="shapes"):
        loha.load_weights(bigger.state_dict_reference())
    mixed = {**loha.state_dict_reference(), **{k.replace("blocks_1", "blocks_9"): v for k, v in
                                               plain.state_dict_reference().items()}}
    with pytest.raises(CheckpointError):
        lora.create_network_from_weights(ToyArch(), dit, mixed)


def test_include_exclude_patterns_and_loraplus_groups():
    _, net = _net("loha", args=["exclude_patterns=[r'.*img_mlp.*']", "loraplus_lr_ratio=4"])
    # a user's exclude_patterns replace the default-if-unset one (img_mod.lin), as for LoRA
    assert {m.original_name.split(".", 2)[2] for m in net.loras} == {"img_attn.proj", "img_attn.qkv", "img_mod.lin"}
    main, plus = net.prepare_optimizer_params(1e-3)
    assert plus["lr"] == 4e-3 and len(plus["params"]) == len(main["params"]) == 2 * len(net.loras)
    assert all(p.shape[0] == 2 for p in plus["params"][1::2])  # hada_w2_b rows = rank


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_max_norm_shrinks_the_delta_to_the_limit(kind):
    _, net = _net(kind, dim=2)
    module = getattr(net, STEM)
    before = module.weights().delta().norm().item()
    scaled, _, largest = net.apply_max_norm_regularization(before / 2, "cpu")
    assert scaled >= 1
    assert module.weights().delta().norm().item() == pytest.approx(before / 2, rel=1e-4)
    assert largest <= before / 2 * (1 + 1e-4)


def test_dropouts_only_while_training():
    dit, net = _net("loha", args=["rank_dropout=0.5", "module_dropout=0.5"])
    net.apply_to()
    x = torch.randn(1, 3, DIM)
    net.eval()
    a, b = dit(x), dit(x)
    assert torch.equal(a, b)
    net.train()
    outs = {tuple(dit(x).flatten()[:4].tolist()) for _ in range(8)}
    assert len(outs) > 1
    net.remove()
