"""Tiny FLUX.1 Kontext: the real classes at toy sizes, seeded, and writers for the real file layouts.

Widths fit together: T5 d_model 32 = DiT joint_attention_dim; CLIP hidden 32 = DiT pooled dim; AE
latent 16 channels packed 2x2 = DiT in_channels 64. The loaders infer every size from the weights,
so these files go through exactly the code paths of the real ones.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from musubi_tuner.architectures.flux_kontext.ae_files import (
    FLUX_AE_SCALING_FACTOR,
    FLUX_AE_SHIFT_FACTOR,
    flux_ae_to_bfl,
)
from musubi_tuner.architectures.flux_kontext.dit_files import diffusers_to_bfl
from musubi_tuner.architectures.flux_kontext.text_encoder_files import t5_encoder_config
from musubi_tuner.utils.atomic import atomic_directory, save_safetensors_atomic

TINY_DIT_CONFIG = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),
}
TINY_AE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (32, 32, 32, 32),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": FLUX_AE_SCALING_FACTOR,
    "shift_factor": FLUX_AE_SHIFT_FACTOR,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
    "force_upcast": True,
}
TINY_T5_VOCAB = 256  # = models.tokenizers.build_tiny_tokenizer's default vocabulary
TINY_T5_CONFIG = t5_encoder_config(vocab_size=TINY_T5_VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)
_CLIP_WORDS = (
    "a",
    "the",
    "of",
    "and",
    "with",
    "on",
    "in",
    "to",
    "photo",
    "picture",
    "cat",
    "dog",
    "bird",
    "red",
    "green",
    "blue",
    "white",
    "black",
    "big",
    "small",
    "make",
    "turn",
    "change",
    "add",
    "remove",
    "it",
    "into",
    "style",
    "background",
    "color",
    "sky",
    "tree",
    "house",
    "person",
    "image",
)
TINY_CLIP_VOCAB = 64
TINY_CLIP_CONFIG = {
    "vocab_size": TINY_CLIP_VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 32,
    "bos_token_id": TINY_CLIP_VOCAB - 2,
    "eos_token_id": TINY_CLIP_VOCAB - 1,
    "pad_token_id": 1,
}


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def tiny_flux_dit(seed: int = 0):
    """A seeded tiny `FluxTransformer2DModel` (2 double + 2 single blocks, 2 heads of 16)."""
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

    return _seeded(seed, lambda: FluxTransformer2DModel.from_config(TINY_DIT_CONFIG))


def tiny_flux_ae(seed: int = 0):
    """A seeded tiny FLUX `AutoencoderKL` (16 latent channels, 8x downsampling)."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    return _seeded(seed, lambda: AutoencoderKL.from_config(TINY_AE_CONFIG))


def tiny_t5(seed: int = 0):
    """A seeded tiny `T5EncoderModel` (d_model 32, 2 layers, gated-gelu)."""
    from transformers import T5Config, T5EncoderModel

    return _seeded(seed, lambda: T5EncoderModel(T5Config(**TINY_T5_CONFIG)))


def tiny_clip(seed: int = 0):
    """A seeded tiny `CLIPTextModel` (hidden 32, 2 layers, EOS = last vocabulary id)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return _seeded(seed, lambda: CLIPTextModel(CLIPTextConfig(**TINY_CLIP_CONFIG)))


def build_tiny_clip_tokenizer(out_dir: str | os.PathLike) -> Path:
    """A word-level CLIP-like tokenizer: `<|startoftext|>` = V-2, `<|endoftext|>` = V-1 (also padding)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from musubi_tuner.models.tokenizers import portable_tokenizer_config

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    words = ["<unk>", *_CLIP_WORDS]
    words += [f"tok{i}" for i in range(TINY_CLIP_VOCAB - 2 - len(words))]
    vocab = {w: i for i, w in enumerate(words + [bos, eos])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos, unk_token="<unk>", model_max_length=77
    )
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        wrapped.save_pretrained(str(tmp))
        portable_tokenizer_config(tmp / "tokenizer_config.json")
    return out_dir


def write_tiny_flux_kontext_files(
    out_dir: str | os.PathLike, comfy_prefix: bool = False, seed: int = 0
) -> dict[str, Path]:
    """Write the tiny models in the layouts users have; returns their paths.

    dit: BFL keys (with `model.diffusion_model.` when comfy_prefix); ae: BFL `ae.safetensors` keys;
    t5: ComfyUI t5xxl layout (HF keys, no `encoder.embed_tokens.weight`); clip_l: ComfyUI layout
    (`text_model.*` plus `text_projection.weight`); t5_tokenizer / clip_tokenizer: folders.
    The same `seed` gives the same weights as `tiny_flux_dit(seed)` etc.
    """
    from musubi_tuner.models.tokenizers import build_tiny_tokenizer

    out = Path(out_dir)
    prefix = "model.diffusion_model." if comfy_prefix else ""
    paths = {
        "dit": out / ("flux1-kontext-tiny-comfy.safetensors" if comfy_prefix else "flux1-kontext-tiny.safetensors"),
        "ae": out / "ae_tiny.safetensors",
        "t5": out / "t5xxl_tiny.safetensors",
        "clip_l": out / "clip_l_tiny.safetensors",
        "t5_tokenizer": out / "t5_tokenizer",
        "clip_tokenizer": out / "clip_tokenizer",
    }
    dit_sd = diffusers_to_bfl(tiny_flux_dit(seed).state_dict())
    save_safetensors_atomic({prefix + k: v for k, v in dit_sd.items()}, paths["dit"])
    save_safetensors_atomic(flux_ae_to_bfl(tiny_flux_ae(seed).state_dict()), paths["ae"])
    t5_sd = {k: v for k, v in tiny_t5(seed).state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_safetensors_atomic(t5_sd, paths["t5"])
    clip = tiny_clip(seed)
    clip_sd = {"text_model." + k: v for k, v in clip.state_dict().items()}
    clip_sd["text_projection.weight"] = torch.zeros(clip.config.projection_dim, clip.config.hidden_size)
    save_safetensors_atomic(clip_sd, paths["clip_l"])
    build_tiny_tokenizer(paths["t5_tokenizer"], vocab_size=TINY_T5_VOCAB)
    build_tiny_clip_tokenizer(paths["clip_tokenizer"])
    return paths
