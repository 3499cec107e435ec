"""HunyuanVideo text encoders: LLaVA-LLaMA-3 and CLIP-L from the users' layouts, prompt encoding as the reference."""

import argparse

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from musubi_tuner.dataset.cache_files import read_cache, write_text_cache
from musubi_tuner.dataset.traits import DatasetTraits
from musubi_tuner.errors import CheckpointError, UserError
from musubi_tuner.memory.fp8 import Fp8StorageLinear
from musubi_tuner.models.clip_text import load_clip_l
from musubi_tuner.models.hunyuan_video.llm_files import infer_llama_config, llama_text_weights, load_llava_llama3
from musubi_tuner.models.hunyuan_video.prompt_template import VIDEO_TEMPLATE, apply_template, template_crop
from musubi_tuner.models.hunyuan_video.text_encoders import (
    HunyuanTextEncoders,
    add_text_encoder_arguments,
    encode_clip,
    encode_hunyuan_prompts,
    encode_llm,
    load_clip_tokenizer,
    load_hunyuan_text_encoders,
    load_llm_tokenizer,
)
from musubi_tuner.models.hunyuan_video.tiny_text import (
    TINY_LLM_CONFIG,
    tiny_hv_clip,
    tiny_llm,
    write_tiny_hunyuan_text_files,
)

PROMPTS = ["a red cat walks on the grass", "the dog"]
HV_TRAITS = DatasetTraits(cache_code="hv", architecture="hunyuan_video", frame_stride=4, target_fps=24.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tiny_hunyuan_text_files(tmp_path_factory.mktemp("hv_text"))


@pytest.fixture(scope="module")
def tokenizers(files):
    return load_llm_tokenizer(str(files["llm_tokenizer"])), load_clip_tokenizer(str(files["clip_tokenizer"]))


def _args(**kw):
    parser = argparse.ArgumentParser()
    add_text_encoder_arguments(parser)
    args = parser.parse_args([])
    vars(args).update(kw)
    return args


def test_real_size_llava_llama3_config_is_read_from_the_weights():
    real = LlamaConfig(vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    with torch.device("meta"):
        causal = LlamaForCausalLM(real)
    comfy = causal.state_dict()  # `model.*` + `lm_head.weight`, as llava_llama3_fp16.safetensors
    assert "lm_head.weight" in comfy and "model.embed_tokens.weight" in comfy
    llava = {"model.language_model." + k.removeprefix("model."): v for k, v in comfy.items() if k != "lm_head.weight"}
    comfy["tokenizer"] = torch.empty(16, dtype=torch.uint8, device="meta")  # some ComfyUI files carry one
    llava["model.vision_tower.vision_model.encoder.layers.8.layer_norm2.weight"] = torch.empty(1, device="meta")
    llava["model.multi_modal_projector.linear_1.weight"] = torch.empty(1, device="meta")
    text = llama_text_weights(comfy, "x")
    assert llama_text_weights(llava, "x").keys() == text.keys() == causal.model.state_dict().keys()
    got = infer_llama_config(text)
    expected = {"vocab_size": 128320, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 500000.0}
    assert {k: got[k] for k in expected} == expected


def test_tiny_config_is_read_back_exactly():
    assert infer_llama_config(tiny_llm().state_dict()) == TINY_LLM_CONFIG


def test_comfy_file_and_official_folder_give_the_source_models_embeddings(files, tokenizers):
    source = HunyuanTextEncoders(tiny_llm(), tokenizers[0], tiny_hv_clip(), tokenizers[1])
    expected = encode_hunyuan_prompts(source, PROMPTS)
    for te1, te2 in ((files["llm"], files["clip_l"]), (files["llm_folder"], files["clip_folder"])):
        # folders bring their own tokenizers; the single files take them from the flags
        flags = {} if te1.is_dir() else {"llm_tokenizer": str(files["llm_tokenizer"]),
                                         "clip_tokenizer": str(files["clip_tokenizer"])}
        encoders = load_hunyuan_text_encoders(_args(text_encoder1=str(te1), text_encoder2=str(te2),
                                                    text_encoder_dtype="float32", **flags), "cpu")
        got = encode_hunyuan_prompts(encoders, PROMPTS)
        for a, b in zip(got, expected):
            assert a.keys() == b.keys() == {"llm", "llm_mask", "clipL", "clipL_mask"}
            assert all(torch.equal(a[k], b[k]) for k in a), te1.name


def test_llm_output_is_the_third_last_hidden_state_after_the_template_crop(tokenizers):
    tok = tokenizers[0]
    llm = tiny_llm()
    embeds, mask = encode_llm(llm, tok, PROMPTS)
    crop = template_crop(tok, VIDEO_TEMPLATE)
    # by hand with transformers: template, crop + 256 tokens, right padding, hidden_states[-3], slice
    ids = tok([apply_template(VIDEO_TEMPLATE, p) for p in PROMPTS], max_length=crop + 256, padding="max_length",
              truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = llm(input_ids=ids.input_ids, attention_mask=ids.attention_mask, output_hidden_states=True)
    assert torch.equal(embeds, out.hidden_states[-3][:, crop:]) and torch.equal(mask, ids.attention_mask[:, crop:])
    # and independently: the model cut after its first layer (3 - 2 skipped), without the final norm
    cut = tiny_llm()
    cut.layers, cut.norm = cut.layers[:1], torch.nn.Identity()
    with torch.no_grad():
        direct = cut(input_ids=ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state
    assert torch.allclose(embeds, direct[:, crop:], atol=1e-6)
    # the crop ends exactly where the prompt starts; the mask covers the prompt and the closing <|eot_id|>
    prompt_ids = tok(PROMPTS[0] + "<|eot_id|>", add_special_tokens=False).input_ids
    assert ids.input_ids[0, crop : crop + len(prompt_ids)].tolist() == prompt_ids
    assert mask[0].tolist() == [1] * len(prompt_ids) + [0] * (256 - len(prompt_ids))
    assert embeds.shape == (2, 256, 32) and mask.dtype == torch.int64
    assert embeds[0, len(prompt_ids):].abs().sum() > 0  # padding positions are kept, as the reference stores them


def test_long_prompts_are_cut_to_256_tokens(tokenizers):
    embeds, mask = encode_llm(tiny_llm(), tokenizers[0], [" ".join(["red cat"] * 300)])
    assert embeds.shape == (1, 256, 32) and int(mask.sum()) == 256


def test_clip_pooled_output_is_read_at_the_first_end_of_text_token(tokenizers):
    clip_tok = tokenizers[1]
    clip = tiny_hv_clip()
    pooled, mask = encode_clip(clip, clip_tok, PROMPTS)
    ids = clip_tok(PROMPTS, max_length=77, padding="max_length", return_tensors="pt").input_ids
    assert clip_tok.pad_token_id == clip_tok.eos_token_id  # padding repeats EOS: the FIRST one must be used
    first_eos = int((ids[0] == clip_tok.eos_token_id).nonzero()[0])
    with torch.no_grad():
        hidden = clip(input_ids=ids).last_hidden_state
    assert torch.allclose(pooled[0], hidden[0, first_eos], atol=1e-6)
    assert mask.shape == (2, 77) and int(mask[0].sum()) == first_eos + 1


def test_cache_keys_and_shapes_are_the_references(files, tokenizers, tmp_path):
    encoders = HunyuanTextEncoders(tiny_llm().half(), tokenizers[0], tiny_hv_clip().half(), tokenizers[1])
    content = encode_hunyuan_prompts(encoders, PROMPTS[:1])[0]
    path = tmp_path / "clip_hv_te.safetensors"
    write_text_cache(path, PROMPTS[0], content, HV_TRAITS)
    with safe_open(str(path), framework="pt") as f:
        got = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
        meta = f.metadata()
    assert got == {"llm_float16": ((256, 32), "F16"), "llm_mask": ((256,), "I64"),
                   "clipL_float16": ((32,), "F16"), "clipL_mask": ((77,), "I64")}
    assert meta["architecture"] == "hunyuan_video" and meta["caption1"] == PROMPTS[0]
    batch, varlen = read_cache(path)
    assert set(batch) == {"llm", "llm_mask", "clipL", "clipL_mask"} and not varlen


def test_default_dtype_is_float16_and_the_models_are_frozen(files):
    llm = load_llava_llama3(files["llm"])
    clip = load_clip_l(files["clip_folder"], dtype=torch.float16)
    assert llm.embed_tokens.weight.dtype == torch.float16 and not llm.training
    assert not any(p.requires_grad for p in [*llm.parameters(), *clip.parameters()])
    assert llm.embed_tokens.weight.shape[0] == 1088 > len(load_llm_tokenizer(str(files["llm_tokenizer"])))


def test_fp8_llm_stores_linears_in_fp8_and_stays_close_to_bf16(files, tokenizers):
    llm8 = load_llava_llama3(files["llm"], dtype=torch.bfloat16, fp8=True)
    layer = llm8.layers[0]
    assert isinstance(layer.self_attn.q_proj, Fp8StorageLinear) and isinstance(layer.mlp.down_proj, Fp8StorageLinear)
    assert layer.self_attn.q_proj.weight.dtype == torch.float8_e4m3fn
    assert llm8.embed_tokens.weight.dtype == layer.input_layernorm.weight.dtype == torch.bfloat16
    got, _ = encode_llm(llm8, tokenizers[0], PROMPTS)
    ref, _ = encode_llm(load_llava_llama3(files["llm"], dtype=torch.bfloat16), tokenizers[0], PROMPTS)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    rel = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < 0.03, rel  # measured 0.0062 (bf16 alone vs fp32: 0.0025); e4m3 keeps 3 mantissa bits


def test_missing_tokenizers_name_their_flags_before_any_model_is_read(files, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    missing = str(tmp_path / "not_there.safetensors")  # never opened: the tokenizers fail first
    with pytest.raises(UserError, match="--llm_tokenizer"):
        load_hunyuan_text_encoders(_args(text_encoder1=missing, text_encoder2=missing), "cpu")
    with pytest.raises(UserError, match="--clip_tokenizer"):
        load_hunyuan_text_encoders(_args(text_encoder1=missing, text_encoder2=missing,
                                         llm_tokenizer=str(files["llm_tokenizer"])), "cpu")
    with pytest.raises(UserError, match="--text_encoder1 .*--text_encoder2"):
        load_hunyuan_text_encoders(_args(text_encoder1=missing), "cpu")


def test_diffusers_layout_finds_the_sibling_tokenizer_folders(files, tmp_path):
    import shutil

    for encoder, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        (tmp_path / encoder).mkdir()
        shutil.copy(files["llm"], tmp_path / encoder / "model.safetensors")
        src = files["llm_tokenizer"] if tokenizer == "tokenizer" else files["clip_tokenizer"]
        shutil.copytree(src, tmp_path / tokenizer)
    llm_tok = load_llm_tokenizer(None, str(tmp_path / "text_encoder"))
    clip_tok = load_clip_tokenizer(None, str(tmp_path / "text_encoder_2"))
    assert llm_tok("a cat").input_ids == load_llm_tokenizer(str(files["llm_tokenizer"]))("a cat").input_ids
    assert type(clip_tok).__name__ == "CLIPTokenizer"


def test_wrong_files_are_refused_naming_the_flag(files):
    with pytest.raises(CheckpointError, match="--text_encoder1 .*not a LLaMA text encoder"):
        load_llava_llama3(files["clip_l"])
    with pytest.raises(CheckpointError, match="--text_encoder2"):
        load_clip_l(files["llm"])
