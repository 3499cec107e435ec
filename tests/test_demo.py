"""`make demo` keeps working: every stage runs and writes what the summary points at."""

import pytest

from musubi_tuner import demo


@pytest.mark.parametrize("arch", demo.DEMO_ARCHS)
def test_demo_runs_every_stage(arch, tmp_path, capsys):
    demo.main(["--arch", arch, "--output_dir", str(tmp_path / arch), "--steps", "4"])
    out = capsys.readouterr().out
    assert "loss: first 1 steps" in out and "(4 steps)" in out
    if arch == "wan":  # the Wan demo also shows validation loss and caption dropout
        assert "validation loss ([[validation_datasets]], fixed noise and timesteps)" in out and "(4 evaluations)" in out
    root = tmp_path / arch
    assert (root / "lora" / "demo_lora.safetensors").is_file()
    assert (root / "lora" / "demo_lora-state" / "musubi_state.json").is_file()
    assert list((root / "lora" / "sample").iterdir())
    assert list((root / "generated").iterdir())
    assert (root / "merged" / "tiny_merged.safetensors").is_file()
    for what in ("samples during training", "generated", "merged DiT"):
        assert what in out


def test_framepack_demo_samples_and_merges_every_shard(tmp_path, capsys):
    """FramePack: a sample video during training and a generated video (both from the start frame), and the
    3-shard DiT merged into one file with every key."""
    from safetensors import safe_open

    from musubi_tuner.dataset.media import probe_video

    root = tmp_path / "fp"
    demo.main(["--arch", "framepack", "--output_dir", str(root), "--steps", "2"])
    out = capsys.readouterr().out
    assert "=== 5/5 merge the LoRA into the DiT ===" in out
    [sample] = (root / "lora" / "sample").iterdir()
    assert sample.suffix == ".mp4" and probe_video(sample)[0] == 9  # one section of window 2
    videos = list((root / "generated").glob("*.mp4"))
    assert len(videos) == 1 and probe_video(videos[0])[0] == 9
    shard_keys = set()
    for shard in (root / "models" / "dit").glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            shard_keys |= set(f.keys())
    with safe_open(str(root / "merged" / "tiny_merged.safetensors"), "pt") as f:
        assert set(f.keys()) == shard_keys


def test_demo_never_deletes_a_folder_it_did_not_write(tmp_path, capsys):
    mine = tmp_path / "my_project"
    mine.mkdir()
    (mine / "dataset.toml").write_text("user data")
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--arch", "wan", "--output_dir", str(mine), "--steps", "1"])
    assert exit_info.value.code == 2
    assert "not empty and was not written by the demo; nothing was deleted" in capsys.readouterr().err
    assert (mine / "dataset.toml").read_text() == "user data"


def test_a_previous_demo_folder_is_replaced_and_said(tmp_path, capsys):
    out = tmp_path / "demo_output"
    demo.prepare_output_dir(out)
    (out / "old_result.txt").write_text("from the last run")
    demo.prepare_output_dir(out)
    assert "replacing the previous demo output" in capsys.readouterr().out
    assert not (out / "old_result.txt").exists() and (out / demo.DEMO_MARKER).is_file()
