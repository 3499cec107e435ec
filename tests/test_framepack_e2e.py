"""FramePack end to end through the three reference-named scripts on tiny files in the released layouts:
text caches (llama_vec/llama_attention_mask/clip_l_pooler), per-section latent caches (plain and F1) and
one-frame caches with their reference names and keys, then training (loss goes down) on each, and on a cache file
written by hand exactly as the reference names and keys it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from wan_fixtures import run

from musubi_tuner import fpack_cache_latents, fpack_cache_text_encoder_outputs, fpack_train_network
from musubi_tuner.architectures import get_architecture
from musubi_tuner.architectures.framepack.tiny import save_tiny_framepack
from musubi_tuner.dataset.cache_files import read_cache
from musubi_tuner.demo_data import COLORS, moving_clip
from musubi_tuner.models.hunyuan_video.tiny_text import write_tiny_hunyuan_text_files
from musubi_tuner.models.hunyuan_video.tiny_vae import write_tiny_hv_vae
from musubi_tuner.models.siglip_files import TINY_SIGLIP_HIDDEN, save_tiny_siglip

ARCH = get_architecture("framepack")
WINDOW = 2
"""fp_latent_window_size of the test datasets: 17 frames = 5 latents = start + 2 sections of 2."""


@dataclass
class FpWorkspace:
    root: Path
    dit: Path
    vae: Path
    siglip: Path
    text: dict

    @property
    def vae_args(self) -> list[str]:
        return ["--vae", str(self.vae), "--vae_dtype", "float32", "--image_encoder", str(self.siglip)]

    @property
    def te_args(self) -> list[str]:
        return ["--text_encoder1", str(self.text["llm"]), "--text_encoder2", str(self.text["clip_l"]),
                "--llm_tokenizer", str(self.text["llm_tokenizer"]), "--clip_tokenizer", str(self.text["clip_tokenizer"]),
                "--text_encoder_dtype", "float32"]

    def cache(self, toml: Path, *latent_flags: str) -> None:
        assert run(fpack_cache_latents.main, ["--dataset_config", str(toml), *self.vae_args, "--device", "cpu",
                                              *latent_flags]) == 0
        assert run(fpack_cache_text_encoder_outputs.main, ["--dataset_config", str(toml), *self.te_args,
                                                           "--device", "cpu"]) == 0

    def train_args(self, toml: Path, output_dir: Path, steps: int, *extra: str) -> list[str]:
        return ["--dit", str(self.dit), "--dataset_config", str(toml), "--mixed_precision", "no",
                "--network_module", "networks.lora_framepack", "--network_dim", "8", "--network_alpha", "8",
                "--optimizer_type", "adamw", "--learning_rate", "1e-2", "--max_train_steps", str(steps),
                "--seed", "123", "--timestep_sampling", "shift", "--discrete_flow_shift", "3.0",
                "--output_dir", str(output_dir), "--output_name", "lora", *extra]


@pytest.fixture(scope="module")
def ws(one_torch_thread, tmp_path_factory) -> FpWorkspace:
    root = tmp_path_factory.mktemp("fp")
    models = root / "models"
    return FpWorkspace(root=root, dit=save_tiny_framepack(models / "dit", "shards"),
                       vae=write_tiny_hv_vae(models / "vae", "official_pt"),
                       siglip=save_tiny_siglip(models / "siglip", "comfy"),
                       text=write_tiny_hunyuan_text_files(models / "text"))


def write_video_dataset(root: Path, frames: int = 17) -> Path:
    from musubi_tuner.inference.outputs import save_video_mp4

    videos = root / "videos"
    videos.mkdir(parents=True)
    save_video_mp4(moving_clip(32, frames, "square", COLORS["blue"], 0.0), videos / "blue_square.mp4", 16)
    (videos / "blue_square.txt").write_text("a blue square moving")
    toml = root / "dataset.toml"
    toml.write_text(
        '[general]\nresolution = [32, 32]\ncaption_extension = ".txt"\nbatch_size = 1\nenable_bucket = true\n\n'
        f'[[datasets]]\nvideo_directory = "{videos.as_posix()}"\ncache_directory = "{(root / "cache").as_posix()}"\n'
        f'target_frames = [{frames}]\nframe_extraction = "head"\nfp_latent_window_size = {WINDOW}\n')
    return toml


def write_one_frame_dataset(root: Path, alpha: bool = True) -> Path:
    """Two images, each with one control image (the same dot a step earlier); the first control has an alpha
    channel whose left half is transparent."""
    images, controls = root / "images", root / "controls"
    images.mkdir(parents=True)
    controls.mkdir(parents=True)
    for i, name in enumerate(("red", "green")):
        Image.fromarray(moving_clip(32, 1, "circle", COLORS[name], 1.0 + i)[0]).save(images / f"{name}.png")
        (images / f"{name}.txt").write_text(f"a {name} dot moved")
        control = moving_clip(32, 1, "circle", COLORS[name], float(i))[0]
        if alpha and i == 0:
            a = np.full((32, 32, 1), 255, dtype=np.uint8)
            a[:, :16] = 0
            control = np.concatenate([control, a], axis=2)
        Image.fromarray(control).save(controls / f"{name}.png")
    toml = root / "dataset.toml"
    toml.write_text(
        '[general]\nresolution = [32, 32]\ncaption_extension = ".txt"\nbatch_size = 1\nenable_bucket = true\n\n'
        f'[[datasets]]\nimage_directory = "{images.as_posix()}"\ncontrol_directory = "{controls.as_posix()}"\n'
        f'cache_directory = "{(root / "cache").as_posix()}"\nfp_1f_clean_indices = [0]\nfp_1f_target_index = 1\n'
        'fp_1f_no_post = false\n')
    return toml


@pytest.fixture(scope="module")
def vanilla(ws) -> Path:
    toml = write_video_dataset(ws.root / "vanilla")
    ws.cache(toml)
    return toml


@pytest.fixture(scope="module")
def f1(ws) -> Path:
    toml = write_video_dataset(ws.root / "f1")
    ws.cache(toml, "--f1")
    return toml


def _sections(toml: Path) -> list[dict[str, torch.Tensor]]:
    files = sorted((toml.parent / "cache").glob("*_fp.safetensors"))
    return [read_cache(p)[0] for p in files]


def test_text_cache_has_the_reference_keys(ws, vanilla):
    from musubi_tuner.architectures.framepack.architecture import LLAMA_VEC_LENGTH

    path = vanilla.parent / "cache" / "blue_square_fp_te.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == {"llama_vec_float32", "llama_attention_mask", "clip_l_pooler_float32"}
    assert meta["architecture"] == "framepack" and meta["caption1"] == "a blue square moving"
    sd = load_file(str(path))
    mask = sd["llama_attention_mask"]
    assert mask.dtype == torch.bool and mask.shape == (LLAMA_VEC_LENGTH,)
    count = int(mask.sum())
    assert 0 < count < 20 and bool(mask[:count].all())
    vec = sd["llama_vec_float32"]
    assert vec.shape == (LLAMA_VEC_LENGTH, 32) and torch.all(vec[count:] == 0) and torch.any(vec[:count] != 0)
    assert sd["clip_l_pooler_float32"].shape == (32,)


def test_vanilla_writes_one_cache_per_section_named_as_the_reference(ws, vanilla):
    names = sorted(p.name for p in (vanilla.parent / "cache").glob("*_fp.safetensors"))
    assert names == ["blue_square_00000-017-0000_0032x0032_fp.safetensors",
                     "blue_square_00000-017-0001_0032x0032_fp.safetensors"]
    with safe_open(str(vanilla.parent / "cache" / names[0]), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == {"latents_2x4x4_float32", "latents_clean_2x4x4_float32", "latents_clean_2x_2x4x4_float32",
                    "latents_clean_4x_16x4x4_float32", "image_embeddings_float32", "latent_indices_int64",
                    "clean_latent_indices_int64", "clean_latent_2x_indices_int64", "clean_latent_4x_indices_int64"}
    assert meta["architecture"] == "framepack" and meta["frame_count"] == "17" and meta["width"] == "32"
    first, second = _sections(vanilla)
    # sampled backwards: the last section sees an empty history; the first sees the last one as recent history
    assert torch.all(second["latents_clean"][:, 1] == 0) and torch.all(second["latents_clean_2x"] == 0)
    assert torch.equal(first["latents_clean"][:, 1], second["latents"][:, 0])
    assert torch.equal(first["latents_clean_2x"][:, 0], second["latents"][:, 1])
    assert torch.equal(first["latents_clean"][:, 0], second["latents_clean"][:, 0])  # the start latent
    assert first["latent_indices"].tolist() == [1, 2] and second["latent_indices"].tolist() == [3, 4]
    assert first["image_embeddings"].shape[-1] == TINY_SIGLIP_HIDDEN and torch.equal(first["image_embeddings"],
                                                                     second["image_embeddings"])


def test_f1_sections_hold_the_past(ws, f1):
    first, second = _sections(f1)
    assert torch.equal(second["latents_clean"][:, 1], first["latents"][:, -1])
    assert torch.equal(second["latents_clean_2x"][:, 1], first["latents"][:, 0])
    assert torch.equal(first["latents_clean"][:, 0], first["latents_clean"][:, 1])  # 1x history = the start
    assert first["latent_indices"].tolist() == [20, 21] and first["clean_latent_indices"].tolist() == [0, 19]


def test_skip_existing_keeps_every_section_and_stale_sections_are_removed(ws, tmp_path):
    toml = write_video_dataset(tmp_path)
    ws.cache(toml)
    cache = tmp_path / "cache"
    stale = cache / "blue_square_00000-017-0002_0032x0032_fp.safetensors"
    stale.write_bytes((cache / "blue_square_00000-017-0001_0032x0032_fp.safetensors").read_bytes())
    before = {p.name: p.stat().st_mtime_ns for p in cache.glob("*-000[01]_*_fp.safetensors")}
    assert run(fpack_cache_latents.main, ["--dataset_config", str(toml), *ws.vae_args, "--device", "cpu",
                                          "--skip_existing"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*-000[01]_*_fp.safetensors")} == before
    assert not stale.exists()


def test_a_clip_shorter_than_one_section_is_refused_before_models_load(ws, tmp_path, capsys):
    toml = write_video_dataset(tmp_path, frames=5)
    args = ["--dataset_config", str(toml), "--vae", str(tmp_path / "missing.pt"), "--image_encoder", str(ws.siglip)]
    assert run(fpack_cache_latents.main, args) == 2
    err = capsys.readouterr().err
    assert "blue_square.mp4: 5 frames are fewer than one FramePack section needs (9" in err


def test_one_frame_caches_mask_the_control_with_its_alpha(ws, tmp_path):
    toml = write_one_frame_dataset(tmp_path)
    ws.cache(toml, "--one_frame", "--one_frame_no_4x")
    cache = tmp_path / "cache"
    red = cache / "red_0032x0032_fp.safetensors"
    with safe_open(str(red), "pt") as f:
        keys = set(f.keys())
    assert keys == {"latents_1x4x4_float32", "latents_clean_2x4x4_float32", "image_embeddings_float32",
                    "latent_indices_int64", "clean_latent_indices_int64", "clean_latent_2x_indices_int64"}
    sd, _ = read_cache(red)
    # fp_latent_window_size is the default 9 here: the zero post latent sits at 1 + 9, the 2x history after it
    assert sd["clean_latent_indices"].tolist() == [0, 10] and sd["latent_indices"].tolist() == [1]
    assert sd["clean_latent_2x_indices"].tolist() == [11, 12]
    control = sd["latents_clean"][:, 0]
    # the left half is transparent: LANCZOS to the latent grid gives 0 in the first column (the second, at the
    # edge, only partly); the right half keeps its values
    assert torch.all(control[:, :, 0] == 0) and torch.all(control[:, :, 3] != 0)
    assert torch.all(sd["latents_clean"][:, 1] == 0)  # the zero "post" latent
    green, _ = read_cache(cache / "green_0032x0032_fp.safetensors")
    assert torch.any(green["latents_clean"][:, 0, :, :2] != 0)  # no alpha: nothing masked


def _eval_loss(dit, sections: list[dict[str, torch.Tensor]], text: dict[str, torch.Tensor]) -> float:
    """Flow-matching loss over the cached sections at fixed timesteps and noise, through the training path."""
    gen = torch.Generator().manual_seed(0)
    losses = []
    for cache in sections:
        batch = {k: v[None] for k, v in {**cache, **text}.items()}
        batch.update(ARCH.training_conditioning(type("A", (), {"guidance_scale": 1.0})()))
        x0 = batch["latents"].float()
        for t in (0.3, 0.6, 0.9):
            noise = torch.randn(x0.shape, generator=gen)
            with torch.no_grad():
                pred = ARCH.predict(dit, batch, (1 - t) * x0 + t * noise, torch.tensor([t * 1000.0]))
            losses.append(torch.mean((pred - (noise - x0)) ** 2).item())
    return sum(losses) / len(losses)


def _loss_before_after(ws, toml: Path, lora: Path, text_name: str) -> tuple[float, float]:
    from musubi_tuner.architectures.framepack.dit_files import load_framepack_dit
    from musubi_tuner.inference.lora_merge import merge_loras_into_dit

    sections = _sections(toml)
    text = read_cache(toml.parent / "cache" / text_name)[0]
    dit = load_framepack_dit(ws.dit, dtype=torch.float32)
    before = _eval_loss(dit, sections, text)
    merge_loras_into_dit(ARCH, dit, [str(lora)], [1.0])
    return before, _eval_loss(dit, sections, text)


@pytest.mark.parametrize("kind", ["vanilla", "f1"])
def test_training_on_section_caches_lowers_the_loss(ws, kind, request, tmp_path):
    toml = request.getfixturevalue(kind)
    out = tmp_path / "out"
    assert run(fpack_train_network.main, ws.train_args(toml, out, 30)) == 0
    sd = load_file(str(out / "lora.safetensors"))
    assert "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight" in sd
    assert "lora_unet_single_transformer_blocks_1_proj_mlp.lora_up.weight" in sd
    assert not any("norm" in k for k in sd)
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora_framepack"
    before, after = _loss_before_after(ws, toml, out / "lora.safetensors", "blue_square_fp_te.safetensors")
    assert after < 0.85 * before, (before, after)


def test_one_frame_training_lowers_the_loss(ws, tmp_path):
    toml = write_one_frame_dataset(tmp_path, alpha=False)
    ws.cache(toml, "--one_frame")
    out = tmp_path / "out"
    assert run(fpack_train_network.main, ws.train_args(toml, out, 30, "--one_frame")) == 0
    sections = _sections(toml)
    assert "latents_clean_4x" not in sections[0]  # the trainer fills the zero 2x/4x history in
    before, after = _loss_before_after(ws, toml, out / "lora.safetensors", "red_fp_te.safetensors")
    assert after < 0.9 * before, (before, after)


def test_a_cache_written_as_the_reference_writes_it_trains(ws, vanilla, tmp_path, fresh_accelerate_state):
    """Keys as the reference's save_latent_cache_framepack writes them: every latents_* key carries the TARGET's
    FxHxW (even the 2-frame and 16-frame history), indices keep their int64 dtype, the section joins the window."""
    cache = tmp_path / "cache"
    cache.mkdir()
    ours = sorted((vanilla.parent / "cache").glob("*-0001_*_fp.safetensors"))[0]
    sd, _ = read_cache(ours)
    f, h, w = sd["latents"].shape[1:]
    ref = {f"latents_{f}x{h}x{w}_float16": sd["latents"].half(),
           f"latents_clean_{f}x{h}x{w}_float16": sd["latents_clean"].half(),
           f"latents_clean_2x_{f}x{h}x{w}_float16": sd["latents_clean_2x"].half(),
           f"latents_clean_4x_{f}x{h}x{w}_float16": sd["latents_clean_4x"].half(),
           "image_embeddings_float16": sd["image_embeddings"].half()}
    for key in ("latent_indices", "clean_latent_indices", "clean_latent_2x_indices", "clean_latent_4x_indices"):
        ref[f"{key}_int64"] = sd[key]
    meta = {"architecture": "framepack", "width": "32", "height": "32", "format_version": "1.0.1", "frame_count": "17"}
    save_file(ref, str(cache / "clip_00000-017-0001_0032x0032_fp.safetensors"), metadata=meta)
    text = load_file(str(vanilla.parent / "cache" / "blue_square_fp_te.safetensors"))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in text.items()}, str(cache / "clip_fp_te.safetensors"),
              metadata={"architecture": "framepack", "caption1": "a blue square moving", "format_version": "1.0.1"})
    toml = tmp_path / "dataset.toml"
    toml.write_text(vanilla.read_text().replace((vanilla.parent / "cache").as_posix(), cache.as_posix()))
    out = tmp_path / "out"
    args = ws.train_args(toml, out, 3)
    args[args.index("--mixed_precision") + 1] = "bf16"  # a bf16 DiT on fp16 caches with bool masks, int64 indices
    assert run(fpack_train_network.main, args) == 0
    assert (out / "lora.safetensors").is_file()


def test_dataset_kind_and_flags_are_checked_before_models_load(ws, tmp_path, capsys):
    missing_vae = ["--vae", str(tmp_path / "missing.pt"), "--image_encoder", str(ws.siglip)]
    images = write_one_frame_dataset(tmp_path / "images", alpha=False)
    assert run(fpack_cache_latents.main, ["--dataset_config", str(images), *missing_vae]) == 2
    assert "FramePack trains on video datasets; for image datasets with control images add --one_frame" in \
        capsys.readouterr().err
    images.write_text("\n".join(line for line in images.read_text().splitlines()
                                 if not line.startswith("control_directory")))
    assert run(fpack_cache_latents.main, ["--dataset_config", str(images), *missing_vae, "--one_frame"]) == 2
    assert "has no control image; --one_frame needs one per fp_1f_clean_indices entry" in capsys.readouterr().err
    videos = write_video_dataset(tmp_path / "videos")
    assert run(fpack_cache_latents.main, ["--dataset_config", str(videos), *missing_vae, "--one_frame"]) == 2
    assert "--one_frame trains on image datasets with control images" in capsys.readouterr().err
    assert run(fpack_cache_latents.main, ["--dataset_config", str(videos), "--vae", "x.pt"]) == 2
    assert "--image_encoder is required" in capsys.readouterr().err
    assert run(fpack_cache_latents.main, ["--dataset_config", str(videos), *missing_vae, "--one_frame_no_2x"]) == 2
    assert "only apply with --one_frame" in capsys.readouterr().err


def test_training_refuses_caches_of_another_kind(ws, tmp_path, capsys):
    toml = write_video_dataset(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    save_file({"latents_2x4x4_float32": torch.zeros(16, 2, 4, 4)},
              str(cache / "blue_square_00000-017_0032x0032_fp.safetensors"), metadata={"architecture": "framepack"})
    save_file({"llama_vec_float32": torch.zeros(512, 32)}, str(cache / "blue_square_fp_te.safetensors"))
    assert run(fpack_train_network.main, ws.train_args(toml, tmp_path / "out", 1)) == 2
    assert "is not a FramePack section cache (no latent_indices, latents_clean" in capsys.readouterr().err
