"""Checkpoint/state names, pruning as the reference prunes, complete-state markers."""

from types import SimpleNamespace

import pytest

from musubi_tuner.errors import UserError
from musubi_tuner.training import checkpoint_files as C


def test_names():
    assert C.epoch_ckpt_name("lora", 3) == "lora-000003.safetensors"
    assert C.step_ckpt_name("lora", 500) == "lora-step00000500.safetensors"
    assert C.last_ckpt_name("lora") == "lora.safetensors"
    assert C.epoch_state_name("lora", 3) == "lora-000003-state"
    assert C.step_state_name("lora", 500) == "lora-step00000500-state"
    assert C.last_state_name("lora") == "lora-state"
    assert C.name_for("step_state", "a-b", 7) == "a-b-step00000007-state"


def touch(path, is_dir=False):
    if is_dir:
        path.mkdir(parents=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def _reference_remaining(kind, every, keep, last):
    """The reference's rule: after each save remove exactly one computed number."""
    present = set()
    for n in range(every, last + 1, every):
        present.add(n)
        if kind == "epoch":
            present.discard(n - every * keep)
        else:
            r = n - keep - 1
            present.discard(r - r % every)
    return sorted(present)


@pytest.mark.parametrize("kind,every,keep,last", [("epoch", 1, 2, 7), ("epoch", 2, 3, 14), ("step", 10, 30, 90), ("step", 25, 60, 300), ("step", 10, 0, 50)])
def test_pruning_over_a_run_matches_reference(tmp_path, kind, every, keep, last):
    is_dir = False
    for n in range(every, last + 1, every):
        touch(tmp_path / C.name_for(kind, "lora", n), is_dir)
        for path in C.files_to_prune(tmp_path, "lora", kind, keep, n):
            path.unlink()
    left = sorted(C.list_saves(tmp_path, "lora", kind))
    assert left == _reference_remaining(kind, every, keep, last)


def test_step_window_example_from_reference_docs(tmp_path):
    for step in (10, 20, 30, 40, 50):
        touch(tmp_path / C.step_ckpt_name("m", step))
    assert [p.name for p in C.files_to_prune(tmp_path, "m", "step", 30, 50)] == ["m-step00000010.safetensors"]


def test_state_pruning_and_unrelated_entries(tmp_path):
    for epoch in range(1, 6):
        touch(tmp_path / C.epoch_state_name("m", epoch), is_dir=True)
        touch(tmp_path / C.epoch_ckpt_name("m", epoch))
    touch(tmp_path / C.epoch_state_name("m", 9), is_dir=True)  # newer than current: kept
    touch(tmp_path / "m2-000001.safetensors")
    touch(tmp_path / "other-000001-state", is_dir=True)
    stale = C.files_to_prune(tmp_path, "m", "epoch_state", 2, 5)
    assert [p.name for p in stale] == ["m-000001-state", "m-000002-state", "m-000003-state"]
    assert all(p.is_dir() for p in stale)
    assert [p.name for p in C.files_to_prune(tmp_path, "m", "epoch", 4, 5)] == ["m-000001.safetensors"]
    assert C.files_to_prune(tmp_path, "m", "epoch", None, 5) == []
    assert C.files_to_prune(tmp_path / "missing", "m", "epoch", 1, 5) == []


def test_name_with_regex_characters(tmp_path):
    touch(tmp_path / C.epoch_ckpt_name("a.b+c", 1))
    touch(tmp_path / C.epoch_ckpt_name("aXb+c", 1))
    assert [p.name for p in C.files_to_prune(tmp_path, "a.b+c", "epoch", 0, 1)] == ["a.b+c-000001.safetensors"]


def test_keep_last_n_for_state_override():
    args = SimpleNamespace(save_last_n_epochs=3, save_last_n_epochs_state=1, save_last_n_steps=100, save_last_n_steps_state=None)
    assert C.keep_last_n_for(args, "epoch") == 3
    assert C.keep_last_n_for(args, "epoch_state") == 1
    assert C.keep_last_n_for(args, "step_state") == 100


def test_state_marker(tmp_path):
    state = tmp_path / C.step_state_name("m", 100)
    state.mkdir()
    with pytest.raises(UserError, match="incomplete state"):
        C.read_state_marker(state)
    with pytest.raises(UserError, match="no such state folder"):
        C.read_state_marker(tmp_path / "nope")
    C.write_state_marker(state, {"global_step": 100, "epoch": 2})
    assert C.read_state_marker(state) == {"global_step": 100, "epoch": 2}
    (state / C.STATE_MARKER).write_text("{broken")
    with pytest.raises(UserError, match="unreadable"):
        C.read_state_marker(state)


def test_find_latest_complete_state(tmp_path):
    assert C.find_latest_complete_state(tmp_path, "m") is None
    for step in (100, 200, 300):
        (tmp_path / C.step_state_name("m", step)).mkdir()
    C.write_state_marker(tmp_path / C.step_state_name("m", 100), {"global_step": 100})
    C.write_state_marker(tmp_path / C.step_state_name("m", 200), {"global_step": 200})
    # 300 has no marker (interrupted save): skipped
    assert C.find_latest_complete_state(tmp_path, "m").name == "m-step00000200-state"
    epoch = tmp_path / C.epoch_state_name("m", 3)
    epoch.mkdir()
    C.write_state_marker(epoch, {"global_step": 250})
    assert C.find_latest_complete_state(tmp_path, "m") == epoch
    final = tmp_path / C.last_state_name("m")
    final.mkdir()
    C.write_state_marker(final, {"global_step": 250})
    assert C.find_latest_complete_state(tmp_path, "m") == final


def test_stale_saves_and_remove(tmp_path):
    args = SimpleNamespace(output_name="m", save_last_n_epochs=2, save_last_n_epochs_state=1, save_last_n_steps=None,
                           save_last_n_steps_state=None)
    for epoch in (1, 2, 3):
        touch(tmp_path / C.epoch_ckpt_name("m", epoch))
        touch(tmp_path / C.state_dir_name("m", "epoch", epoch) / "optimizer.bin")
    stale = C.stale_saves(tmp_path, args, "epoch", 3)
    assert [p.name for p in stale] == ["m-000001.safetensors", "m-000001-state", "m-000002-state"]
    for path in stale:
        C.remove_path(path)
    C.remove_path(tmp_path / "gone")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-000002.safetensors", "m-000003-state", "m-000003.safetensors"]
    assert C.stale_saves(tmp_path, args, "step", 10) == []
    assert C.state_dir_name("m", "final", None) == "m-state" and C.last_ckpt_name("m") == "m.safetensors"
