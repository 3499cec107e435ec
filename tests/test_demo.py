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
