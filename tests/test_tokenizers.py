"""models/tokenizers.py: local-only tokenizer resolution and the tiny T5-like tokenizer."""

import shutil

import pytest
from transformers import AutoTokenizer

from musubi_tuner.errors import UserError
from musubi_tuner.models.tokenizers import build_tiny_tokenizer, resolve_tokenizer

REPO, SUBFOLDER = "Wan-AI/Wan2.1-T2V-14B", "google/umt5-xxl"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "umt5")


def test_tiny_tokenizer_follows_t5_conventions(tiny_dir):
    tok = AutoTokenizer.from_pretrained(str(tiny_dir), local_files_only=True)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    enc = tok(["a red cat", "the dog runs slowly"], padding="max_length", max_length=12)
    for ids, mask in zip(enc.input_ids, enc.attention_mask):
        n = sum(mask)
        assert ids[n - 1] == 1 and all(i == 0 for i in ids[n:])  # eos last, then pad
        assert 2 not in ids[: n - 1]  # every corpus word is covered without <unk>
    assert 200 <= len(tok) <= 256


def test_tiny_tokenizer_is_deterministic(tiny_dir, tmp_path):
    again = build_tiny_tokenizer(tmp_path / "again")
    assert (again / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


def test_local_folder_or_a_file_inside_it(tiny_dir):
    from_dir = resolve_tokenizer("t5_tokenizer", tiny_dir, REPO, SUBFOLDER)
    from_file = resolve_tokenizer("t5_tokenizer", tiny_dir / "tokenizer.json", REPO, SUBFOLDER)
    assert from_dir("a cat").input_ids == from_file("a cat").input_ids


def test_bare_tokenizer_json_gets_pad_token(tiny_dir, tmp_path):
    shutil.copy(tiny_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    tok = resolve_tokenizer("t5_tokenizer", tmp_path, REPO, SUBFOLDER)
    assert tok.pad_token_id == 0


def test_missing_local_path_names_the_flag(tmp_path):
    with pytest.raises(UserError, match=r"--t5_tokenizer .*nope: no such file or folder"):
        resolve_tokenizer("t5_tokenizer", tmp_path / "nope", REPO, SUBFOLDER)


def test_folder_without_tokenizer_files_names_the_flag(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"--t5_tokenizer .*not a tokenizer folder"):
        resolve_tokenizer("--t5_tokenizer", tmp_path, REPO, SUBFOLDER)


def test_nothing_local_and_empty_cache_says_which_flag_to_pass(tmp_path):
    with pytest.raises(UserError) as info:
        resolve_tokenizer("t5_tokenizer", None, REPO, SUBFOLDER, cache_dir=tmp_path)
    message = str(info.value)
    assert "pass --t5_tokenizer /path/to/tokenizer_dir" in message
    assert f"huggingface-cli download {REPO}" in message and SUBFOLDER in message


def test_filled_hf_cache_is_used_offline(tiny_dir, tmp_path):
    # The hub cache layout: models--{org}--{name}/refs/main -> snapshots/{commit}/...
    repo_dir = tmp_path / "models--Wan-AI--Wan2.1-T2V-14B"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text("0123abcd")
    shutil.copytree(tiny_dir, repo_dir / "snapshots" / "0123abcd" / SUBFOLDER)
    tok = resolve_tokenizer("t5_tokenizer", None, REPO, SUBFOLDER, cache_dir=tmp_path)
    assert tok("a cat").input_ids == AutoTokenizer.from_pretrained(str(tiny_dir))("a cat").input_ids
