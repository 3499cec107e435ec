"""HunyuanVideo end to end through the four reference-named scripts on tiny files in the official layouts:
cache latents -> cache text -> train (loss goes down) -> generate (reproducible by seed; v2v; SkyReels I2V)
-> merge; reference cache names and keys; exact resume."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from wan_fixtures import run, write_clip_dataset

from musubi_tuner import cache_latents, cache_text_encoder_outputs, hv_generate_video, hv_train_network, merge_lora
from musubi_tuner.architectures import get_architecture
from musubi_tuner.architectures.hunyuan_video.tiny import write_tiny_hv_dit
from musubi_tuner.models.hunyuan_video.tiny_text import write_tiny_hunyuan_text_files
from musubi_tuner.models.hunyuan_video.tiny_vae import write_tiny_hv_vae

ARCH = get_architecture("hunyuan_video")


@dataclass
class HvWorkspace:
    root: Path
    dit: Path
    vae: Path
    text: dict
    toml: Path

    @property
    def vae_args(self) -> list[str]:
        return ["--vae", str(self.vae), "--vae_dtype", "float32"]

    @property
    def te_args(self) -> list[str]:
        return ["--text_encoder1", str(self.text["llm"]), "--text_encoder2", str(self.text["clip_l"]),
                "--llm_tokenizer", str(self.text["llm_tokenizer"]), "--clip_tokenizer", str(self.text["clip_tokenizer"]),
                "--text_encoder_dtype", "float32"]

    def train_args(self, output_dir: Path, steps: int, *extra: str) -> list[str]:
        return ["--dit", str(self.dit), "--dataset_config", str(self.toml), *self.vae_args, *self.te_args,
                "--mixed_precision", "no", "--network_module", "networks.lora", "--network_dim", "4",
                "--network_alpha", "4", "--optimizer_type", "adamw", "--learning_rate", "1e-3",
                "--max_train_steps", str(steps), "--seed", "123", "--output_dir", str(output_dir),
                "--output_name", "lora", *extra]

    def generate_args(self, save: Path, *extra: str) -> list[str]:
        return ["--dit", str(self.dit), *self.vae_args, *self.te_args, "--device", "cpu", "--save_path", str(save),
                "--video_size", "32", "32", "--video_length", "5", "--infer_steps", "3", *extra]


@pytest.fixture(scope="module")
def ws(one_thread, tmp_path_factory) -> HvWorkspace:
    root = tmp_path_factory.mktemp("hv")
    w = HvWorkspace(root=root, dit=write_tiny_hv_dit(root / "models", "official_pt"),
                    vae=write_tiny_hv_vae(root / "models" / "vae", "official_pt"),
                    text=write_tiny_hunyuan_text_files(root / "models" / "text"),
                    toml=write_clip_dataset(root / "data"))
    assert run(cache_latents.main, ["--dataset_config", str(w.toml), *w.vae_args, "--vae_chunk_size", "2",
                                    "--device", "cpu"]) == 0
    assert run(cache_text_encoder_outputs.main, ["--dataset_config", str(w.toml), *w.te_args, "--batch_size", "16",
                                                 "--device", "cpu"]) == 0
    return w


def test_caches_have_the_reference_names_and_keys(ws):
    img = sorted(p.name for p in (ws.root / "data" / "cache_img").iterdir())
    vid = sorted(p.name for p in (ws.root / "data" / "cache_vid").iterdir())
    assert img == ["green_dot_0032x0032_hv.safetensors", "green_dot_hv_te.safetensors",
                   "red_dot_0032x0032_hv.safetensors", "red_dot_hv_te.safetensors"]
    assert vid == ["blue_square_00000-005_0032x0032_hv.safetensors", "blue_square_hv_te.safetensors"]
    with safe_open(str(ws.root / "data" / "cache_vid" / vid[0]), "pt") as f:
        assert list(f.keys()) == ["latents_2x4x4_float32"]
        assert f.metadata()["architecture"] == "hunyuan_video"
    with safe_open(str(ws.root / "data" / "cache_vid" / vid[1]), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert f.metadata()["caption1"] == "a blue square moving"
    assert shapes == {"llm_float32": (256, 32), "llm_mask": (256,), "clipL_float32": (32,), "clipL_mask": (77,)}


def _eval_loss(dit_path: Path, cache_dir: Path) -> float:
    """Flow-matching loss on the cached clip at fixed timesteps and noise, through the training path."""
    from musubi_tuner.architectures.hunyuan_video.dit_files import load_hv_dit
    from musubi_tuner.dataset.cache_files import read_cache

    dit = load_hv_dit(dit_path, dtype=torch.float32)
    latents, _ = read_cache(next(cache_dir.glob("*_0032x0032_hv.safetensors")))
    text, _ = read_cache(next(cache_dir.glob("*_hv_te.safetensors")))
    batch = {k: v[None] for k, v in text.items()}
    batch.update(ARCH.training_conditioning(type("A", (), {"guidance_scale": 1.0})()))
    x0 = ARCH.latents_from_cache(latents["latents"][None].float())
    gen = torch.Generator().manual_seed(0)
    losses = []
    for t in (0.2, 0.4, 0.6, 0.8):
        noise = torch.randn(x0.shape, generator=gen)
        with torch.no_grad():
            pred = ARCH.predict(dit, batch, (1 - t) * x0 + t * noise, torch.tensor([t * 1000.0]))
        losses.append(torch.mean((pred - (noise - x0)) ** 2).item())
    return sum(losses) / len(losses)


def test_train_overfits_one_clip_then_merge_lora_bakes_it_in(ws, tmp_path):
    toml = tmp_path / "clip.toml"
    text = ws.toml.read_text()
    first = text.index("[[datasets]]")
    toml.write_text(text[:first] + text[text.index("[[datasets]]", first + 1):])  # the video dataset only
    out = tmp_path / "out"
    args = ws.train_args(out, 25, "--learning_rate", "1e-2", "--network_dim", "8", "--network_alpha", "8",
                         "--timestep_sampling", "shift", "--discrete_flow_shift", "7.0")
    args[args.index("--dataset_config") + 1] = str(toml)
    assert run(hv_train_network.main, args) == 0
    sd = load_file(str(out / "lora.safetensors"))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in sd
    assert "lora_unet_single_blocks_1_linear1.lora_up.weight" in sd
    assert not any("_mod_" in k or "modulation" in k for k in sd)
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["modelspec.architecture"].startswith("hunyuan-video")
    merged = tmp_path / "merged.pt"
    assert run(merge_lora.main, ["--dit", str(ws.dit), "--dit_in_channels", "16", "--lora_weight",
                                 str(out / "lora.safetensors"), "--lora_multiplier", "1.0",
                                 "--save_merged_model", str(merged.with_suffix(".safetensors"))]) == 0
    cache = ws.root / "data" / "cache_vid"
    before, after = _eval_loss(ws.dit, cache), _eval_loss(merged.with_suffix(".safetensors"), cache)
    assert after < 0.85 * before, (before, after)


def test_resumed_run_gives_the_same_lora_as_an_uninterrupted_one(ws, tmp_path):
    extra = ["--gradient_accumulation_steps", "2", "--save_every_n_steps", "2", "--save_state"]
    full = tmp_path / "full"
    assert run(hv_train_network.main, ws.train_args(full, 4, *extra)) == 0
    resumed = tmp_path / "resumed"
    assert run(hv_train_network.main, ws.train_args(resumed, 4, *extra, "--resume",
                                                    str(full / "lora-step00000002-state"))) == 0
    a, b = load_file(str(full / "lora.safetensors")), load_file(str(resumed / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _latent(folder: Path) -> torch.Tensor:
    (path,) = folder.glob("*_latent.safetensors")
    return load_file(str(path))["latent"]


def test_generate_is_reproducible_by_seed_and_video_to_video_follows_the_source(ws, tmp_path):
    for name in ("a", "b"):
        assert run(hv_generate_video.main, ws.generate_args(tmp_path / name, "--prompt", "a blue square moving",
                                                           "--seed", "5", "--output_type", "both")) == 0
    a, b = _latent(tmp_path / "a"), _latent(tmp_path / "b")
    assert a.shape == (16, 2, 4, 4) and torch.equal(a, b)
    assert len(list((tmp_path / "a").glob("*.mp4"))) == 1
    source = next((ws.root / "data" / "videos").glob("*.mp4"))
    v2v = ["--prompt", "a blue square moving", "--seed", "5", "--output_type", "latent", "--video_path", str(source)]
    assert run(hv_generate_video.main, ws.generate_args(tmp_path / "v1", *v2v, "--strength", "0.34")) == 0
    assert run(hv_generate_video.main, ws.generate_args(tmp_path / "v2", *v2v, "--strength", "1.0")) == 0
    # strength 1.0 runs every step from the noise alone: the same as plain generation
    assert torch.allclose(_latent(tmp_path / "v2"), a, atol=1e-5)
    assert not torch.allclose(_latent(tmp_path / "v1"), a, atol=1e-3)


def test_skyreels_i2v_generation_needs_its_start_image(ws, tmp_path):
    i2v = write_tiny_hv_dit(tmp_path / "i2v", "comfy", in_channels=32)
    image = next((ws.root / "data" / "images").glob("*.png"))
    args = ws.generate_args(tmp_path / "out", "--prompt", "a red dot", "--seed", "1", "--output_type", "latent",
                            "--image_path", str(image), "--dit_in_channels", "32")
    args[args.index("--dit") + 1] = str(i2v)
    assert run(hv_generate_video.main, args) == 0
    assert _latent(tmp_path / "out").shape == (16, 2, 4, 4)
    # without an image the I2V model is refused before any model loads
    no_image = [a for a in args if a not in ("--image_path", str(image))]
    assert run(hv_generate_video.main, no_image) == 2


def test_memory_switches_train_and_generate(ws, tmp_path):
    """The shared memory layer on HunyuanVideo's double and single blocks: block swap gives the plain numbers
    exactly (training with checkpointing, and generation); --fp8_base/--fp8_scaled and --fp8 run end to end."""
    plain, swapped = tmp_path / "plain", tmp_path / "swapped"
    assert run(hv_train_network.main, ws.train_args(plain, 2, "--gradient_checkpointing")) == 0
    assert run(hv_train_network.main, ws.train_args(swapped, 2, "--gradient_checkpointing",
                                                    "--blocks_to_swap", "2")) == 0
    a, b = load_file(str(plain / "lora.safetensors")), load_file(str(swapped / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fp8 = tmp_path / "fp8"
    assert run(hv_train_network.main, ws.train_args(fp8, 2, "--fp8_base", "--fp8_scaled")) == 0
    assert all(torch.isfinite(v).all() for v in load_file(str(fp8 / "lora.safetensors")).values())
    common = ["--prompt", "a blue square moving", "--seed", "5", "--output_type", "latent"]
    assert run(hv_generate_video.main, ws.generate_args(tmp_path / "g_plain", *common)) == 0
    assert run(hv_generate_video.main, ws.generate_args(tmp_path / "g_swap", *common, "--blocks_to_swap", "2")) == 0
    assert torch.equal(_latent(tmp_path / "g_swap"), _latent(tmp_path / "g_plain"))
    assert run(hv_generate_video.main, ws.generate_args(tmp_path / "g_fp8", *common, "--fp8")) == 0
    assert torch.isfinite(_latent(tmp_path / "g_fp8")).all()
