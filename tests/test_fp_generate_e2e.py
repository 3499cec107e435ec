"""fpack_generate_video.py end to end on tiny files: vanilla, F1, end image, section prompts/images, one-frame with
an alpha-masked control image, MagCache, decode-only, prompt files, and flag errors before any model loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_framepack_e2e import FpWorkspace
from wan_fixtures import run

from musubi_tuner import fpack_generate_video
from musubi_tuner.architectures.framepack.tiny import save_tiny_framepack
from musubi_tuner.models.hunyuan_video.tiny_text import write_tiny_hunyuan_text_files
from musubi_tuner.models.hunyuan_video.tiny_vae import write_tiny_hv_vae
from musubi_tuner.models.siglip_files import save_tiny_siglip

WINDOW = 2  # 5 frames per section keeps the tiny runs short (the training e2e's window too)


@dataclass
class GenWorkspace:
    """The tiny model files of the FramePack training e2e plus images to start from."""

    models: FpWorkspace
    start: Path
    end: Path
    control: Path

    @property
    def dit(self) -> Path:
        return self.models.dit

    def args(self, save: Path, *extra: str) -> list[str]:
        return ["--dit", str(self.dit), *self.models.vae_args, *self.models.te_args, "--device", "cpu",
                "--save_path", str(save), "--video_size", "32", "32", "--latent_window_size", str(WINDOW),
                "--infer_steps", "2", "--seed", "5", *extra]


def _image(path: Path, color, mode="RGB") -> Path:
    size = (40, 32)
    array = np.zeros((size[1], size[0], len(mode)), dtype=np.uint8)
    array[...] = color
    if mode == "RGBA":
        array[:, : size[0] // 2, 3] = 0  # left half transparent
    Image.fromarray(array, mode).save(path)
    return path


@pytest.fixture(scope="module")
def ws(one_torch_thread, tmp_path_factory) -> GenWorkspace:
    root = tmp_path_factory.mktemp("fp_gen")
    models = root / "models"
    files = FpWorkspace(root=root, dit=save_tiny_framepack(models / "dit", "single"),
                        vae=write_tiny_hv_vae(models / "vae", "comfy"),
                        siglip=save_tiny_siglip(models / "siglip", "comfy"),
                        text=write_tiny_hunyuan_text_files(models / "text"))
    return GenWorkspace(files, start=_image(root / "start.png", (200, 30, 30)), end=_image(root / "end.png", (30, 30, 200)),
                        control=_image(root / "control.png", (30, 200, 30, 255), "RGBA"))


def _latent(folder: Path) -> torch.Tensor:
    (path,) = folder.glob("*_latent.safetensors")
    return load_file(path)["latent"]


def test_vanilla_video_is_reproducible_and_decodes_from_the_latent(ws, tmp_path):
    common = ["--prompt", "a red square", "--image_path", str(ws.start), "--video_sections", "2", "--output_type", "both"]
    assert run(fpack_generate_video.main, ws.args(tmp_path / "a", *common)) == 0
    assert run(fpack_generate_video.main, ws.args(tmp_path / "b", *common)) == 0
    latent = _latent(tmp_path / "a")
    assert latent.shape == (16, 2 * WINDOW + 1, 4, 4)  # two sections and the start image's latent
    assert torch.equal(latent, _latent(tmp_path / "b"))
    assert len(list((tmp_path / "a").glob("*.mp4"))) == 1
    (path,) = (tmp_path / "a").glob("*_latent.safetensors")
    assert run(fpack_generate_video.main, ws.args(tmp_path / "decoded", "--latent_path", str(path))) == 0
    assert len(list((tmp_path / "decoded").glob("*.mp4"))) == 1


def test_f1_end_image_and_section_prompts_change_the_video(ws, tmp_path):
    base = ["--image_path", str(ws.start), "--video_sections", "2", "--output_type", "latent"]
    runs = {
        "plain": ["--prompt", "a red square", *base],
        "f1": ["--prompt", "a red square", "--f1", *base],
        "end": ["--prompt", "a red square", "--end_image_path", str(ws.end), *base],
        "sections": ["--prompt", "0:a red square;;;1:a blue circle", *base],
        "images": ["--prompt", "a red square", "--image_path", f"0:{ws.start};;;-1:{ws.end}",
                   "--video_sections", "2", "--output_type", "latent"],
    }
    latents = {}
    for name, extra in runs.items():
        assert run(fpack_generate_video.main, ws.args(tmp_path / name, *extra)) == 0, name
        latents[name] = _latent(tmp_path / name)
    assert latents["f1"].shape == latents["plain"].shape
    for name in ("f1", "end", "sections", "images"):
        assert not torch.allclose(latents[name], latents["plain"]), name
    # the last section took the other prompt; the start image's latent leads both videos unchanged
    assert torch.equal(latents["sections"][:, :1], latents["plain"][:, :1])


def test_one_frame_with_alpha_masked_control_and_magcache(ws, tmp_path):
    args = ws.args(tmp_path / "one", "--prompt", "a green square", "--image_path", str(ws.start),
                   "--one_frame_inference", "target_index=1,control_index=0;10,no_post,no_2x,no_4x",
                   "--control_image_path", str(ws.control), str(ws.start), "--output_type", "latent_images",
                   "--magcache_mag_ratios", "0", "--infer_steps", "4")
    assert run(fpack_generate_video.main, args) == 0
    assert _latent(tmp_path / "one").shape == (16, 1, 4, 4)
    assert len(list((tmp_path / "one").glob("*.png"))) == 1  # one image, no folder


def test_prompt_file_seconds_and_magcache_options(ws, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a cat --f 0.2 --i {ws.start} --mck 2 --mct 0.5 --d 3\n")
    assert run(fpack_generate_video.main, ws.args(tmp_path / "file", "--from_file", str(prompts),
                                                  "--output_type", "latent")) == 0
    assert _latent(tmp_path / "file").shape == (16, WINDOW + 1, 4, 4)  # 0.2 s * 30 / (4 * 2) = 0.75 -> one section


@pytest.mark.parametrize("extra,needle", [
    (["--f1", "--end_image_path", "END"], "--end_image_path"),
    (["--one_frame_inference", "no_8x"], "no_8x"),
    (["--sample_solver", "dpm++"], "unipc"),
    (["--latent_paddings", "3,x"], "--latent_paddings"),
    (["--control_image_path", "START"], "--one_frame_inference"),
    (["--image_path", "0:START;;;1:missing.png"], "missing.png"),
    (["NO_IMAGE_ENCODER"], "--image_encoder"),
])
def test_bad_flags_stop_before_any_model_loads(ws, tmp_path, extra, needle, capsys):
    extra = [e.replace("END", str(ws.end)).replace("START", str(ws.start)) for e in extra]
    args = ws.args(tmp_path / "bad", "--prompt", "x", *[e for e in extra if e != "NO_IMAGE_ENCODER"])
    if "NO_IMAGE_ENCODER" in extra:
        del args[args.index("--image_encoder"): args.index("--image_encoder") + 2]
    args[args.index("--dit") + 1] = str(tmp_path / "no_dit.safetensors")  # never read: the flags fail first
    assert run(fpack_generate_video.main, args) == 2
    assert needle in capsys.readouterr().err


def test_hunyuan_video_lora_merges_converted_and_the_merged_model_gives_the_same_video(ws, tmp_path):
    from fused_lora_helpers import reference_lora
    from safetensors.torch import save_file

    from musubi_tuner.architectures import get_architecture
    from musubi_tuner.architectures.framepack.lora_conversion import framepack_lora_from_any
    from musubi_tuner.architectures.hunyuan_video.tiny import tiny_hv_dit

    hv_targets = [t for t in get_architecture("hunyuan_video").lora_candidates(tiny_hv_dit())
                  if "mod" not in t.original_name]
    hv_sd = {k: v * 0.3 for k, v in reference_lora(hv_targets, rank=2, alpha=2.0, seed=4).items()}
    save_file(hv_sd, tmp_path / "hv_lora.safetensors")
    save_file(framepack_lora_from_any(hv_sd), tmp_path / "fp_lora.safetensors")
    common = ["--prompt", "a red square", "--image_path", str(ws.start), "--video_sections", "1",
              "--output_type", "latent"]
    runs = {"none": [], "hv": ["--lora_weight", str(tmp_path / "hv_lora.safetensors")],
            "fp": ["--lora_weight", str(tmp_path / "fp_lora.safetensors")]}
    latents = {}
    for name, extra in runs.items():
        assert run(fpack_generate_video.main, ws.args(tmp_path / name, *common, *extra)) == 0, name
        latents[name] = _latent(tmp_path / name)
    assert torch.equal(latents["hv"], latents["fp"])  # converted on the fly = converted beforehand
    assert not torch.allclose(latents["hv"], latents["none"])
    merged = tmp_path / "merged.safetensors"
    args = ws.args(tmp_path / "unused", *runs["hv"], "--save_merged_model", str(merged))
    assert run(fpack_generate_video.main, args) == 0
    with_merged = ws.args(tmp_path / "merged_run", *common)
    with_merged[with_merged.index("--dit") + 1] = str(merged)
    assert run(fpack_generate_video.main, with_merged) == 0
    assert torch.allclose(_latent(tmp_path / "merged_run"), latents["hv"], atol=1e-5)


def test_one_frame_auto_resize_follows_the_control_aspect(ws, tmp_path):
    wide = tmp_path / "wide.png"
    Image.fromarray(np.full((32, 64, 3), 90, dtype=np.uint8)).save(wide)
    args = ws.args(tmp_path / "auto", "--prompt", "x", "--image_path", str(ws.start), "--one_frame_inference",
                   "no_2x,no_4x", "--control_image_path", str(wide), "--one_frame_auto_resize", "--output_type",
                   "latent")
    args[args.index("--video_size") + 1: args.index("--video_size") + 3] = ["64", "64"]
    assert run(fpack_generate_video.main, args) == 0
    # aspect 2 at the area of 64x64, widths 48..112 in steps of 16: 80x48 is the closest ratio
    assert _latent(tmp_path / "auto").shape == (16, 1, 48 // 8, 80 // 8)


def test_interactive_lines_are_rendered_and_a_bad_one_is_skipped(ws, tmp_path, monkeypatch, capsys):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"a cat --f 0.2 --i {ws.start} --mck nope\n"
                                                  f"a dog --f 0.2 --i {ws.start}\n"))
    assert run(fpack_generate_video.main, ws.args(tmp_path / "inter", "--interactive", "--output_type", "latent")) == 0
    assert "--mck" in capsys.readouterr().err
    assert _latent(tmp_path / "inter").shape == (16, WINDOW + 1, 4, 4)


def test_custom_system_prompt_changes_the_conditioning(ws, tmp_path):
    common = ["--prompt", "a red square", "--image_path", str(ws.start), "--video_sections", "1",
              "--output_type", "latent"]
    assert run(fpack_generate_video.main, ws.args(tmp_path / "plain", *common)) == 0
    assert run(fpack_generate_video.main, ws.args(tmp_path / "custom", *common,
                                                  "--custom_system_prompt", "Describe the cat.")) == 0
    assert not torch.allclose(_latent(tmp_path / "plain"), _latent(tmp_path / "custom"))


def test_block_swap_with_magcache_gives_the_same_video(ws, tmp_path):
    common = ["--prompt", "a red square", "--image_path", str(ws.start), "--video_sections", "1", "--infer_steps", "6",
              "--magcache_mag_ratios", "1,1,1,1,1,1", "--output_type", "latent"]
    # four single blocks: --blocks_to_swap 1 swaps three of them (the reference's split), the tiny default has two
    dit = save_tiny_framepack(tmp_path / "dit4", "single", single_layers=4)
    assert run(fpack_generate_video.main, ws.args(tmp_path / "plain", *common, "--dit", str(dit))) == 0
    assert run(fpack_generate_video.main, ws.args(tmp_path / "swap", *common, "--dit", str(dit),
                                                  "--blocks_to_swap", "1")) == 0
    assert torch.equal(_latent(tmp_path / "plain"), _latent(tmp_path / "swap"))
