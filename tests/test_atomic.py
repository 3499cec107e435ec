"""A crash or Ctrl-C during a save never leaves a truncated file or half a state folder."""

import pytest
import torch
from safetensors.torch import load_file

from musubi_tuner.utils.atomic import atomic_directory, save_safetensors_atomic


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "lora.safetensors"
    save_safetensors_atomic({"a": torch.ones(3)}, path)

    def interrupted(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_safetensors_atomic({"a": torch.zeros(3)}, path)
    assert torch.equal(load_file(str(path))["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]  # no temp file left behind


def test_interrupted_state_folder_keeps_the_previous_one(tmp_path):
    target = tmp_path / "x-state"
    with atomic_directory(target) as tmp:
        (tmp / "marker").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target) as tmp:
            (tmp / "marker").write_text("new")
            raise KeyboardInterrupt
    assert (target / "marker").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-state"]


def test_replaced_state_folder_is_complete(tmp_path):
    target = tmp_path / "x-state"
    for text in ("one", "two"):
        with atomic_directory(target) as tmp:
            (tmp / "marker").write_text(text)
    assert (target / "marker").read_text() == "two"
