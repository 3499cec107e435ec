"""FLUX text encoders from ComfyUI-layout files, prompt encoding as the reference does it."""

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from musubi_tuner.architectures.flux_kontext.text_encoder_files import (
    encode_prompts_flux,
    infer_t5_config,
    load_t5xxl,
)
from musubi_tuner.architectures.flux_kontext.tiny import (
    TINY_CLIP_CONFIG,
    TINY_T5_CONFIG,
    tiny_clip,
    tiny_t5,
    write_tiny_flux_kontext_files,
)
from musubi_tuner.errors import CheckpointError
from musubi_tuner.memory.fp8 import Fp8StorageLinear
from musubi_tuner.models.clip_text import infer_clip_config, load_clip_l
from musubi_tuner.models.tokenizers import resolve_tokenizer

PROMPTS = ["a red cat", "make the sky blue with a small bird in the background"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tiny_flux_kontext_files(tmp_path_factory.mktemp("fk"))


@pytest.fixture(scope="module")
def tokenizers(files):
    return (
        resolve_tokenizer("t5_tokenizer", files["t5_tokenizer"], "google/t5-v1_1-xxl"),
        resolve_tokenizer("clip_tokenizer", files["clip_tokenizer"], "openai/clip-vit-large-patch14"),
    )


def test_real_t5xxl_and_clip_l_configs_are_inferred_from_shapes():
    t5_real = {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "vocab_size": 32128}
    with torch.device("meta"):
        t5 = T5EncoderModel(
            T5Config(**t5_real, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
        )
        clip = CLIPTextModel(
            CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        )
    t5_sd = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}  # ComfyUI layout
    got = infer_t5_config(t5_sd)
    assert {k: got[k] for k in t5_real} == t5_real
    clip_cfg = infer_clip_config(clip.state_dict())
    assert (clip_cfg["hidden_size"], clip_cfg["num_hidden_layers"], clip_cfg["num_attention_heads"]) == (768, 12, 12)
    assert (clip_cfg["vocab_size"], clip_cfg["max_position_embeddings"], clip_cfg["eos_token_id"]) == (49408, 77, 49407)
    assert clip_cfg["hidden_act"] == "quick_gelu"


def test_tiny_configs_are_inferred(files):
    assert infer_t5_config(tiny_t5().state_dict()) == TINY_T5_CONFIG
    assert infer_clip_config(tiny_clip().state_dict()) == TINY_CLIP_CONFIG


def test_loaded_encoders_give_the_source_outputs(files, tokenizers):
    t5 = load_t5xxl(files["t5"], dtype=torch.float32)
    clip = load_clip_l(files["clip_l"], dtype=torch.float32)
    assert t5.shared.weight is t5.encoder.embed_tokens.weight  # tied again after loading
    assert not any(p.requires_grad for p in list(t5.parameters()) + list(clip.parameters()))
    ours = encode_prompts_flux(t5, tokenizers[0], clip, tokenizers[1], PROMPTS)
    ref = encode_prompts_flux(tiny_t5(), tokenizers[0], tiny_clip(), tokenizers[1], PROMPTS)
    for a, b in zip(ours, ref):
        assert torch.equal(a["t5_vec"], b["t5_vec"]) and torch.equal(a["clip_l_pooler"], b["clip_l_pooler"])


def test_prompt_encoding_keeps_512_unmasked_t5_tokens_and_pools_clip_at_eos(tokenizers):
    t5_tok, clip_tok = tokenizers
    t5, clip = tiny_t5(), tiny_clip()
    out = encode_prompts_flux(t5, t5_tok, clip, clip_tok, PROMPTS)
    assert [tuple(o["t5_vec"].shape) for o in out] == [(512, 32)] * 2
    assert [tuple(o["clip_l_pooler"].shape) for o in out] == [(32,)] * 2
    # No attention mask: padding positions are encoded too and differ from the prompt's last token.
    ids = t5_tok([PROMPTS[0]], max_length=512, padding="max_length", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        full = t5(input_ids=ids).last_hidden_state[0]
    assert torch.equal(out[0]["t5_vec"], full)
    # CLIP pooled output = final hidden state at the first EOS token.
    clip_ids = clip_tok([PROMPTS[0]], max_length=77, padding="max_length", return_tensors="pt")["input_ids"]
    eos_at = int((clip_ids[0] == clip_tok.eos_token_id).nonzero()[0])
    assert eos_at == len(PROMPTS[0].split()) + 1
    with torch.no_grad():
        hidden = clip(input_ids=clip_ids).last_hidden_state[0]
    assert torch.equal(out[0]["clip_l_pooler"], hidden[eos_at])


def test_comfy_checkpoint_prefixes_are_stripped(tmp_path):
    t5_sd = {k: v for k, v in tiny_t5().state_dict().items() if k != "encoder.embed_tokens.weight"}
    sd = {"text_encoders.t5xxl.transformer." + k: v for k, v in t5_sd.items()}
    sd["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(32)
    path = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    assert load_t5xxl(path, dtype=torch.float32).config.d_model == 32


def test_fp8_t5_stores_linear_weights_in_fp8(files, tokenizers):
    t5 = load_t5xxl(files["t5"], dtype=torch.bfloat16, fp8=True)
    block = t5.encoder.block[0]
    assert block.layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn
    assert isinstance(block.layer[1].DenseReluDense.wi_0, Fp8StorageLinear)
    assert block.layer[1].DenseReluDense.wo.weight.dtype == torch.bfloat16
    assert t5.shared.weight.dtype == torch.bfloat16
    out = encode_prompts_flux(t5, tokenizers[0], tiny_clip(), tokenizers[1], PROMPTS[:1])
    ref = encode_prompts_flux(tiny_t5(), tokenizers[0], tiny_clip(), tokenizers[1], PROMPTS[:1])
    err = (out[0]["t5_vec"].float() - ref[0]["t5_vec"]).abs().max()
    assert torch.isfinite(out[0]["t5_vec"]).all() and err < 0.25


def test_wrong_files_are_refused(files):
    with pytest.raises(CheckpointError, match="--text_encoder1"):
        load_t5xxl(files["clip_l"])
    with pytest.raises(CheckpointError, match="--text_encoder2"):
        load_clip_l(files["t5"])
