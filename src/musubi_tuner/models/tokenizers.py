"""Tokenizers from local files only: a path the user passes, or an already-filled Hugging Face cache.

The reference downloads tokenizers from the Hub at run time; we never touch the network. When neither a
local path nor a cached copy exists, the error names the flag to pass.

`build_tiny_tokenizer` makes a small T5-like tokenizer (pad 0, eos 1, unk 2) for tests and the demo.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from musubi_tuner.errors import UserError
from musubi_tuner.utils.atomic import atomic_directory

TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "tokenizer.model")
"""Any one of these marks a folder as a tokenizer folder."""


def resolve_tokenizer(
    flag_name: str,
    local_path: str | os.PathLike | None,
    hub_repo_id: str,
    subfolder: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    as_written: bool = False,
) -> PreTrainedTokenizerBase:
    """Load a tokenizer from `local_path` (folder, or a file inside one), else from the HF cache, offline.

    flag_name: the CLI flag that sets `local_path` (with or without leading dashes), used in errors.
    hub_repo_id / subfolder: where the reference would download it from, e.g. `Wan-AI/Wan2.1-T2V-14B`,
    subfolder `google/umt5-xxl`; only the local cache is looked at (`local_files_only=True`).
    cache_dir: HF hub cache to search (default: the usual `HF_HUB_CACHE`).
    as_written: load `tokenizer.json` exactly as the file says (`PreTrainedTokenizerFast`), whatever class
    tokenizer_config.json names. LLaMA-3: transformers 5's `LlamaTokenizerFast` rebuilds the pre-tokenizer
    and mis-tokenizes most strings.
    """
    flag = "--" + flag_name.lstrip("-")
    if local_path is not None:
        return _load_local(flag, Path(local_path), as_written)
    cached = _cached_folder(hub_repo_id, subfolder, cache_dir)
    if cached is None:
        where = hub_repo_id + (f" (subfolder {subfolder})" if subfolder else "")
        include = f" --include '{subfolder}/*'" if subfolder else ""
        raise UserError(
            f"no tokenizer for {where}: pass {flag} /path/to/tokenizer_dir (a folder with tokenizer.json or "
            f"spiece.model, e.g. downloaded with `huggingface-cli download {hub_repo_id}{include}`); "
            "nothing is downloaded at run time"
        )
    return _load_local(flag, cached, as_written)


def _cached_folder(repo_id: str, subfolder: str | None, cache_dir: str | os.PathLike | None) -> Path | None:
    """The tokenizer folder inside an already-downloaded HF cache snapshot, or None (never downloads)."""
    from huggingface_hub import snapshot_download

    patterns = [f"{subfolder}/*"] if subfolder else None
    try:
        snapshot = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True, cache_dir=cache_dir)
    except OSError:  # LocalEntryNotFoundError: nothing cached for this repo
        return None
    folder = Path(snapshot) / (subfolder or "")
    return folder if any((folder / name).is_file() for name in TOKENIZER_FILES) else None


def _load_local(flag: str, path: Path, as_written: bool = False) -> PreTrainedTokenizerBase:
    if not path.exists():
        raise UserError(
            f"{flag} {path}: no such file or folder; pass a tokenizer folder (with tokenizer.json or spiece.model)"
        )
    folder = path if path.is_dir() else path.parent
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(
            f"{flag} {path}: not a tokenizer folder (none of {', '.join(TOKENIZER_FILES)} found in {folder})"
        )
    if as_written and not (folder / "tokenizer.json").is_file():
        raise UserError(f"{flag} {path}: this tokenizer needs its tokenizer.json (not found in {folder})")
    loader = PreTrainedTokenizerFast if as_written else AutoTokenizer
    try:
        tokenizer = loader.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any parse failure is the user's file; say which
        raise UserError(f"{flag} {path}: could not load the tokenizer: {type(err).__name__}: {err}") from err
    return _with_pad_token(tokenizer)


def _with_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    # A bare tokenizer.json has no special-token config; T5 conventions name the pad token <pad>.
    if tokenizer.pad_token is None and "<pad>" in tokenizer.get_vocab():
        tokenizer.pad_token = "<pad>"
    return tokenizer


# ---- tiny tokenizer for tests and the demo ----------------------------------------------------------

_TINY_CORPUS_WORDS = (
    "a an the and or but of to in on at by for with from into over under after before while "
    "cat dog bird fish horse cow sheep mouse rabbit fox bear lion tiger wolf deer duck goose owl "
    "red green blue yellow black white orange purple brown pink gray golden silver bright dark "
    "big small tall short long wide narrow round flat soft hard warm cold quiet loud fast slow "
    "run runs running walk walks walking jump jumps jumping sit sits sitting fly flies flying swim "
    "look looks looking turn turns turning smile smiles smiling wave waves waving dance dances "
    "man woman child girl boy person people friend family crowd dancer runner rider player "
    "city street road river lake sea ocean beach forest tree trees flower flowers grass field "
    "mountain hill sky cloud clouds sun moon star stars rain snow wind light shadow night day "
    "room house window door table chair car train boat bicycle camera video photo picture scene "
    "slowly quickly gently softly camera pans zooms tracks close up wide shot view style "
    "cinematic realistic detailed high quality sharp blurry smooth motion background foreground"
).split()


def tiny_corpus() -> list[str]:
    # Fixed sentences built from the word list: deterministic, so the tokenizer is too.
    words = _TINY_CORPUS_WORDS
    return [" ".join(words[i : i + 7]) for i in range(0, len(words), 3)] * 4


def build_tiny_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 256) -> Path:
    """Train a small BPE tokenizer on a built-in English word list and save it to `out_dir`.

    T5 conventions: `<pad>`=0, `</s>`=1 (appended to every sequence), `<unk>`=2, SentencePiece-style
    word boundaries (Metaspace). The folder loads with `AutoTokenizer.from_pretrained(out_dir)`.
    Returns `out_dir`.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False)
    tokenizer.train_from_iterator(tiny_corpus(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        wrapped.save_pretrained(str(tmp))
        portable_tokenizer_config(tmp / "tokenizer_config.json")
    return out_dir


def portable_tokenizer_config(path: Path) -> None:
    # transformers 5 writes "TokenizersBackend", a class transformers 4 lacks; the 4.x name loads in both.
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
