"""Samples during FramePack training: `fpack_train_network.py --sample_prompts` renders each line through the
section loop (a video) or one-frame inference (an image), seeded, and refuses a bad line before any model loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_framepack_e2e import f1, vanilla, write_one_frame_dataset, write_video_dataset, ws  # noqa: F401  (fixtures)
from wan_fixtures import run

from musubi_tuner import fpack_generate_video, fpack_train_network
from musubi_tuner.architectures.framepack.training_samples import video_sections
from musubi_tuner.dataset.media import decode_frames, probe_video


def _train_with_samples(ws, toml: Path, out: Path, prompts: str, *extra: str) -> list[Path]:  # noqa: F811
    path = out.parent / "prompts.txt"
    path.write_text(prompts)
    argv = ws.train_args(toml, out, 1, *ws.vae_args, *ws.te_args, "--latent_window_size", "2",
                         "--sample_prompts", str(path), "--sample_every_n_steps", "1", *extra)
    assert run(fpack_train_network.main, argv) == 0
    return sorted((out / "sample").iterdir())


def _frames(path: Path) -> np.ndarray:
    count, _ = probe_video(path)
    return np.stack(decode_frames(path, list(range(count))))


def test_sections_from_frames_follow_the_reference_trainer():
    # latent frames (f - 1) // 4 + 1; whole windows after the start latent
    assert video_sections(37, 9) == 1
    assert video_sections(36, 9) == 0
    assert video_sections(9, 2) == 1
    assert video_sections(17, 2) == 2


def test_vanilla_training_writes_seeded_sample_videos(ws, tmp_path):  # noqa: F811
    toml = write_video_dataset(tmp_path / "data")
    ws.cache(toml)
    start = tmp_path / "start.png"
    Image.fromarray(np.full((32, 32, 3), 90, dtype=np.uint8)).save(start)
    line = f"a blue square --i {start} --w 32 --h 32 --f 9 --s 2"
    written = _train_with_samples(ws, toml, tmp_path / "out", f"{line} --d 7\n{line} --d 7\n{line} --d 8\n")
    videos = [p for p in written if p.suffix == ".mp4"]
    assert [p.name.split("_")[1:3] for p in videos] == [["000001", "00"], ["000001", "01"], ["000001", "02"]]
    first, same, other = (_frames(p) for p in videos)
    # 1 section of window 2: 4 * 2 + 1 latent-to-pixel frames, as the generate script's vanilla loop makes
    assert first.shape[0] == 9 and first.shape[1:3] == (32, 32)
    assert np.array_equal(first, same)
    assert not np.array_equal(first, other)


def test_one_frame_training_writes_a_sample_image(ws, tmp_path):  # noqa: F811
    toml = write_one_frame_dataset(tmp_path / "data", alpha=False)
    ws.cache(toml, "--one_frame")
    control = tmp_path / "data" / "controls" / "red.png"
    line = f"a red dot --i {control} --ci {control} --of target_index=1,control_index=0 --w 32 --h 32 --s 2 --d 3"
    written = _train_with_samples(ws, toml, tmp_path / "out", line + "\n", "--one_frame")
    assert len(written) == 1 and written[0].suffix == ".png"
    assert Image.open(written[0]).size == (32, 32)


def test_f1_training_samples_forward_sections(ws, f1, tmp_path):  # noqa: F811
    start = tmp_path / "start.png"
    Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8)).save(start)
    written = _train_with_samples(ws, f1, tmp_path / "out", f"a dot --i {start} --w 32 --h 32 --vs 1 --s 2 --d 1\n",
                                  "--f1")
    assert [p.suffix for p in written] == [".mp4"] and _frames(written[0]).shape[0] == 9


@pytest.mark.parametrize(("line", "extra", "message"), [
    ("a dot --w 32 --h 32 --f 9", [], "prompts.txt line 1: FramePack samples are image-to-video; add --i"),
    ("a dot --i {img} --w 32 --h 32 --f 5", [], "--f 5 frames make no section of --latent_window_size 2; give --f 9"),
    ("a dot --i {img} --w 30 --h 32 --f 9", [], "line 1: --w: must be a positive multiple of 16, got 30"),
    ("a dot --i missing.png --w 32 --h 32 --f 9", [], "--i missing.png: file not found"),
    ("a dot --i {img} --w 32 --h 32 --of bogus", ["--one_frame"], "line 1: --of: unknown option 'bogus'"),
])
def test_a_bad_sample_line_fails_before_any_model_loads(tmp_path, capsys, line, extra, message):
    toml = write_video_dataset(tmp_path)
    img = tmp_path / "start.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(img)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(line.format(img=img) + "\n")
    argv = ["--dit", "missing.safetensors", "--dataset_config", str(toml), "--output_dir", str(tmp_path / "out"),
            "--image_encoder", "missing_siglip.safetensors", "--latent_window_size", "2",
            "--sample_prompts", str(prompts), "--sample_every_n_steps", "1", *extra]
    assert run(fpack_train_network.main, argv) == 2
    assert message in capsys.readouterr().err


def test_sample_prompts_need_the_image_encoder(tmp_path, capsys):
    toml = write_video_dataset(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dot --w 32 --h 32 --f 9\n")
    argv = ["--dit", "missing.safetensors", "--dataset_config", str(toml), "--output_dir", str(tmp_path / "out"),
            "--sample_prompts", str(prompts)]
    assert run(fpack_train_network.main, argv) == 2
    assert "--sample_prompts needs --image_encoder" in capsys.readouterr().err


def test_a_sample_before_training_is_what_the_generate_script_makes(ws, vanilla, tmp_path):  # noqa: F811
    """Same DiT, prompt, start image, seed and steps: --sample_at_first renders the video fpack_generate_video.py
    renders (the same session code, the same seeded noise)."""
    start = tmp_path / "start.png"
    Image.fromarray(np.full((32, 32, 3), 60, dtype=np.uint8)).save(start)
    [sample] = _train_with_samples(ws, vanilla, tmp_path / "out", f"a blue square --i {start} --w 32 --h 32 --f 9 "
                                   "--s 3 --d 11\n", "--sample_at_first", "--sample_every_n_steps", "100")
    argv = ["--dit", str(ws.dit), *ws.vae_args, *ws.te_args, "--prompt", "a blue square", "--image_path", str(start),
            "--video_size", "32", "32", "--latent_window_size", "2", "--video_sections", "1", "--infer_steps", "3",
            "--seed", "11", "--save_path", str(tmp_path / "gen"), "--device", "cpu", "--output_type", "video"]
    assert run(fpack_generate_video.main, argv) == 0
    [generated] = (tmp_path / "gen").glob("*.mp4")
    assert "_e000000_00_" in sample.name  # before the first epoch
    assert np.array_equal(_frames(sample), _frames(generated))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_samples_work_in_mixed_precision(ws, vanilla, tmp_path, precision):  # noqa: F811
    """The sampler runs in the trained DiT's dtype under the step's autocast (fp16 on a CPU failed in fp32)."""
    start = tmp_path / "start.png"
    Image.fromarray(np.full((32, 32, 3), 60, dtype=np.uint8)).save(start)
    [sample] = _train_with_samples(ws, vanilla, tmp_path / "out", f"a --i {start} --w 32 --h 32 --f 9 --s 2 --d 1\n",
                                   "--mixed_precision", precision)
    frames = _frames(sample)
    assert frames.shape[0] == 9 and frames.std() > 0
