"""Tiny HunyuanVideo text encoders for tests and the demo: the real classes at toy sizes, seeded, saved in
the layouts users have, with tokenizers built locally in the real formats.

- LLM: `LlamaModel`, hidden 32, 3 layers (so that `hidden_states[-3]` is a layer's output, not the
  embeddings), 2 heads of 16, 1 KV head (grouped like LLaMA-3's 32/8); 1088 embedding rows for a tokenizer
  of fewer ids, as the real checkpoint (128320 rows, 128259 ids). Its tokenizer is a byte-level BPE with
  LLaMA-3's split rule and special tokens, so the template and its crop work as with the real one.
- CLIP: `CLIPTextModel`, hidden 32, 2 layers; its tokenizer is a CLIP BPE (`vocab.json` + `merges.txt`,
  lower-cased, `</w>` word ends, start/end-of-text last) that `CLIPTokenizer` loads.
Widths: LLM hidden 32 = the tiny DiT's text_embed_dim; CLIP hidden 32 = its pooled_projection_dim.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from musubi_tuner.models.hunyuan_video.prompt_template import IMAGE_TEMPLATE, VIDEO_TEMPLATE
from musubi_tuner.utils.atomic import atomic_directory, save_safetensors_atomic

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
"""LLaMA-3's pre-tokenizer pattern (Meta's `tokenizer.py`)."""
TINY_LLM_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                     "<|eot_id|>", "<pad>")
TINY_LLM_BPE_SIZE = 1000
TINY_LLM_ROWS = 1088
TINY_LLM_CONFIG = {
    "vocab_size": TINY_LLM_ROWS, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "attention_bias": False,
    "mlp_bias": False, "tie_word_embeddings": False, "use_cache": False, "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "hidden_act": "silu",
}  # fmt: skip
"""Exactly what `llm_files.infer_llama_config` reads back from the tiny weights."""

_CLIP_WORDS = (
    "a an the of and with on in to at is are cat cats dog dogs bird red green blue white black small big "
    "walks runs running sits flying grass field street city sky sunset camera slowly video photo style"
).split()
_CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def tiny_llm(seed: int = 0):
    """A seeded tiny `LlamaModel` (see module doc)."""
    from transformers import LlamaConfig, LlamaModel

    return _seeded(seed, lambda: LlamaModel(LlamaConfig(**TINY_LLM_CONFIG)))


def tiny_clip_config(vocab_size: int) -> dict:
    """`CLIPTextConfig` kwargs of the tiny CLIP for a tokenizer of `vocab_size` ids (EOS = the last id)."""
    return {
        "vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        "projection_dim": 32, "bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1, "pad_token_id": 1,
    }  # fmt: skip


def tiny_hv_clip(seed: int = 0):
    """A seeded tiny `CLIPTextModel` sized for the tiny CLIP-BPE tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = tiny_clip_config(tiny_clip_vocab_size())
    return _seeded(seed, lambda: CLIPTextModel(CLIPTextConfig(**config)))


# ---- tokenizers -------------------------------------------------------------------------------------
def build_tiny_llm_tokenizer(out_dir: str | os.PathLike) -> Path:
    """Byte-level BPE with LLaMA-3's split rule, trained on a fixed corpus (deterministic); BOS added in front;
    specials after the BPE ids, as in LLaMA-3. Loads with `PreTrainedTokenizerFast.from_pretrained`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from musubi_tuner.models.tokenizers import portable_tokenizer_config, tiny_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_LLM_BPE_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    templates = [t.replace("{}", "") for t in (VIDEO_TEMPLATE, IMAGE_TEMPLATE)]
    tok.train_from_iterator(tiny_corpus() + templates, trainer)
    tok.add_special_tokens(list(TINY_LLM_SPECIALS))
    bos = TINY_LLM_SPECIALS[0]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    if tok.get_vocab_size() > TINY_LLM_ROWS:
        raise AssertionError(f"tiny LLM tokenizer has {tok.get_vocab_size()} ids > {TINY_LLM_ROWS} embedding rows")
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>", pad_token="<pad>",
                                      model_max_length=8192)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        wrapped.save_pretrained(str(tmp))
        portable_tokenizer_config(tmp / "tokenizer_config.json")
    return out_dir


def _clip_bpe_vocab() -> tuple[dict[str, int], list[str]]:
    """CLIP's layout: the 256 byte symbols, the same with `</w>`, one merge chain per word, then the specials."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in _CLIP_WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merge, joined = f"{pieces[0]} {pieces[1]}", pieces[0] + pieces[1]
            if merge not in merges:
                merges.append(merge)
                tokens.append(joined)
            pieces = [joined, *pieces[2:]]
    vocab = {t: i for i, t in enumerate(dict.fromkeys([*tokens, *_CLIP_SPECIALS]))}
    return vocab, merges


def build_tiny_clip_tokenizer(out_dir: str | os.PathLike) -> Path:
    """A CLIP BPE tokenizer in the openai folder format (`vocab.json`, `merges.txt`, `CLIPTokenizer`)."""
    vocab, merges = _clip_bpe_vocab()
    bos, eos = _CLIP_SPECIALS
    config = {"tokenizer_class": "CLIPTokenizer", "bos_token": bos, "eos_token": eos, "pad_token": eos,
              "unk_token": eos, "model_max_length": 77, "do_lower_case": True}
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out_dir


def tiny_clip_vocab_size() -> int:
    return len(_clip_bpe_vocab()[0])


# ---- files in the users' layouts ----------------------------------------------------------------------
def _causal_lm_state_dict(llm) -> dict[str, torch.Tensor]:
    """`LlamaForCausalLM` keys, as ComfyUI's llava_llama3_fp16.safetensors and the official folder hold them."""
    sd = {"model." + k: v.contiguous() for k, v in llm.state_dict().items()}
    sd["lm_head.weight"] = torch.zeros_like(llm.embed_tokens.weight)
    return sd


def _clip_state_dict(clip) -> dict[str, torch.Tensor]:
    sd = {"text_model." + k: v for k, v in clip.state_dict().items()}
    sd["text_projection.weight"] = torch.zeros(clip.config.projection_dim, clip.config.hidden_size)
    return sd


def _copy_files(src: Path, dst: Path) -> None:
    for file in src.iterdir():
        shutil.copy(file, dst / file.name)


def _write_llm_folder(folder: Path, llm, tokenizer_dir: Path) -> None:
    """Official `text_encoder` layout: LlamaForCausalLM config.json, two safetensors shards + index, tokenizer."""
    sd = _causal_lm_state_dict(llm)
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    config = {**llm.config.to_dict(), "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    with atomic_directory(folder) as tmp:
        for shard, keys in shards.items():
            save_safetensors_atomic({k: sd[k] for k in keys}, tmp / shard)
        index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str), encoding="utf-8")
        _copy_files(tokenizer_dir, tmp)


def _write_clip_folder(folder: Path, clip, tokenizer_dir: Path) -> None:
    """`text_encoder_2` as openai/clip-vit-large-patch14: a CLIPModel config (text part nested), its weights
    (with a stand-in vision entry that must be ignored) and the tokenizer files."""
    sd = _clip_state_dict(clip)
    sd["vision_model.embeddings.class_embedding"] = torch.zeros(8)
    sd["logit_scale"] = torch.tensor(2.6592)
    config = {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": 32,
              "text_config": clip.config.to_dict()}
    with atomic_directory(folder) as tmp:
        save_safetensors_atomic(sd, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str), encoding="utf-8")
        _copy_files(tokenizer_dir, tmp)


def write_tiny_hunyuan_text_files(out_dir: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Write the tiny encoders in every layout users have; returns their paths.

    llm: ComfyUI `llava_llama3_fp16.safetensors` layout; llm_folder: the official `text_encoder` folder
    (shards, config.json, tokenizer inside); llm_tokenizer: the tokenizer folder alone. clip_l: ComfyUI
    `clip_l.safetensors`; clip_folder: `text_encoder_2` (a CLIPModel folder with its tokenizer);
    clip_tokenizer. Same `seed` -> same weights as `tiny_llm(seed)` / `tiny_hv_clip(seed)`.
    """
    out = Path(out_dir)
    paths = {
        "llm": out / "llava_llama3_tiny.safetensors",
        "llm_folder": out / "text_encoder",
        "llm_tokenizer": out / "llm_tokenizer",
        "clip_l": out / "clip_l_tiny.safetensors",
        "clip_folder": out / "text_encoder_2",
        "clip_tokenizer": out / "clip_tokenizer",
    }
    build_tiny_llm_tokenizer(paths["llm_tokenizer"])
    build_tiny_clip_tokenizer(paths["clip_tokenizer"])
    llm, clip = tiny_llm(seed), tiny_hv_clip(seed)
    save_safetensors_atomic(_causal_lm_state_dict(llm), paths["llm"])
    save_safetensors_atomic(_clip_state_dict(clip), paths["clip_l"])
    _write_llm_folder(paths["llm_folder"], llm, paths["llm_tokenizer"])
    _write_clip_folder(paths["clip_folder"], clip, paths["clip_tokenizer"])
    return paths
