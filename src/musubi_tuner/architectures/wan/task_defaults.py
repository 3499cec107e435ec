"""Wan2.1 generation defaults per `--task`, as the reference's task configs and `get_task_defaults` set them.

- every task: CFG 5.0, 16 fps, UniPC, Wan's Chinese negative prompt;
- T2V/T2I: 50 steps, flow shift 5.0; T2I makes one frame, the others 81;
- I2V (and the I2V Fun-Control task): 40 steps, flow shift 3.0 at 480p (832x480 either way round), else 5.0;
- T2V Fun-Control tasks: as T2V;
- FLF2V (a copy of the I2V config): 40 steps, flow shift 5.0 at every size (the 480p rule tests for "i2v" in
  the task name, which "flf2v" does not contain), and "镜头切换，" ("shot change,") before the negative prompt;
- Wan2.2 A14B (its configs' `sample_steps`/`sample_shift`/`sample_guide_scale[0]`): 40 steps; T2V flow shift 12.0 and
  CFG 3.0, I2V flow shift 5.0 (no 480p rule: that rule is Wan2.1's) and CFG 3.5. These are the low-noise expert's
  scales; the high-noise expert's and the switch point are in `wan22_experts.A14B_EXPERTS`.
"""

from __future__ import annotations

from dataclasses import replace

from musubi_tuner.architectures.base import GenerationDefaults

# Wan's own default negative prompt (`sample_neg_prompt` of its shared config), character for character.
NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)
FLF2V_NEGATIVE_PREFIX = "镜头切换，"

DEFAULT_TASK = "t2v-14B"
BASE = GenerationDefaults(width=832, height=480, frames=81, fps=16.0, infer_steps=50, guidance_scale=5.0,
                          flow_shift=5.0, negative_prompt=NEGATIVE_PROMPT, sample_solver="unipc")
"""`--video_size` defaults to 480x832 here (the reference's 256x256 is a placeholder; docs/wan.md says so)."""

TASK_DEFAULTS: dict[str, GenerationDefaults] = {
    "t2v-1.3B": BASE,
    "t2v-14B": BASE,
    "t2i-14B": replace(BASE, frames=1),
    "i2v-14B": replace(BASE, infer_steps=40),
    "flf2v-14B": replace(BASE, infer_steps=40, negative_prompt=FLF2V_NEGATIVE_PREFIX + NEGATIVE_PROMPT),
    "t2v-A14B": replace(BASE, infer_steps=40, flow_shift=12.0, guidance_scale=3.0),
    "i2v-A14B": replace(BASE, infer_steps=40, flow_shift=5.0, guidance_scale=3.5),
    # Fun-Control: copies of the T2V / I2V configs
    "t2v-1.3B-FC": BASE,
    "t2v-14B-FC": BASE,
    "i2v-14B-FC": replace(BASE, infer_steps=40),
}
I2V_480P_FLOW_SHIFT = 3.0
SIZES_480P = {(832, 480), (480, 832)}


def task_generation_defaults(task: str | None, width: int | None = None, height: int | None = None) -> GenerationDefaults:
    """The defaults for `task` (None: the default task) at output size width x height (None: the default size)."""
    defaults = TASK_DEFAULTS[task or DEFAULT_TASK]
    size = (width or defaults.width, height or defaults.height)
    if task in ("i2v-14B", "i2v-14B-FC") and size in SIZES_480P:
        defaults = replace(defaults, flow_shift=I2V_480P_FLOW_SHIFT)
    return defaults
