"""Wan umT5 files -> transformers UMT5EncoderModel: layouts, config inference, encoding, fp8, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoTokenizer

from musubi_tuner.architectures.wan.text_encoder_files import (
    encode_prompts_umt5,
    load_umt5,
    official_to_umt5,
    to_umt5_layout,
    umt5_config_from_state_dict,
    umt5_to_official,
)
from musubi_tuner.architectures.wan.tiny_encoders import build_tiny_umt5, write_tiny_wan_encoder_files
from musubi_tuner.errors import CheckpointError

PROMPTS = ["a red cat sits on the mat", "the dog runs  slowly\n in the  rain", "sky"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tiny_wan_encoder_files(tmp_path_factory.mktemp("wan_enc"))


@pytest.fixture(scope="module")
def tokenizer(files):
    return AutoTokenizer.from_pretrained(str(files["tokenizer"]), local_files_only=True)


@pytest.fixture(scope="module")
def source(tokenizer):
    return build_tiny_umt5(len(tokenizer))  # what write_tiny_wan_encoder_files saved


def test_official_file_has_the_wan_key_names(files):
    sd = torch.load(files["t5"], weights_only=True)
    block0 = sorted(k.removeprefix("blocks.0.") for k in sd if k.startswith("blocks.0."))
    assert block0 == [
        "attn.k.weight", "attn.o.weight", "attn.q.weight", "attn.v.weight",
        "ffn.fc1.weight", "ffn.fc2.weight", "ffn.gate.0.weight",
        "norm1.weight", "norm2.weight", "pos_embedding.embedding.weight",
    ]  # fmt: skip
    assert {k for k in sd if not k.startswith("blocks.")} == {"token_embedding.weight", "norm.weight"}


def test_official_pth_loads_to_identical_outputs(files, tokenizer, source):
    model = load_umt5(files["t5"], "cpu", torch.float32)
    assert model.encoder.embed_tokens.weight is model.shared.weight
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    ours, ref = encode_prompts_umt5(model, tokenizer, PROMPTS), encode_prompts_umt5(source, tokenizer, PROMPTS)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_hf_layout_safetensors_loads_to_identical_outputs(tmp_path, tokenizer, source):
    sd = {k: v.clone() for k, v in source.state_dict().items() if k != "encoder.embed_tokens.weight"}
    sd["decoder.final_layer_norm.weight"] = torch.ones(32)  # full-T5 files carry a decoder: ignored
    save_file(sd, tmp_path / "umt5_xxl_tiny.safetensors")
    model = load_umt5(tmp_path / "umt5_xxl_tiny.safetensors", "cpu", torch.float32)
    for a, b in zip(encode_prompts_umt5(model, tokenizer, PROMPTS), encode_prompts_umt5(source, tokenizer, PROMPTS)):
        assert torch.equal(a, b)


def _reference_official_forward(sd, ids, mask, heads, buckets=32, max_dist=128):
    """Wan's umT5 encoder written from its description, on the official keys (independent of transformers)."""

    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def bucket(rel):  # bidirectional: half the buckets per sign, exact below max_exact, log-spaced above
        half = buckets // 2
        out = (rel > 0).long() * half
        rel = rel.abs()
        exact = half // 2
        log_pos = torch.log(rel.float().clamp(min=1) / exact) / math.log(max_dist / exact)
        large = exact + (log_pos * (half - exact)).long()
        return out + torch.where(rel < exact, rel, large.clamp(max=half - 1))

    n = ids.shape[1]
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    x = sd["token_embedding.weight"][ids]
    layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(layers):
        p = lambda name: sd[f"blocks.{i}.{name}"]  # noqa: E731
        h = rms(x, p("norm1.weight"))
        q, k, v = (F.linear(h, p(f"attn.{c}.weight")).unflatten(-1, (heads, -1)).transpose(1, 2) for c in "qkv")
        bias = p("pos_embedding.embedding.weight")[bucket(rel)].permute(2, 0, 1)  # (heads, n, n)
        scores = q @ k.transpose(-1, -2) + bias + (mask[:, None, None, :] == 0) * torch.finfo(x.dtype).min
        att = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
        x = x + F.linear(att, p("attn.o.weight"))
        h = rms(x, p("norm2.weight"))
        gate = F.gelu(F.linear(h, p("ffn.gate.0.weight")), approximate="tanh")
        x = x + F.linear(F.linear(h, p("ffn.fc1.weight")) * gate, p("ffn.fc2.weight"))
    return rms(x, sd["norm.weight"])


def test_loaded_model_matches_wan_semantics_of_the_official_keys(files, tokenizer):
    sd = torch.load(files["t5"], weights_only=True)
    model = load_umt5(files["t5"], "cpu", torch.float32)
    enc = tokenizer(PROMPTS, padding="max_length", max_length=24, return_tensors="pt")
    expected = _reference_official_forward(sd, enc.input_ids, enc.attention_mask, heads=2)
    actual = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    real = enc.attention_mask.bool()
    torch.testing.assert_close(actual[real], expected[real], rtol=1e-5, atol=1e-5)


def test_outputs_are_trimmed_to_token_count_and_prompts_cleaned(files, tokenizer, source):
    out = encode_prompts_umt5(source, tokenizer, PROMPTS)
    lengths = [len(tokenizer(" ".join(p.split())).input_ids) for p in PROMPTS]
    assert [o.shape for o in out] == [torch.Size([n, 32]) for n in lengths]
    messy = encode_prompts_umt5(source, tokenizer, ["  the dog runs slowly in the rain &amp;amp; "])[0]
    clean = encode_prompts_umt5(source, tokenizer, ["the dog runs slowly in the rain &"])[0]
    assert torch.equal(messy, clean)
    truncated = encode_prompts_umt5(source, tokenizer, [" ".join(["cat"] * 50)], max_length=8)[0]
    assert truncated.shape == (8, 32)


def test_config_inferred_for_the_real_umt5_xxl():
    shapes = {"token_embedding.weight": (256384, 4096), "norm.weight": (4096,)}
    for i in range(24):
        shapes |= {
            f"blocks.{i}.norm1.weight": (4096,), f"blocks.{i}.norm2.weight": (4096,),
            f"blocks.{i}.pos_embedding.embedding.weight": (32, 64),
            f"blocks.{i}.ffn.gate.0.weight": (10240, 4096), f"blocks.{i}.ffn.fc1.weight": (10240, 4096),
            f"blocks.{i}.ffn.fc2.weight": (4096, 10240),
        } | {f"blocks.{i}.attn.{c}.weight": (4096, 4096) for c in "qkvo"}  # fmt: skip
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    config = umt5_config_from_state_dict(to_umt5_layout(sd, "models_t5_umt5-xxl-enc-bf16.pth"))
    got = (config.vocab_size, config.d_model, config.num_layers, config.num_heads, config.d_kv, config.d_ff)
    assert got == (256384, 4096, 24, 64, 64, 10240)
    assert (config.relative_attention_num_buckets, config.relative_attention_max_distance) == (32, 128)
    assert (config.dense_act_fn, config.is_gated_act) == ("gelu_new", True)
    assert umt5_to_official(official_to_umt5(sd)).keys() == sd.keys()


def test_fp8_t5_stores_linears_in_fp8_and_matches_dequantised_model(files, tokenizer):
    model = load_umt5(files["t5"], "cpu", torch.float32, fp8=True)
    fp8 = {n for n, p in model.named_parameters() if p.dtype == torch.float8_e4m3fn}
    cast_kinds = ("q.weight", "k.weight", "v.weight", "o.weight", "wi_0.weight", "wi_1.weight")
    assert fp8 and all(n.endswith(cast_kinds) for n in fp8)
    assert len(fp8) == 2 * 6  # 2 layers x (q, k, v, o, wi_0, wi_1); wo, embeddings, norms, rel-bias stay fp32
    assert model.shared.weight.dtype == torch.float32
    reference = load_umt5(files["t5"], "cpu", torch.float32)
    reference.load_state_dict(model.state_dict())  # fp8 values upcast to fp32
    for a, b in zip(encode_prompts_umt5(model, tokenizer, PROMPTS), encode_prompts_umt5(reference, tokenizer, PROMPTS)):
        assert torch.equal(a, b)


def test_fp8_t5_runs_in_bf16_on_cpu(files, tokenizer):
    model = load_umt5(files["t5"], "cpu", torch.bfloat16, fp8=True)
    out = encode_prompts_umt5(model, tokenizer, PROMPTS[:1])[0]
    full = encode_prompts_umt5(load_umt5(files["t5"], "cpu", torch.float32), tokenizer, PROMPTS[:1])[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - full).abs().max() < 0.25 * full.abs().max()


def test_a_dit_passed_as_t5_is_rejected_naming_the_expected_file(tmp_path):
    save_file({"patch_embedding.weight": torch.zeros(4, 16, 1, 2, 2), "blocks.0.self_attn.q.weight": torch.zeros(4, 4)},
              tmp_path / "wan2.1_t2v_1.3B_bf16.safetensors")  # fmt: skip
    expected = r"--t5 .*not a umT5 text encoder \(this looks like a Wan DiT.*models_t5_umt5-xxl-enc-bf16\.pth"
    with pytest.raises(CheckpointError, match=expected):
        load_umt5(tmp_path / "wan2.1_t2v_1.3B_bf16.safetensors", "cpu", torch.float32)


def test_missing_file_and_fp8_scaled_file_are_rejected(tmp_path):
    with pytest.raises(CheckpointError, match=r"--t5 .*file not found"):
        load_umt5(tmp_path / "missing.pth", "cpu", torch.float32)
    scaled = {"scaled_fp8": torch.zeros(1), "encoder.final_layer_norm.weight": torch.ones(2)}
    save_file(scaled, tmp_path / "s.safetensors")
    with pytest.raises(CheckpointError, match="fp8-scaled"):
        load_umt5(tmp_path / "s.safetensors", "cpu", torch.float32)
