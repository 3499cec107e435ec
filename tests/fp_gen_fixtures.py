"""Conditioning stand-ins for the FramePack generation tests (the tiny DiT is fp-model's `tiny_framepack_dit`)."""

import torch

from musubi_tuner.architectures.framepack.sampling import SectionImage, TextCondition
from musubi_tuner.architectures.framepack.tiny import tiny_framepack_config


def text_condition(seed, prompt="p", length=6):
    config = tiny_framepack_config()
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 8, dtype=torch.long)
    mask[:, :length] = 1
    return TextCondition(torch.randn(1, 8, config["text_embed_dim"], generator=g), mask,
                         torch.randn(1, config["pooled_projection_dim"], generator=g), prompt)


def section_image(seed, h=4, w=4):
    g = torch.Generator().manual_seed(seed)
    dim = tiny_framepack_config()["image_proj_dim"]
    return SectionImage(torch.randn(1, 16, 1, h, w, generator=g), torch.randn(1, 5, dim, generator=g))
