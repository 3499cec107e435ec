"""HunyuanVideo's two text encoders, their tokenizers and prompt encoding (shared with FramePack).

Encoding follows the reference (`hunyuan_model/text_encoder.py`, `cache_text_encoder_outputs.py`):
- LLM: the prompt wrapped in the video template, tokenized to crop + 256 tokens (right padding), run with
  the attention mask; the hidden state two layers before the last (`hidden_states[-3]`, no final norm);
  the template's tokens cropped off -> `llm` (256, hidden) and `llm_mask` (256,), padding kept.
- CLIP-L: 77 tokens, pooled output (final hidden state at the first end-of-text token) -> `clipL` (hidden,),
  and its attention mask `clipL_mask` (77,), which the reference writes too.
The cache writer turns these content names into the reference's keys `llm_{dtype}`, `llm_mask`,
`clipL_{dtype}`, `clipL_mask`, so caches move between the two tools both ways.

Tokenizers, nothing fetched: `--llm_tokenizer` / `--clip_tokenizer` when given; else the tokenizer files
inside the text encoder folder (official layout) or in its sibling `tokenizer` / `tokenizer_2` folder
(diffusers layout); else the reference's hub repos in the already-filled Hugging Face cache.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from musubi_tuner.errors import UserError
from musubi_tuner.models.clip_text import CLIP_TOKENIZER_FLAG, CLIP_TOKENIZER_HUB_ID, clip_input_ids, load_clip_l
from musubi_tuner.models.hunyuan_video.prompt_template import (
    IMAGE_TEMPLATE,
    VIDEO_TEMPLATE,
    apply_template,
    template_crop,
)
from musubi_tuner.models.hunyuan_video.llm_files import load_llava_llama3
from musubi_tuner.models.tokenizers import TOKENIZER_FILES, resolve_tokenizer

LLM_TOKENIZER_FLAG = "--llm_tokenizer"
LLM_TOKENIZER_HUB_ID = "xtuner/llava-llama-3-8b-v1_1-transformers"
"""Where the reference downloads the LLM tokenizer from when text encoder 1 is a single file."""
LLM_MAX_LENGTH = 256
"""Prompt tokens kept after the template crop (the reference's `text_len`)."""
LLM_SKIP_LAYERS = 2
"""The LLM output is the hidden state this many layers before the last (`hidden_states[-3]`)."""
DEFAULT_TEXT_ENCODER_DTYPE = torch.float16
"""The reference's default for both encoders (`--text_encoder_dtype`)."""


@dataclass
class HunyuanTextEncoders:
    llm: nn.Module
    """`LlamaModel` (text encoder 1)."""
    llm_tokenizer: Any
    clip: nn.Module
    """`CLIPTextModel` (text encoder 2)."""
    clip_tokenizer: Any


def add_text_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    """The text-encoder flags of HunyuanVideo's caching, training and generation scripts."""
    parser.add_argument("--text_encoder1", default=None,
                        help="text encoder 1 (LLaVA-LLaMA-3-8B): llava_llama3_fp16.safetensors or the text_encoder "
                             "folder")
    parser.add_argument("--text_encoder2", default=None,
                        help="text encoder 2 (CLIP-L): clip_l.safetensors or the text_encoder_2 folder")
    parser.add_argument("--text_encoder_dtype", default=None,
                        help="dtype of both text encoders and of their cached outputs (default float16)")
    parser.add_argument("--fp8_llm", action="store_true",
                        help="store text encoder 1's Linear weights in float8_e4m3fn (computed in "
                             "--text_encoder_dtype); about half the memory")
    parser.add_argument(LLM_TOKENIZER_FLAG, default=None,
                        help="folder with the LLaVA-LLaMA-3 tokenizer (tokenizer.json); default: the one in or "
                             f"beside the --text_encoder1 folder, else {LLM_TOKENIZER_HUB_ID} from the HF cache")
    parser.add_argument(CLIP_TOKENIZER_FLAG, default=None,
                        help="folder with the CLIP tokenizer; default: the one in or beside the --text_encoder2 "
                             f"folder, else {CLIP_TOKENIZER_HUB_ID} from the HF cache")


# ---- tokenizers --------------------------------------------------------------------------------
def _tokenizer_beside(encoder_path: str | None, sibling: str) -> Path | None:
    """The tokenizer folder of an encoder folder: itself (official layout) or `../<sibling>` (diffusers)."""
    if not encoder_path or not Path(encoder_path).is_dir():
        return None
    for folder in (Path(encoder_path), Path(encoder_path).parent / sibling):
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            return folder
    return None


def load_llm_tokenizer(llm_tokenizer: str | None = None, text_encoder1: str | None = None):
    """The LLaVA-LLaMA-3 tokenizer, read as its tokenizer.json is written, padding on the right."""
    local = llm_tokenizer or _tokenizer_beside(text_encoder1, "tokenizer")
    tokenizer = resolve_tokenizer(LLM_TOKENIZER_FLAG, local, LLM_TOKENIZER_HUB_ID, as_written=True)
    if tokenizer.pad_token is None:
        raise UserError(f"{LLM_TOKENIZER_FLAG}: the tokenizer has no padding token; use the llava-llama-3 "
                        f"tokenizer folder ({LLM_TOKENIZER_HUB_ID}), whose tokenizer_config.json names one")
    tokenizer.padding_side = "right"  # the template must start every sequence: the crop counts from the left
    return tokenizer


def load_clip_tokenizer(clip_tokenizer: str | None = None, text_encoder2: str | None = None):
    local = clip_tokenizer or _tokenizer_beside(text_encoder2, "tokenizer_2")
    return resolve_tokenizer(CLIP_TOKENIZER_FLAG, local, CLIP_TOKENIZER_HUB_ID)


# ---- models ------------------------------------------------------------------------------------
def text_encoder_dtype(args: argparse.Namespace) -> torch.dtype:
    from musubi_tuner.architectures.common import str_to_dtype  # the one flag parser for dtypes

    return str_to_dtype(getattr(args, "text_encoder_dtype", None), DEFAULT_TEXT_ENCODER_DTYPE, "--text_encoder_dtype")


def load_hunyuan_text_encoders(args: argparse.Namespace, device: torch.device | str) -> HunyuanTextEncoders:
    """Both encoders and tokenizers from `--text_encoder1/2`, `--text_encoder_dtype`, `--fp8_llm`,
    `--llm_tokenizer`, `--clip_tokenizer`. Tokenizers are resolved first: a missing one fails before
    the 16 GB LLM is read."""
    if not args.text_encoder1 or not args.text_encoder2:
        raise UserError("HunyuanVideo needs both text encoders: --text_encoder1 llava_llama3_fp16.safetensors "
                        "--text_encoder2 clip_l.safetensors (or the text_encoder / text_encoder_2 folders)")
    dtype = text_encoder_dtype(args)
    llm_tokenizer = load_llm_tokenizer(getattr(args, "llm_tokenizer", None), args.text_encoder1)
    clip_tokenizer = load_clip_tokenizer(getattr(args, "clip_tokenizer", None), args.text_encoder2)
    llm = load_llava_llama3(args.text_encoder1, device=device, dtype=dtype, fp8=bool(getattr(args, "fp8_llm", False)))
    clip = load_clip_l(args.text_encoder2, device=device, dtype=dtype)
    return HunyuanTextEncoders(llm=llm, llm_tokenizer=llm_tokenizer, clip=clip, clip_tokenizer=clip_tokenizer)


# ---- encoding ----------------------------------------------------------------------------------
@torch.no_grad()
def encode_llm(llm: nn.Module, tokenizer, prompts: list[str], *, image_template: bool = False,
               template: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states (B, 256, hidden) in the LLM's dtype, attention mask (B, 256) int64), both on the CPU.

    template: a template of one's own with `{}` for the prompt (`system_prompt_template`); default HunyuanVideo's
    video template (image_template: its image one)."""
    template = template or (IMAGE_TEMPLATE if image_template else VIDEO_TEMPLATE)
    crop = template_crop(tokenizer, template)
    tokens = tokenizer([apply_template(template, p) for p in prompts], max_length=crop + LLM_MAX_LENGTH,
                       padding="max_length", truncation=True, return_tensors="pt")
    mask = tokens["attention_mask"]
    out = llm(input_ids=tokens["input_ids"].to(llm.device), attention_mask=mask.to(llm.device),
              output_hidden_states=True)
    hidden = out.hidden_states[-(LLM_SKIP_LAYERS + 1)]
    return hidden[:, crop:].cpu(), mask[:, crop:]


@torch.no_grad()
def encode_clip(clip: nn.Module, tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled output (B, hidden) in CLIP's dtype, attention mask (B, 77) int64), both on the CPU."""
    tokens = clip_input_ids(tokenizer, prompts)
    mask = tokens["attention_mask"]
    pooled = clip(input_ids=tokens["input_ids"].to(clip.device), attention_mask=mask.to(clip.device)).pooler_output
    return pooled.cpu(), mask


def encode_hunyuan_prompts(encoders: HunyuanTextEncoders, prompts: list[str], *, image_template: bool = False
                           ) -> list[dict[str, torch.Tensor]]:
    """One content dict per prompt: `llm` (256, hidden), `llm_mask` (256,), `clipL` (hidden,), `clipL_mask` (77,).

    image_template: use HunyuanVideo's image template instead of the video one (the reference never does;
    its crop is counted the same way).
    """
    llm, llm_mask = encode_llm(encoders.llm, encoders.llm_tokenizer, prompts, image_template=image_template)
    clip, clip_mask = encode_clip(encoders.clip, encoders.clip_tokenizer, prompts)
    return [{"llm": e, "llm_mask": m, "clipL": c, "clipL_mask": cm}
            for e, m, c, cm in zip(llm, llm_mask, clip, clip_mask)]
