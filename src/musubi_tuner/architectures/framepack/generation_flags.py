"""`fpack_generate_video.py`'s own flags (the reference's names and defaults), their checks, and how flags and
prompt lines become requests. The flags every generate script shares come from `inference.generate_cli`; the VAE,
SigLIP and text-encoder flags from the FramePack architecture."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from musubi_tuner.architectures.framepack.section_inputs import parse_section_strings
from musubi_tuner.errors import UserError

DEFAULT_VIDEO_SECONDS = 5.0
DEFAULT_FPS = 30
DEFAULT_LATENT_WINDOW_SIZE = 9
DEFAULT_EMBEDDED_CFG_SCALE = 10.0
DEFAULT_ROPE_SCALING_FACTOR = 0.5
DEFAULT_MAGCACHE_RETENTION_RATIO = 0.2
DEFAULT_MAGCACHE_THRESHOLD = 0.24
DEFAULT_MAGCACHE_K = 6


def add_framepack_generation_arguments(parser: argparse.ArgumentParser) -> None:
    from musubi_tuner.utils.flag_types import (
        finite_float,
        non_negative_float,
        non_negative_int,
        positive_float,
        positive_int,
    )

    parser.add_argument("--video_size", type=positive_int, nargs=2, default=[256, 256], metavar=("HEIGHT", "WIDTH"),
                        help="video size, height and width (default 256 256)")
    parser.add_argument("--video_seconds", type=positive_float, default=DEFAULT_VIDEO_SECONDS,
                        help="video length in seconds (default 5.0); sections = round(seconds * 30 / (4 * window))")
    parser.add_argument("--video_sections", type=positive_int, default=None,
                        help="number of sections (overrides --video_seconds)")
    parser.add_argument("--fps", type=positive_int, default=DEFAULT_FPS, help="frame rate of the written video (30)")
    parser.add_argument("--latent_window_size", type=positive_int, default=DEFAULT_LATENT_WINDOW_SIZE,
                        help="latent frames per section (default 9; the models were trained with 9)")
    parser.add_argument("--f1", action="store_true", help="FramePack-F1: sample sections forward (needs F1 weights)")
    parser.add_argument("--image_path", default=None,
                        help="start image; section images with the --prompt syntax: 0:a.png;;;2:b.png")
    parser.add_argument("--end_image_path", default=None, help="end image (vanilla sampling only)")
    parser.add_argument("--latent_paddings", default=None,
                        help="vanilla sampling: padding of each section in sampling order, e.g. 3,2,1,0")
    parser.add_argument("--one_frame_inference", default=None,
                        help="one-frame inference: comma-separated no_2x, no_4x, no_post, target_index=N, "
                             "control_index=a;b (see docs/framepack_generation.md)")
    parser.add_argument("--one_frame_auto_resize", action="store_true",
                        help="one-frame: size the output from the first control image's aspect ratio at the area "
                             "of --video_size")
    parser.add_argument("--control_image_path", nargs="*", default=None,
                        help="one-frame: control (reference) images; an alpha channel masks the latent")
    parser.add_argument("--control_image_mask_path", nargs="*", default=None,
                        help="one-frame: masks for the control images, in order (white keeps)")
    parser.add_argument("--embedded_cfg_scale", type=finite_float, default=DEFAULT_EMBEDDED_CFG_SCALE,
                        help="embedded (distilled) CFG scale (default 10.0)")
    parser.add_argument("--guidance_rescale", type=non_negative_float, default=0.0,
                        help="CFG rescale with --guidance_scale other than 1 (default 0.0)")
    parser.add_argument("--custom_system_prompt", default=None, help="system prompt for the LLM instead of the "
                                                                     "HunyuanVideo video template's")
    parser.add_argument("--rope_scaling_factor", type=positive_float, default=DEFAULT_ROPE_SCALING_FACTOR,
                        help="RoPE height/width scaling for high resolutions (default 0.5; used with the threshold)")
    parser.add_argument("--rope_scaling_timestep_threshold", type=non_negative_int, default=None,
                        help="apply --rope_scaling_factor for timesteps >= this (0..1000; about 800 is a good start; "
                             "default: off)")
    parser.add_argument("--bulk_decode", action="store_true", help="decode all latents at once instead of section "
                                                                   "by section")
    parser.add_argument("--magcache_mag_ratios", default=None,
                        help="enable MagCache with these comma-separated ratios (0: the default 50-step ratios)")
    parser.add_argument("--magcache_retention_ratio", type=non_negative_float, default=DEFAULT_MAGCACHE_RETENTION_RATIO,
                        help="MagCache: fraction of the first steps never skipped (0.2)")
    parser.add_argument("--magcache_threshold", type=non_negative_float, default=DEFAULT_MAGCACHE_THRESHOLD,
                        help="MagCache: accumulated error allowed while skipping (0.24)")
    parser.add_argument("--magcache_k", type=non_negative_int, default=DEFAULT_MAGCACHE_K,
                        help="MagCache: most steps skipped in a row (6)")
    parser.add_argument("--magcache_calibration", action="store_true",
                        help="MagCache: run every step and print the ratios to pass as --magcache_mag_ratios")


def check_framepack_generation_arguments(args: argparse.Namespace) -> None:
    """Flag combinations the loops cannot honour, refused before any model loads."""
    from musubi_tuner.architectures.framepack.generation_sections import parse_latent_paddings
    from musubi_tuner.architectures.framepack.magcache import parse_mag_ratios
    from musubi_tuner.architectures.framepack.one_frame import parse_one_frame_options

    if not args.image_encoder and not args.save_merged_model:
        raise UserError("--image_encoder is required: FramePack conditions every section on the SigLIP embedding of "
                        "its image (sigclip_vision_patch14_384.safetensors)")
    if args.sample_solver not in (None, "unipc"):
        raise UserError(f"--sample_solver {args.sample_solver}: FramePack samples with unipc only (as the reference)")
    if args.latent_paddings is not None:
        parse_latent_paddings(args.latent_paddings)
        if args.f1:
            raise UserError("--latent_paddings applies to vanilla sampling; drop it with --f1")
    if args.end_image_path and args.f1:
        raise UserError("--end_image_path works with vanilla (inverted) sampling; drop it or --f1")
    if args.one_frame_inference is not None:
        parse_one_frame_options(args.one_frame_inference)
        if args.f1:
            raise UserError("--one_frame_inference and --f1 are different modes; give one of them")
    elif args.control_image_path or args.control_image_mask_path or args.one_frame_auto_resize:
        raise UserError("--control_image_path / --control_image_mask_path / --one_frame_auto_resize need "
                        "--one_frame_inference")
    if args.magcache_mag_ratios is not None:
        parse_mag_ratios(args.magcache_mag_ratios)
    if args.video_size[0] % 16 or args.video_size[1] % 16:
        raise UserError(f"--video_size {args.video_size[0]} {args.video_size[1]}: height and width must be multiples "
                        "of 16")


def framepack_line_options() -> dict[str, tuple[str, Callable[[str], Any]]]:
    """The reference's FramePack prompt-line options: `--f` is seconds, `--g` and `--l` both the CFG scale, plus
    `--vs`, `--ei`, `--ci`, `--cim`, `--of` and the MagCache `--mcrr`, `--mct`, `--mck`."""
    from musubi_tuner.inference.prompts import LINE_OPTIONS
    from musubi_tuner.utils.flag_types import finite_float, non_negative_float, non_negative_int, positive_float

    return {**LINE_OPTIONS, "f": ("video_seconds", positive_float), "g": ("guidance_scale", finite_float),
            "mcrr": ("magcache_retention_ratio", non_negative_float),
            "mct": ("magcache_threshold", non_negative_float), "mck": ("magcache_k", non_negative_int)}


def framepack_prompt_defaults(args: argparse.Namespace):
    """The flags as a PromptSpec (the values prompt lines start from)."""
    from musubi_tuner.inference.prompts import PromptSpec

    height, width = args.video_size
    return PromptSpec(prompt=args.prompt or "", negative_prompt=args.negative_prompt, width=width, height=height,
                      seed=args.seed, steps=args.infer_steps, guidance_scale=args.guidance_scale,
                      embedded_guidance=args.embedded_cfg_scale, flow_shift=args.flow_shift or None,
                      image_path=args.image_path, end_image_path=args.end_image_path,
                      control_image_paths=list(args.control_image_path or []),
                      control_image_mask_paths=list(args.control_image_mask_path or []),
                      one_frame=args.one_frame_inference, video_sections=args.video_sections,
                      video_seconds=args.video_seconds, magcache_retention_ratio=args.magcache_retention_ratio,
                      magcache_threshold=args.magcache_threshold, magcache_k=args.magcache_k)


def check_framepack_request(arch, spec, args: argparse.Namespace):
    """The shared checks (sizes, files), with section images checked one by one, and the one-frame options."""
    from musubi_tuner.architectures.framepack.one_frame import parse_one_frame_options
    from musubi_tuner.inference.prompt_checks import check_request
    from musubi_tuner.inference.prompts import PromptOptionError

    where = spec.source or "prompt"
    flag = "--image_path" if spec.image_path == args.image_path else "--i"
    try:
        images = parse_section_strings(spec.image_path, flag=flag)
        if spec.one_frame is not None:
            from_flag = spec.one_frame == args.one_frame_inference
            parse_one_frame_options(spec.one_frame, where="--one_frame_inference" if from_flag else "--of")
    except UserError as exc:
        raise PromptOptionError(f"{where}: {exc}") from None
    for path in images.values():
        if not Path(path).is_file():
            raise PromptOptionError(f"{where}: {flag} {path}: file not found")
    resolved = check_request(arch, dataclasses.replace(spec, image_path=None), args)
    return dataclasses.replace(resolved, image_path=spec.image_path)


def framepack_requests(arch, args: argparse.Namespace):
    """--from_file, --interactive or --prompt with FramePack's line options, every request checked up front."""
    from musubi_tuner.inference.prompts import interactive_prompts, load_prompt_file, parse_prompt_line

    defaults, options = framepack_prompt_defaults(args), framepack_line_options()
    if args.from_file:
        return [check_framepack_request(arch, s, args) for s in load_prompt_file(args.from_file, defaults,
                                                                                 options=options)]
    if args.interactive:
        return interactive_prompts(defaults=defaults, options=options)
    if not args.prompt:
        raise UserError("nothing to generate: pass --prompt, --from_file or --interactive (or --latent_path to decode)")
    spec = parse_prompt_line(args.prompt, defaults, where="--prompt", options=options)
    return [check_framepack_request(arch, spec, args)] if spec is not None else []
