"""CFG skipping and skip-layer guidance (inference/guidance.py): the step sets against hand-derived tables, the
per-step combination against the reference's formulas, and the loop's passes."""

from __future__ import annotations

import argparse

import pytest
import torch

from musubi_tuner.errors import UserError
from musubi_tuner.inference.denoise import denoise
from musubi_tuner.inference.guidance import (
    GuidanceOptions,
    GuidancePlan,
    SkipLayerGuidance,
    add_guidance_arguments,
    cfg_apply_pattern,
    guidance_options_from_args,
    pattern_text,
    step_velocity,
)
from musubi_tuner.inference.schedulers import make_flow_scheduler

# The reference's docs/wan.md table (10 steps, --cfg_apply_ratio 0.6), then hand-derived ones.
TABLES = [
    (10, 0.6, {"early": "SSSSAAAAAA", "late": "AAAAAASSSS", "middle": "AAASSSSAAA", "early_late": "SSAAAAAASS",
               "alternate": "SASASAASAS", "none": "AAAAAAAAAA"}),
    # apply = int(7 * 0.3) = 2; alternate sums 0.3 per step in float: 0.3, 0.6, 0.9, 1.2 -> A ...
    (7, 0.3, {"early": "SSSSSAA", "late": "AASSSSS", "middle": "ASSSSSA", "early_late": "SSAASSS",
              "alternate": "SSSASSA", "none": "AAAAAAA"}),
    # apply = int(5 * 0.5) = 2; early_late puts the odd skipped step at the end, middle the odd one after the centre
    (5, 0.5, {"early": "SSSAA", "late": "AASSS", "middle": "ASSSA", "early_late": "SAASS", "alternate": "SASAS",
              "none": "AAAAA"}),
    (4, 1.0, {"early": "AAAA", "late": "AAAA", "middle": "AAAA", "early_late": "AAAA", "alternate": "AAAA",
              "none": "AAAA"}),
    (4, 0.0, {"early": "SSSS", "late": "SSSS", "middle": "SSSS", "early_late": "SSSS", "alternate": "SSSS",
              "none": "AAAA"}),
]


@pytest.mark.parametrize("steps, ratio, table", TABLES)
def test_cfg_skip_steps_match_the_hand_derived_tables(steps, ratio, table):
    for mode, expected in table.items():
        assert pattern_text(cfg_apply_pattern(mode, ratio, steps)) == expected, mode


def test_without_a_ratio_every_step_applies_cfg_as_in_the_reference():
    assert cfg_apply_pattern("late", None, 6) == [True] * 6


def test_slg_steps_are_the_reference_int_range():
    slg = SkipLayerGuidance(layers=(1,), start=0.25, end=0.75)
    assert [i for i in range(10) if slg.applies(i, 10)] == [2, 3, 4, 5, 6]  # int(2.5) <= i < int(7.5)
    default = SkipLayerGuidance(layers=(1,))
    assert [i for i in range(10) if default.applies(i, 10)] == [0, 1, 2]  # 0.0 .. 0.3


class Passes:
    """predict(cond) with values named by the conditioning; counts passes and whether layers were skipped."""

    def __init__(self):
        self.skipping = False
        self.calls = []

    def skip_layers(self, layers):
        passes = self

        class Ctx:
            def __enter__(self):
                passes.skipping = True

            def __exit__(self, *exc):
                passes.skipping = False

        return Ctx()

    def __call__(self, c):
        self.calls.append((c["name"], self.skipping))
        value = {"pos": 2.0, "neg": -1.0}[c["name"]] + (0.5 if self.skipping else 0.0)
        return torch.full((2,), value)


def _velocity(options, step=0, steps=1, scale=5.0, uncond=True):
    passes = Passes()
    plan = GuidancePlan.for_steps(options, steps)
    v = step_velocity(passes, {"name": "pos"}, {"name": "neg"} if uncond else None, scale, plan, step,
                      passes.skip_layers)
    return v[0].item(), passes.calls


def test_step_velocity_follows_the_reference_formulas():
    cond, uncond, skip = 2.0, -1.0, -0.5  # skip: the negative prompt's prediction with the layers skipped
    assert _velocity(GuidanceOptions()) == (uncond + 5.0 * (cond - uncond), [("pos", False), ("neg", False)])
    original = GuidanceOptions(slg=SkipLayerGuidance(layers=(1,), scale=3.0, end=1.0, mode="original"))
    v, calls = _velocity(original)
    assert v == uncond + 5.0 * (cond - uncond) + 3.0 * (cond - skip)  # SD3.5: CFG + slg_scale * (cond - skip)
    assert calls == [("pos", False), ("neg", False), ("neg", True)]
    wan2gp = GuidanceOptions(slg=SkipLayerGuidance(layers=(1,), end=1.0, mode="uncond"))
    v, calls = _velocity(wan2gp)
    assert v == skip + 5.0 * (cond - skip) and calls == [("pos", False), ("neg", True)]
    # a CFG-skipped step is the positive prediction alone, SLG or not; so is a run without a negative pass
    skipped = GuidanceOptions(cfg_skip_mode="late", cfg_apply_ratio=0.0, slg=original.slg)
    assert _velocity(skipped) == (cond, [("pos", False)])
    assert _velocity(original, uncond=False) == (cond, [("pos", False)])
    # outside the SLG step range: plain CFG
    outside = GuidanceOptions(slg=SkipLayerGuidance(layers=(1,), start=0.5, end=1.0))
    assert _velocity(outside, step=0, steps=2) == (uncond + 5.0 * (cond - uncond), [("pos", False), ("neg", False)])


def test_denoise_runs_the_planned_passes_on_the_steps_that_run():
    rec = []

    def predict(x, t, c):
        rec.append((round(float(t[0])), c["name"]))
        return torch.zeros_like(x)

    options = GuidanceOptions(cfg_skip_mode="early", cfg_apply_ratio=0.5)
    sched = make_flow_scheduler("vanilla", 1.0)
    denoise(predict, torch.zeros(1, 2), sched, 6, {"name": "pos"}, {"name": "neg"}, 4.0, progress=False,
            start_step=2, guidance=options)
    # 4 steps run; early with ratio 0.5 skips the first 2 of THEM (the reference counts the sampled timesteps)
    per_step = {}
    for t, name in rec:
        per_step.setdefault(t, []).append(name)
    assert list(per_step.values()) == [["pos"], ["pos"], ["pos", "neg"], ["pos", "neg"]]
    # guidance 1.0: no negative pass at all, whatever the plan
    rec.clear()
    denoise(predict, torch.zeros(1, 2), sched, 3, {"name": "pos"}, {"name": "neg"}, 1.0, progress=False,
            guidance=options)
    assert [name for _, name in rec] == ["pos"] * 3


def test_slg_without_a_block_skipper_is_a_clear_error():
    plan = GuidancePlan.for_steps(GuidanceOptions(slg=SkipLayerGuidance(layers=(0,), end=1.0)), 1)
    with pytest.raises(UserError, match="--slg_layers"):
        step_velocity(lambda c: torch.zeros(1), {}, {}, 5.0, plan, 0, None)


def _flags(*argv):
    parser = argparse.ArgumentParser()
    add_guidance_arguments(parser)
    return parser.parse_args(list(argv))


def test_flags_have_the_reference_defaults_and_bad_values_name_the_flag():
    args = _flags()
    assert (args.cfg_skip_mode, args.cfg_apply_ratio, args.slg_layers, args.slg_scale, args.slg_start,
            args.slg_end, args.slg_mode) == ("none", None, None, 3.0, 0.0, 0.3, None)
    assert guidance_options_from_args(args) == GuidanceOptions()
    options = guidance_options_from_args(_flags("--slg_layers", "4,5,6", "--slg_mode", "uncond", "--slg_end", "0.5"))
    assert options.slg == SkipLayerGuidance(layers=(4, 5, 6), scale=3.0, start=0.0, end=0.5, mode="uncond")
    # the reference ignores a mode without layers
    assert guidance_options_from_args(_flags("--slg_mode", "original")).slg is None
    for argv, flag in [(["--slg_layers", "4;5", "--slg_mode", "original"], "--slg_layers"),
                       (["--slg_layers", "-1", "--slg_mode", "original"], "--slg_layers"),
                       (["--slg_layers", "1", "--slg_mode", "original", "--slg_start", "0.5", "--slg_end", "0.2"],
                        "--slg_end")]:
        with pytest.raises(UserError, match=flag):
            guidance_options_from_args(_flags(*argv))
    with pytest.raises(SystemExit):
        _flags("--cfg_apply_ratio", "1.5")
