"""FramePack generate session pieces that need no model files: section prompt encoding and section-wise decoding."""

import argparse

import torch

from musubi_tuner.architectures.framepack import generation_sections as gs
from musubi_tuner.architectures.framepack.generation_session import FramePackSession, encode_section_prompts
from musubi_tuner.inference.prompts import PromptSpec


class CountingEncoder:
    """Stands in for the architecture's encode_prompts: one call per text, content dicts of the cache layout."""

    def __init__(self):
        self.texts = []

    def encode_prompts(self, encoders, prompts, **kwargs):
        self.texts.extend(prompts)
        return [{"llama_vec": torch.full((4, 3), float(len(p))), "llama_attention_mask": torch.ones(4, dtype=torch.bool),
                 "clip_l_pooler": torch.full((2,), float(len(p)))} for p in prompts]


def test_section_prompts_are_encoded_once_each_and_negative_is_zero_without_cfg():
    enc = CountingEncoder()
    spec = PromptSpec(prompt="0:a;;;1-2:bb;;;-1:a", negative_prompt="bad", guidance_scale=1.0)
    prompts, negative = encode_section_prompts(enc, None, spec)
    assert enc.texts == ["a", "bb"]
    assert sorted(prompts) == [-1, 0, 1, 2]
    assert prompts[2].llama_vec.shape == (1, 4, 3) and prompts[2].llama_vec[0, 0, 0].item() == 2.0
    assert not negative.llama_vec.any() and not negative.clip_l_pooler.any()


def test_negative_prompt_is_encoded_with_cfg():
    enc = CountingEncoder()
    spec = PromptSpec(prompt="a cat", negative_prompt="blurry", guidance_scale=4.0)
    _prompts, negative = encode_section_prompts(enc, None, spec)
    assert enc.texts == ["a cat", "blurry"] and negative.prompt == "blurry"
    assert negative.llama_vec[0, 0, 0].item() == 6.0


class RepeatVae(torch.nn.Module):
    """A VAE stand-in with the causal frame rule: f latent frames -> 4(f-1)+1 frames, each latent's channel 0."""

    config = argparse.Namespace(scaling_factor=1.0)

    device, dtype = torch.device("cpu"), torch.float32

    def decode(self, z):
        first, rest = z[:, :1, :1], z[:, :1, 1:].repeat_interleave(4, dim=2)
        return argparse.Namespace(sample=torch.cat([first, rest], dim=2).repeat(1, 3, 1, 1, 1))


def _session(window, bulk=False):
    session = object.__new__(FramePackSession)
    session.latent_encoders = (RepeatVae(), None)
    session.args = argparse.Namespace(latent_window_size=window, bulk_decode=bulk, one_frame_inference=None)
    return session


def test_section_decode_length_matches_bulk_and_cross_fades_the_overlaps():
    window, sections = 2, 3
    frames = gs.total_latent_frames(sections, window)  # 7
    latents = torch.linspace(-1, 1, frames).view(1, 1, frames, 1, 1).repeat(1, 16, 1, 2, 2)
    by_section = _session(window).decode(latents, one_frame=False)
    bulk = _session(window, bulk=True).decode(latents, one_frame=False)
    assert by_section.shape == bulk.shape == (gs.total_pixel_frames(sections, window), 2, 2, 3)
    # this VAE maps a chunk starting at latent s onto bulk frames 4s.., so with the reference's chunk bounds and
    # overlap every cross-fade blends equal frames and the result is the bulk decode (up to uint8 rounding)
    assert (by_section.int() - bulk.int()).abs().max() <= 1
    assert len(torch.unique(bulk[:, 0, 0, 0])) > 5  # and the frames do differ along the video


def test_one_frame_decodes_each_latent_frame_alone():
    latents = torch.stack([torch.full((16, 2, 2), -0.5), torch.full((16, 2, 2), 0.5)], dim=1)[None]
    frames = _session(9).decode(latents, one_frame=True)
    assert frames.shape == (2, 2, 2, 3)
