"""Tiny Wan text/image encoders for tests and the demo: the same transformers classes, seeded, small.

`write_tiny_wan_encoder_files(out_dir)` saves them in the layouts users have (official Wan `.pth` files and
a tokenizer folder), so tests go through the real loaders.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from musubi_tuner.architectures.wan.clip_files import TINY_HEAD_DIM, clip_to_official
from musubi_tuner.architectures.wan.text_encoder_files import RELATIVE_MAX_DISTANCE, umt5_to_official
from musubi_tuner.models.tokenizers import build_tiny_tokenizer
from musubi_tuner.utils.atomic import atomic_path

TINY_UMT5 = dict(d_model=32, num_layers=2, num_heads=2, d_kv=16, d_ff=64, relative_attention_num_buckets=32)
TINY_CLIP = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, patch_size=14, image_size=56)
"""56 px / patch 14 -> 4x4 patches + class token = 17 tokens (Wan's real 224 px gives 257)."""
TINY_CLIP_OUT_DIM = 16
"""Width of the (ignored) projection head written into the tiny file, like Wan's 1024."""


def build_tiny_umt5(vocab_size: int, seed: int = 0) -> UMT5EncoderModel:
    """Seeded tiny umT5 encoder (gated-gelu FFN, per-layer relative position bias), eval, fp32."""
    config = UMT5Config(
        vocab_size=vocab_size,
        relative_attention_max_distance=RELATIVE_MAX_DISTANCE,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        **TINY_UMT5,
    )
    torch.manual_seed(seed)
    model = UMT5EncoderModel(config).eval()
    _perturb_norms(model)
    return model


def build_tiny_wan_clip(seed: int = 0) -> CLIPVisionModel:
    """Seeded tiny CLIP vision tower with Wan's choices (pre-norm, exact GELU), eval, fp32."""
    config = CLIPVisionConfig(
        num_attention_heads=TINY_CLIP["hidden_size"] // TINY_HEAD_DIM,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        **TINY_CLIP,
    )
    torch.manual_seed(seed)
    model = CLIPVisionModel(config).eval()
    _perturb_norms(model)
    return model


def _perturb_norms(model: torch.nn.Module) -> None:
    # Default init leaves norms at identity, so a swapped norm key would go unnoticed in tests.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))


def write_tiny_wan_encoder_files(out_dir: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Write a tiny tokenizer folder, umT5 `.pth` (official layout) and CLIP `.pth` (Wan layout).

    Returns {"tokenizer": dir, "t5": models_t5_umt5-xxl-enc-tiny.pth, "clip": models_clip_...-tiny.pth}.
    The CLIP file also holds a projection head, a text-tower tensor and `log_scale`, like the real one.
    """
    out_dir = Path(out_dir)
    tokenizer_dir = build_tiny_tokenizer(out_dir / "umt5_tokenizer")
    vocab_size = len(AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True))

    t5_path = out_dir / "models_t5_umt5-xxl-enc-tiny.pth"
    _save_torch(umt5_to_official(build_tiny_umt5(vocab_size, seed).state_dict()), t5_path)

    clip_path = out_dir / "models_clip_open-clip-xlm-roberta-large-vit-huge-14-tiny.pth"
    clip_sd = clip_to_official(build_tiny_wan_clip(seed).state_dict())
    generator = torch.Generator().manual_seed(seed)
    hidden = TINY_CLIP["hidden_size"]
    clip_sd["visual.head"] = torch.randn(hidden, TINY_CLIP_OUT_DIM, generator=generator)
    clip_sd["textual.token_embedding.weight"] = torch.randn(8, hidden, generator=generator)
    clip_sd["log_scale"] = torch.tensor(4.6052)
    _save_torch(clip_sd, clip_path)
    return {"tokenizer": tokenizer_dir, "t5": t5_path, "clip": clip_path}


def _save_torch(state: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().contiguous().clone() for k, v in state.items()}, tmp)
