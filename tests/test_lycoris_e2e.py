"""LoHa through the Wan CLIs: train (loss goes down), load for generation, merge into the DiT file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_wan_e2e import _eval_loss
from wan_fixtures import make_cached_workspace, run

from musubi_tuner import merge_lora, wan_train_network


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_cached_workspace(tmp_path_factory.mktemp("wan_loha"))


def test_loha_trains_loads_and_merges(ws, tmp_path):
    toml = tmp_path / "clip.toml"
    text = ws.toml.read_text()
    toml.write_text(text[:text.index("[[datasets]]")] + text[text.index("[[datasets]]", text.index("[[datasets]]") + 1):])
    out = tmp_path / "out"
    args = ws.train_args(out, 40, "--network_module", "networks.loha", "--learning_rate", "5e-3",
                         "--network_dim", "4", "--network_alpha", "4")
    args[args.index("--dataset_config") + 1] = str(toml)
    assert run(wan_train_network.main, args) == 0
    lora_file = out / "lora.safetensors"
    sd = load_file(str(lora_file))
    assert "lora_unet_blocks_0_self_attn_q.hada_w1_a" in sd and "lora_unet_blocks_1_ffn_2.alpha" in sd
    cache_dir = ws.root / "data" / "cache_vid"
    before, after = _eval_loss(ws.dit, None, cache_dir), _eval_loss(ws.dit, lora_file, cache_dir)
    assert after < 0.8 * before, (before, after)

    merged = tmp_path / "merged.safetensors"
    assert run(merge_lora.main, ["--dit", str(ws.dit), "--lora_weight", str(lora_file), "--lora_multiplier", "0.5",
                                 "--save_merged_model", str(merged)]) == 0
    base, result = load_file(str(ws.dit)), load_file(str(merged))
    key = next(k for k in base if k.endswith("blocks.0.self_attn.q.weight"))
    stem = "lora_unet_blocks_0_self_attn_q"
    w = {k: sd[f"{stem}.hada_{k}"].float() for k in ("w1_a", "w1_b", "w2_a", "w2_b")}
    delta = (w["w1_a"] @ w["w1_b"]) * (w["w2_a"] @ w["w2_b"]) * (0.5 * float(sd[f"{stem}.alpha"]) / 4)
    assert torch.equal(result[key], (base[key].float() + delta).to(base[key].dtype))
