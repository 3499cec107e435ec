"""HunyuanVideo tokenizers: the real LLaMA-3 BPE (Meta's ranks, when installed), the template crop, CLIP BPE."""

import importlib.util
import json
from pathlib import Path

import pytest
import regex

from musubi_tuner.errors import UserError
from musubi_tuner.models.hunyuan_video.prompt_template import (
    IMAGE_TEMPLATE,
    VIDEO_TEMPLATE,
    apply_template,
    template_crop,
)
from musubi_tuner.models.hunyuan_video.text_encoders import load_clip_tokenizer, load_llm_tokenizer
from musubi_tuner.models.hunyuan_video.tiny_text import (
    LLAMA3_SPLIT,
    build_tiny_clip_tokenizer,
    build_tiny_llm_tokenizer,
)

STRINGS = [
    "This is a test sentence.",
    "A cat walks on the grass, realistic style.",
    "  leading and trailing spaces  ",
    "numbers 12345 and 3.14159",
    "émigré café naïve",
    "日本語のテキストと中文",
    "line\nbreak\n\nthere\r\n",
    "don't you'll I'M they've",
    "tabs\tand  double  spaces",
    "emoji 🐱‍👤 ok",
    "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "CamelCaseWords and snake_case_words!!",
]
# Llama-3 (Meta-Llama-3-8B-Instruct, what LLaVA-LLaMA-3 builds on): 256 specials after the 128000 BPE ids.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"] + [
                   f"<|reserved_special_token_{i}|>" for i in range(5, 251)]


def _llama3_rank_file() -> Path | None:
    spec = importlib.util.find_spec("llama_models")  # located, not imported: only its data file is needed
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def real_llama3(tmp_path_factory):
    """(tiktoken Encoding with Meta's ranks, our loader's tokenizer from a folder built from the same ranks)."""
    tiktoken = pytest.importorskip("tiktoken", reason="the `test` extra installs tiktoken")
    ranks_file = _llama3_rank_file()
    if ranks_file is None:
        pytest.skip("Meta's LLaMA-3 ranks ship in the llama-models package (`test` extra); not installed")
    from tiktoken.load import load_tiktoken_bpe
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = {s: 128000 + i for i, s in enumerate(LLAMA3_SPECIALS)}
    encoding = tiktoken.Encoding("llama3", pat_str=LLAMA3_SPLIT, mergeable_ranks=load_tiktoken_bpe(str(ranks_file)),
                                 special_tokens=specials)
    tok = TikTokenConverter(vocab_file=str(ranks_file), pattern=LLAMA3_SPLIT,
                            extra_special_tokens=LLAMA3_SPECIALS).converted()
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 128000)])
    folder = tmp_path_factory.mktemp("llama3_tokenizer")
    tok.save(str(folder / "tokenizer.json"))
    # The class name that makes transformers 5 rebuild the pre-tokenizer: our loader must not use it.
    config = {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
              "pad_token": "<|end_of_text|>", "model_max_length": 8192}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return encoding, load_llm_tokenizer(str(folder))


def test_llm_tokenizer_matches_metas_llama3_bpe(real_llama3):
    encoding, tok = real_llama3
    assert tok("This is a test sentence.").input_ids == [128000, 2028, 374, 264, 1296, 11914, 13]  # Meta's own case
    for text in STRINGS:
        assert tok(text).input_ids == [128000, *encoding.encode(text, allowed_special="all")], text


def test_template_crops_are_95_and_36_with_the_real_tokenizer(real_llama3):
    tok = real_llama3[1]
    assert template_crop(tok, VIDEO_TEMPLATE) == 95  # the reference's hard-coded crops, BOS included
    assert template_crop(tok, IMAGE_TEMPLATE) == 36
    full = tok(apply_template(VIDEO_TEMPLATE, "A cat walks on the grass")).input_ids
    assert full[:95] == tok(VIDEO_TEMPLATE.split("{}")[0]).input_ids
    assert tok.decode(full[95:]) == "A cat walks on the grass<|eot_id|>"


@pytest.fixture(scope="module")
def tiny_llm_tokenizer(tmp_path_factory):
    return build_tiny_llm_tokenizer(tmp_path_factory.mktemp("tok") / "llm")


def test_tiny_llm_tokenizer_has_llama3_conventions(tiny_llm_tokenizer, tmp_path):
    tok = load_llm_tokenizer(str(tiny_llm_tokenizer))
    ids = tok(apply_template(VIDEO_TEMPLATE, "a red cat")).input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert ids[-1] == tok.convert_tokens_to_ids("<|eot_id|>")
    assert tok.decode(ids[template_crop(tok, VIDEO_TEMPLATE):]) == "a red cat<|eot_id|>"
    padded = tok(["a", "a red cat"], padding="longest").attention_mask
    assert padded[0][-1] == 0 and tok.padding_side == "right"
    again = build_tiny_llm_tokenizer(tmp_path / "again")
    assert (again / "tokenizer.json").read_bytes() == (tiny_llm_tokenizer / "tokenizer.json").read_bytes()


def test_llm_tokenizer_needs_tokenizer_json_and_a_pad_token(tiny_llm_tokenizer, tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(UserError, match="--llm_tokenizer .*needs its tokenizer.json"):
        load_llm_tokenizer(str(tmp_path))
    bare = tmp_path / "bare"
    bare.mkdir()
    raw = json.loads((tiny_llm_tokenizer / "tokenizer.json").read_text(encoding="utf-8"))
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] != "<pad>"]
    (bare / "tokenizer.json").write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(UserError, match="--llm_tokenizer: the tokenizer has no padding token"):
        load_llm_tokenizer(str(bare))


# ---- CLIP BPE ---------------------------------------------------------------------------------------
_CLIP_SPLIT = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)


def _clip_bpe_by_hand(folder: Path, text: str) -> list[int]:
    """OpenAI CLIP's SimpleTokenizer algorithm: lower-case, split, bytes -> symbols, merge by rank, `</w>` ends."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    ranks = {tuple(m.split()): i for i, m in enumerate(merges) if m}
    byte_symbol = bytes_to_unicode()
    ids = [vocab["<|startoftext|>"]]
    for piece in _CLIP_SPLIT.findall(" ".join(text.lower().split())):
        word = [byte_symbol[b] for b in piece.encode("utf-8")]
        word[-1] += "</w>"
        while len(word) > 1:
            pairs = [(ranks.get((a, b), 1e9), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
            rank, i = min(pairs)
            if rank == 1e9:
                break
            word = [*word[:i], word[i] + word[i + 1], *word[i + 2 :]]
        ids += [vocab[w] for w in word]
    return [*ids, vocab["<|endoftext|>"]]


def test_clip_tokenizer_follows_clips_bpe(tmp_path):
    folder = build_tiny_clip_tokenizer(tmp_path / "clip")
    tok = load_clip_tokenizer(str(folder))
    assert type(tok).__name__ == "CLIPTokenizer"
    for text in ["a red cat walks on the grass", "A Big DOG, running!", "sunset over the city 42",
                 "unknown words like zebra", "cats and dogs at the field", "  spaced   out  "]:
        assert tok(text).input_ids == _clip_bpe_by_hand(folder, text), text
    padded = tok(["a cat"], max_length=77, padding="max_length").input_ids[0]
    assert len(padded) == 77 and padded[-1] == tok.eos_token_id == len(tok) - 1
