"""WanArchitecture on tiny models: I2V caching contents and the image branch in training, and --fp8_base through the
real trainer."""

import argparse
import math

import pytest
import torch
from torch import nn

from musubi_tuner.architectures import get_architecture
from musubi_tuner.architectures.wan.architecture import WanLatentEncoders
from musubi_tuner.architectures.wan.clip_files import encode_images_clip
from musubi_tuner.architectures.wan.dit_files import save_wan_dit_original
from musubi_tuner.architectures.wan.tiny import (
    TINY_CLIP_DIM,
    TINY_CLIP_TOKENS,
    TINY_TEXT_DIM,
    make_tiny_dit,
    make_tiny_vae,
)
from musubi_tuner.architectures.wan.tiny_encoders import build_tiny_wan_clip
from musubi_tuner.dataset.cache_files import latent_cache_name, latent_metadata, text_cache_name, write_cache
from musubi_tuner.dataset.items import ItemPixels
from musubi_tuner.memory.fp8 import Fp8StorageLinear
from musubi_tuner.networks import lora
from musubi_tuner.training.cli import parse_training_args
from musubi_tuner.training.trainer import NetworkTrainer

WAN = get_architecture("wan")
FRAMES, SIDE = 9, 32  # -> latents (16, 3, 4, 4)


@pytest.fixture(scope="module")
def i2v_contents():
    """Two 9-frame clips through encode_latents with --i2v, the tiny VAE and the tiny CLIP."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, FRAMES, SIDE, SIDE, 3), generator=generator, dtype=torch.uint8)
    encoders = WanLatentEncoders(vae=make_tiny_vae(), clip=build_tiny_wan_clip())
    contents = WAN.encode_latents(encoders, [ItemPixels(p) for p in pixels], argparse.Namespace(i2v=True))
    return pixels, encoders, contents


def test_i2v_caches_mask_and_image_latents_and_clip(i2v_contents):
    pixels, encoders, contents = i2v_contents
    for i, content in enumerate(contents):
        assert set(content) == {"latents", "latents_image", "clip"}
        latents, image = content["latents"], content["latents_image"]
        assert latents.shape == (16, 3, 4, 4)
        assert image.shape == (4 + 16, 3, 4, 4)
        mask = image[:4]
        assert torch.equal(mask[:, 0], torch.ones_like(mask[:, 0]))  # first latent frame: the given image
        assert torch.equal(mask[:, 1:], torch.zeros_like(mask[:, 1:]))  # the rest: to be generated
        # the VAE is causal in time: latent frame 0 of [first frame, zeros...] is that of the clip itself
        assert torch.allclose(image[4:, 0], latents[:, 0], atol=1e-5, rtol=0)
        assert not torch.allclose(image[4:, 1:], latents[:, 1:], atol=1e-2)  # later frames are the zero frames'
        assert content["clip"].shape == (TINY_CLIP_TOKENS, TINY_CLIP_DIM) and content["clip"].dtype == torch.float16
        expected_clip = encode_images_clip(encoders.clip, pixels[i : i + 1, 0])[0].to(torch.float16)
        assert torch.equal(content["clip"], expected_clip)


def test_without_i2v_only_latents_are_cached(i2v_contents):
    pixels, encoders, contents = i2v_contents
    plain = WAN.encode_latents(encoders, [ItemPixels(pixels[0])], argparse.Namespace(i2v=False))
    assert set(plain[0]) == {"latents"}
    assert torch.allclose(plain[0]["latents"], contents[0]["latents"], atol=1e-5, rtol=0)  # batch of 1 vs 2


def _i2v_batch(contents):
    generator = torch.Generator().manual_seed(1)
    return {
        "latents": torch.stack([c["latents"] for c in contents]),
        "latents_image": torch.stack([c["latents_image"] for c in contents]),
        "clip": torch.stack([c["clip"] for c in contents]),
        "t5": [torch.randn(7, TINY_TEXT_DIM, generator=generator), torch.randn(12, TINY_TEXT_DIM, generator=generator)],
    }


def test_i2v_predict_uses_the_image_branch(i2v_contents):
    _, _, contents = i2v_contents
    batch = _i2v_batch(contents)
    dit = make_tiny_dit("i2v-14B")
    network = lora.create_network(WAN, dit, 4, 4)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "lora_up" in name:
                param.normal_(std=0.1)
    network.apply_to()
    network.prepare_optimizer_params(1e-3)  # marks the LoRA weights trainable, as the trainer does
    noisy = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(2))
    timesteps = torch.tensor([300.0, 700.0])
    out = WAN.predict(dit, batch, noisy, timesteps)
    assert out.shape == noisy.shape and out.dtype == noisy.dtype and torch.isfinite(out).all()
    out.square().mean().backward()
    by_name = {m.original_name: m for m in network.loras}
    for name in ("blocks.0.cross_attn.k_img", "blocks.1.cross_attn.v_img"):
        for matrix in (by_name[name].lora_down, by_name[name].lora_up):
            assert matrix.weight.grad is not None and matrix.weight.grad.abs().sum() > 0, name
    with torch.no_grad():  # and the CLIP context changes the prediction
        other = WAN.predict(dit, {**batch, "clip": torch.zeros_like(batch["clip"])}, noisy, timesteps)
    assert (other - out.detach()).abs().max() > 1e-4


# ---- --fp8_base through the trainer ---------------------------------------------------------------------------------
def _write_cached_dataset(root, items=2):
    """Latent and text caches named as the caching scripts write them, and the dataset TOML."""
    generator = torch.Generator().manual_seed(0)
    images, cache = root / "images", root / "cache"
    images.mkdir(parents=True)
    for i in range(items):
        stem = f"item{i}"
        write_cache(cache / latent_cache_name(stem, (32, 32), "wan"),
                    {"latents": torch.randn(16, 1, 4, 4, generator=generator)}, WAN.traits,
                    latent_metadata((32, 32), None))
        text = torch.randn(5 + i, TINY_TEXT_DIM, generator=generator)  # prompts of different lengths
        write_cache(cache / text_cache_name(stem, "wan"), {"varlen_t5": text}, WAN.traits, {"caption1": f"caption {i}"})
    toml = root / "dataset.toml"
    toml.write_text('[general]\nresolution = [32, 32]\ncaption_extension = ".txt"\nbatch_size = 1\n\n'
                    f'[[datasets]]\nimage_directory = "{images.as_posix()}"\ncache_directory = "{cache.as_posix()}"\n')
    return toml


class RecordingTrainer(NetworkTrainer):
    """Keeps each step's loss and the LoRA gradients as they are just before the optimizer step."""

    def _train_step(self, *args, **kwargs):
        loss = super()._train_step(*args, **kwargs)
        self.losses = [*getattr(self, "losses", []), loss]
        return loss

    def _average_gradients(self):
        super()._average_gradients()
        self.grads = {n: p.grad.clone() for n, p in self.network.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_fp8_base_training_step(tmp_path, mixed_precision, fresh_accelerate_state):
    dit_path = tmp_path / "wan2.1_t2v_tiny.safetensors"
    save_wan_dit_original(make_tiny_dit("t2v-1.3B"), dit_path)
    toml = _write_cached_dataset(tmp_path / "data")
    args = parse_training_args(WAN, [
        "--task", "t2v-1.3B", "--dit", str(dit_path), "--dataset_config", str(toml), "--fp8_base",
        "--mixed_precision", mixed_precision, "--network_dim", "4", "--network_alpha", "4", "--max_train_steps", "1",
        "--learning_rate", "1e-3", "--seed", "0", "--output_dir", str(tmp_path / "out"), "--output_name", "fp8"])
    trainer = RecordingTrainer(WAN, args)
    saved = trainer.train()
    assert saved.is_file()

    linears = {n: m for n, m in trainer.dit.named_modules() if isinstance(m, nn.Linear)}
    in_blocks = {n: m for n, m in linears.items() if n.startswith("blocks.")}
    assert len(in_blocks) == 2 * 10
    for name, layer in linears.items():  # the reference's plain --fp8_base: every Linear, embedders and head too
        assert type(layer) is Fp8StorageLinear and layer.weight.dtype == torch.float8_e4m3fn, name
    compute = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    assert trainer.dit.patch_embedding.weight.dtype in (compute, torch.float32)  # non-Linear weights keep theirs

    assert len(trainer.losses) == 1 and math.isfinite(trainer.losses[0]) and trainer.losses[0] > 0
    ups = {n: g for n, g in trainer.grads.items() if "lora_up" in n}
    assert len(ups) == len(trainer.network.loras) == 20
    for name, grad in ups.items():  # lora_up starts at zero, so the first step's gradient lands on the up matrices
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_i2v_caches_without_clip_train_wan22_i2v_only():
    """`--i2v` without `--clip` (as the reference allows) writes the image latents only: enough for Wan2.2 I2V-A14B,
    whose DiT has no CLIP branch; Wan2.1 I2V training refuses them naming the flag to add."""
    from musubi_tuner.errors import UserError

    arch = get_architecture("wan")
    assert arch.latent_cache_contents(argparse.Namespace(i2v=True, clip=None)) == {"latents", "latents_image"}
    assert arch.latent_cache_contents(argparse.Namespace(i2v=True, clip="c.pth")) == {"latents", "latents_image", "clip"}
    keys = {"a_0032x0032_wan.safetensors": {"latents", "latents_image"}}
    arch.check_training_caches(keys, argparse.Namespace(task="i2v-A14B"))
    with pytest.raises(UserError, match=r"a_0032x0032_wan.safetensors has no clip: --task i2v-14B .*--i2v --clip"):
        arch.check_training_caches(keys, argparse.Namespace(task="i2v-14B"))
    with pytest.raises(UserError, match=r"has no latents_image: --task i2v-A14B needs I2V caches. Re-run "
                                        r"wan_cache_latents.py --i2v \("):
        arch.check_training_caches({"a_0032x0032_wan.safetensors": {"latents"}}, argparse.Namespace(task="i2v-A14B"))
