"""Output locations, crash-safe state replacement and the clean-up of interrupted saves."""

import errno
import os

import pytest

from musubi_tuner.errors import UserError
from musubi_tuner.training import checkpoint_files as names
from musubi_tuner.training.cli import check_output_name
from musubi_tuner.utils import atomic
from musubi_tuner.utils.atomic import atomic_directory, backup_path, restore_interrupted_replacement
from musubi_tuner.utils.output_location import check_output_dir, check_output_file


def _state(folder, step):
    with atomic_directory(folder) as tmp:
        names.write_state_marker(tmp, {"global_step": step})


def test_a_kill_between_the_two_renames_leaves_the_old_state_findable(tmp_path, monkeypatch):
    target = tmp_path / "lora-state"
    _state(target, 4)
    real_replace = os.replace

    def killed_on_second_rename(src, dst):
        if str(dst) == str(target):  # the new folder moving in, after the old one was parked
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", killed_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        _state(target, 6)
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert not target.exists() and names.is_complete_state(backup_path(target))
    assert names.find_latest_complete_state(tmp_path, "lora") == backup_path(target)  # --resume auto sees it
    assert restore_interrupted_replacement(target)
    assert names.read_state_marker(target)["global_step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora-state"]


def test_parked_step_state_counts_for_resume_auto(tmp_path):
    _state(tmp_path / "lora-step00000002-state", 2)
    _state(tmp_path / "lora-step00000004-state", 4)
    os.replace(tmp_path / "lora-step00000004-state", tmp_path / ".lora-step00000004-state.old")
    assert names.find_latest_complete_state(tmp_path, "lora") == tmp_path / ".lora-step00000004-state.old"


def test_start_cleans_only_our_own_leftovers_and_restores_parked_states(tmp_path, caplog):
    (tmp_path / ".lora.safetensors.ab12cd_9.tmp").write_bytes(b"x" * 2048)
    half = tmp_path / ".lora-step00000004-state.k3j4h5g6.tmp"
    half.mkdir()
    (half / "optimizer.pt").write_bytes(b"y" * 4096)
    _state(tmp_path / ".lora-state.old", 8)  # parked, its folder gone: restored
    _state(tmp_path / "lora-step00000002-state", 2)
    _state(tmp_path / ".lora-step00000002-state.old", 1)  # parked but replaced: stale
    keep = [".other.safetensors.ab12cd_9.tmp", "notes.tmp", ".lora.safetensors.tmp", "lora.safetensors",
            ".lora2-state.old"]
    for name in keep:
        (tmp_path / name).write_bytes(b"z")
    with caplog.at_level("INFO"):
        names.clean_interrupted_saves(tmp_path, "lora")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + ["lora-state", "lora-step00000002-state"])
    assert names.read_state_marker(tmp_path / "lora-state")["global_step"] == 8
    assert names.read_state_marker(tmp_path / "lora-step00000002-state")["global_step"] == 2
    assert "3 leftover(s)" in caplog.text and ".lora.safetensors.ab12cd_9.tmp" in caplog.text
    assert "restored" in caplog.text


def test_output_dir_that_is_a_file_names_the_flag(tmp_path):
    path = tmp_path / "out"
    path.write_text("")
    with pytest.raises(UserError, match=r"^--output_dir .*out: this is a file"):
        check_output_dir(path, "--output_dir")
    with pytest.raises(UserError, match=r"^--save_merged_model .*: this is a file"):
        check_output_file(path / "merged.safetensors", "--save_merged_model")


def test_full_disk_is_reported_before_anything_runs(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("musubi_tuner.utils.output_location.os.write", full)
    with pytest.raises(UserError, match="--save_path .*no space left on device"):
        check_output_dir(tmp_path / "new" / "folder", "--save_path")
    assert list((tmp_path / "new" / "folder").iterdir()) == []  # the probe is gone


def test_output_file_checks_create_the_folder_and_refuse_a_folder(tmp_path):
    assert check_output_file(tmp_path / "a" / "m.safetensors", "--save_merged_model").parent.is_dir()
    with pytest.raises(UserError, match="--save_merged_model .*is a folder"):
        check_output_file(tmp_path / "a", "--save_merged_model")


@pytest.mark.parametrize("name", ["", "  ", "a/b", "a\\b", "..", "."])
def test_output_name_with_folders_or_empty_is_refused(name):
    with pytest.raises(UserError, match="--output_name"):
        check_output_name(name)
    check_output_name("my_lora-v2.1")
