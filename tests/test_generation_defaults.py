"""Generation and training-sample defaults match the reference's (Wan per task, FLUX Kontext, samples)."""

from __future__ import annotations

import argparse

import pytest

from musubi_tuner.architectures import get_architecture
from musubi_tuner.architectures.wan.task_defaults import NEGATIVE_PROMPT
from musubi_tuner.inference.generate import resolve_spec, sample_solver_for
from musubi_tuner.inference.prompt_checks import check_request
from musubi_tuner.inference.prompts import PromptSpec, parse_prompt_line
from musubi_tuner.inference.training_samples import SAMPLE_DEFAULTS, sample_request

# Wan's `sample_neg_prompt` (shared config of Wan2.1, used by the reference), typed out from its source.
WAN_NEGATIVE = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，"
    "多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

# The reference's values: (steps, flow shift, CFG, frames, negative prompt prefix) per task at 480x832 and 720x1280
# (wan/configs: sample_steps/sample_shift/sample_guide_scale; wan_generate_video.get_task_defaults).
REFERENCE = {
    ("t2v-1.3B", 832, 480): (50, 5.0, 5.0, 81, ""),
    ("t2v-14B", 832, 480): (50, 5.0, 5.0, 81, ""),
    ("t2v-14B", 1280, 720): (50, 5.0, 5.0, 81, ""),
    ("t2i-14B", 832, 480): (50, 5.0, 5.0, 1, ""),
    ("i2v-14B", 832, 480): (40, 3.0, 5.0, 81, ""),
    ("i2v-14B", 480, 832): (40, 3.0, 5.0, 81, ""),
    ("i2v-14B", 1280, 720): (40, 5.0, 5.0, 81, ""),
    ("flf2v-14B", 832, 480): (40, 5.0, 5.0, 81, "镜头切换，"),
    ("flf2v-14B", 1280, 720): (40, 5.0, 5.0, 81, "镜头切换，"),
}


def _sample_spec(arch, spec, args):
    """A sample line as training resolves and checks it (load_sample_requests, one line)."""
    return check_request(arch, sample_request(spec, args), args)


def test_wan_negative_prompt_is_wans_own_string():
    assert NEGATIVE_PROMPT == WAN_NEGATIVE
    assert "丑陋的，残缺的" in NEGATIVE_PROMPT


@pytest.mark.parametrize("key", sorted(REFERENCE))
def test_wan_task_defaults_match_reference(key):
    task, width, height = key
    steps, shift, cfg, frames, prefix = REFERENCE[key]
    arch = get_architecture("wan")
    spec = resolve_spec(arch, PromptSpec(prompt="x", width=width, height=height, seed=1), argparse.Namespace(task=task))
    assert (spec.steps, spec.flow_shift, spec.guidance_scale, spec.frames) == (steps, shift, cfg, frames)
    assert spec.negative_prompt == prefix + WAN_NEGATIVE


def test_wan_i2v_default_size_gets_the_480p_shift():
    spec = resolve_spec(get_architecture("wan"), PromptSpec(prompt="x", seed=1), argparse.Namespace(task="i2v-14B"))
    assert (spec.width, spec.height, spec.flow_shift, spec.steps) == (832, 480, 3.0, 40)


def test_flags_still_win_over_task_defaults():
    arch = get_architecture("wan")
    given = PromptSpec(prompt="x", seed=1, steps=7, flow_shift=8.0, frames=5, negative_prompt="")
    spec = resolve_spec(arch, given, argparse.Namespace(task="i2v-14B"))
    assert (spec.steps, spec.flow_shift, spec.frames, spec.negative_prompt) == (7, 8.0, 5, "")


def test_samplers_default_to_the_reference_ones():
    assert sample_solver_for(get_architecture("wan"), argparse.Namespace(sample_solver=None)) == "unipc"
    assert sample_solver_for(get_architecture("flux_kontext"), argparse.Namespace(sample_solver=None)) == "vanilla"
    assert sample_solver_for(get_architecture("flux_kontext"), argparse.Namespace()) == "vanilla"
    assert sample_solver_for(get_architecture("wan"), argparse.Namespace(sample_solver="dpm++")) == "dpm++"


@pytest.mark.parametrize("arch_name", ["wan", "flux_kontext"])
def test_training_samples_use_shift_14_5_and_no_cfg_without_n(arch_name):
    arch = get_architecture(arch_name)
    args = argparse.Namespace(task="t2v-1.3B")
    spec = _sample_spec(arch, parse_prompt_line("a cat --d 3", SAMPLE_DEFAULTS), args)
    assert (spec.width, spec.height, spec.frames, spec.steps, spec.flow_shift) == (256, 256, 1, 20, 14.5)
    assert spec.guidance_scale == 1.0 and spec.negative_prompt == ""  # no --n: one pass, as the reference


def test_training_sample_line_options_win():
    arch = get_architecture("wan")
    line = "a cat --fs 3 --n blurry --l 4.5"
    spec = _sample_spec(arch, parse_prompt_line(line, SAMPLE_DEFAULTS), argparse.Namespace(task="t2v-1.3B"))
    assert (spec.flow_shift, spec.negative_prompt, spec.guidance_scale) == (3.0, "blurry", 4.5)
    # --n without --l: the reference's CFG default (Wan 5.0)
    spec = _sample_spec(arch, parse_prompt_line("a cat --n ugly", SAMPLE_DEFAULTS), argparse.Namespace(task="t2v-1.3B"))
    assert spec.guidance_scale == 5.0


def test_kontext_samples_keep_embedded_guidance_and_fs0_means_flux_shift():
    arch = get_architecture("flux_kontext")
    spec = _sample_spec(arch, parse_prompt_line("edit --fs 0", SAMPLE_DEFAULTS), argparse.Namespace())
    assert spec.flow_shift == 0 and spec.embedded_guidance == 2.5
