"""`<arch>_generate_*.py`: load models once, then render one prompt, a prompt file or an interactive session."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Iterable

import torch

from musubi_tuner.architectures.base import Architecture
from musubi_tuner.errors import UserError
from musubi_tuner.inference.generate import (
    RenderSettings,
    encode_conditions,
    free_memory,
    generation_metadata,
    render,
    sample_solver_for,
)
from musubi_tuner.inference.prompts import PromptSpec

logger = logging.getLogger(__name__)

# Parsed for compatibility with reference command lines; using them is an error until implemented.
NOT_YET_SUPPORTED = ("lycoris",)
# Parsed for compatibility; nothing to act on here, so a non-default value gets a warning.
NO_EFFECT = {
    "disable_numpy_memmap": (False, "checkpoints are always memory-mapped through safetensors"),
    "lazy_loading": (False, "the one DiT is loaded only after the text encoders are freed"),
}


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    from musubi_tuner.training.args import add_compile_arguments
    from musubi_tuner.utils.flag_types import device_name, finite_float, non_negative_float, non_negative_int, \
        positive_int, seed_int

    parser.add_argument("--dit", default=None, help="DiT checkpoint (original/ComfyUI layout)")
    parser.add_argument("--vae", default=None, help="VAE checkpoint")
    parser.add_argument("--vae_dtype", default=None, help="VAE dtype (default bfloat16)")
    parser.add_argument("--lora_weight", nargs="*", default=[], help="LoRA files (any layout) merged before sampling")
    parser.add_argument("--lora_multiplier", nargs="*", type=finite_float, default=[], help="one per --lora_weight (default 1.0)")
    parser.add_argument("--include_patterns", nargs="*", default=None, help="regexes: merge only matching LoRA modules")
    parser.add_argument("--exclude_patterns", nargs="*", default=None, help="regexes: skip matching LoRA modules")
    parser.add_argument("--save_merged_model", default=None, help="write the DiT with LoRAs merged (original layout) and exit")
    parser.add_argument("--prompt", default=None, help="prompt (may carry inline options like --w/--h/--d)")
    parser.add_argument("--negative_prompt", default=None, help="negative prompt (default: the model's)")
    parser.add_argument("--infer_steps", type=positive_int, default=None, help="denoising steps")
    parser.add_argument("--save_path", default=None, help="output folder")
    parser.add_argument("--seed", type=seed_int, default=None, help="seed (random when omitted)")
    parser.add_argument("--cpu_noise", action="store_true",
                        help="accepted for compatibility: noise is always drawn on the CPU, so a seed gives the same "
                             "output on every device (as ComfyUI)")
    parser.add_argument("--guidance_scale", type=finite_float, default=None, help="classifier-free guidance scale")
    parser.add_argument("--flow_shift", type=non_negative_float, default=None,
                        help="flow-matching shift (0: resolution-dependent, as FLUX)")
    parser.add_argument("--sample_solver", default=None, choices=["unipc", "dpm++", "vanilla"],
                        help="sampler (default: the model's, as the reference: unipc for Wan, vanilla (Euler) for FLUX)")
    parser.add_argument("--fp8", action="store_true", help="store the DiT's Linear weights in float8_e4m3fn")
    parser.add_argument("--fp8_scaled", action="store_true")
    parser.add_argument("--fp8_fast", action="store_true",
                        help="fp8 matmuls (torch._scaled_mm) on GPUs with compute capability 8.9+; needs --fp8")
    parser.add_argument("--device", type=device_name, default=None, help="cuda / cpu (default: cuda if available)")
    parser.add_argument("--attn_mode", default="torch", help="attention backend: torch/sdpa, flash, flash3, xformers, sageattn")
    parser.add_argument("--split_attn", action="store_true", help="compute attention one batch item at a time")
    parser.add_argument("--blocks_to_swap", type=non_negative_int, default=None)
    parser.add_argument("--use_pinned_memory_for_block_swap", action="store_true",
                        help="pin all swapped weights (faster copies, more pinned RAM) instead of staging buffers")
    parser.add_argument("--disable_numpy_memmap", action="store_true",
                        help="accepted for compatibility: checkpoints are always memory-mapped through safetensors")
    parser.add_argument("--lazy_loading", action="store_true",
                        help="accepted for compatibility: the DiT is always loaded after the text encoders are freed")
    add_compile_arguments(parser)
    parser.add_argument("--lycoris", action="store_true")
    parser.add_argument("--output_type", default="video", choices=["video", "images", "latent", "both", "latent_images"])
    parser.add_argument("--no_metadata", action="store_true", help="do not write prompt/seed metadata into latent files")
    parser.add_argument("--latent_path", nargs="*", default=None, help="decode these latent files only (no DiT)")
    parser.add_argument("--from_file", default=None, help="prompt file, one prompt per line with inline options")
    parser.add_argument("--interactive", action="store_true", help="read prompts from the console until Ctrl+D")


class GenerationSession:
    """Models loaded once; `generate(spec)` renders and writes one request.

    A family that samples in several passes (FramePack's sections) subclasses this and passes its class to
    `generate_main`: its own flags (`add_arguments`), their checks (`check_arguments`), how flags and prompt lines
    become requests (`requests`), and `encode_all`/`generate`/`write`."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Flags of the session's own sampling loop; none for the single-pass families."""

    @classmethod
    def check_arguments(cls, arch: Architecture, args: argparse.Namespace) -> None:
        """Checks of those flags, before any model loads."""

    @classmethod
    def requests(cls, arch: Architecture, args: argparse.Namespace) -> Iterable[PromptSpec]:
        return requests(arch, args)

    @classmethod
    def check_request(cls, arch: Architecture, spec: PromptSpec, args: argparse.Namespace) -> PromptSpec:
        """One request resolved and checked (interactive lines are checked as they come)."""
        from musubi_tuner.inference.prompt_checks import check_request

        return check_request(arch, spec, args)

    def __init__(self, arch: Architecture, args: argparse.Namespace):
        from musubi_tuner.caching import resolve_device

        self.arch, self.args = arch, args
        self.device = resolve_device(args.device)
        self.settings = RenderSettings(solver=sample_solver_for(arch, args), device=self.device)
        self._text_encoders = None
        self.latent_encoders = arch.load_latent_encoders(args, self.device)
        self.dit = None

    def load_merged_dit(self, args: argparse.Namespace) -> torch.nn.Module:
        """The DiT named by these flags with their LoRAs merged and fp8 storage applied (also each extra expert)."""
        from musubi_tuner.inference.lora_merge import merge_loras_into_dit

        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        # with --fp8 or block swap the full model never has to fit on the GPU: merge and convert on the CPU, then move
        on_cpu = args.fp8 or args.blocks_to_swap
        dit = self.arch.load_dit(args, torch.device("cpu") if on_cpu else self.device, dtype)
        merge_loras_into_dit(self.arch, dit, args.lora_weight, args.lora_multiplier,
                             args.include_patterns, args.exclude_patterns)
        if args.fp8:  # after the LoRA merge, as the reference does
            from musubi_tuner.memory.fp8 import store_dit_in_fp8

            store_dit_in_fp8(dit, self.arch, scaled=args.fp8_scaled)
        return dit

    def load_dit(self) -> torch.nn.Module:
        on_cpu = self.args.fp8 or self.args.blocks_to_swap
        self.dit = self.load_merged_dit(self.args)
        if self.args.fp8 and self.args.fp8_fast:
            from musubi_tuner.memory.fp8_fast import enable_fp8_fast

            enable_fp8_fast(self.dit, self.device)
        if self.args.blocks_to_swap:
            from musubi_tuner.memory.block_swap import BlockSwapOptions, enable_block_swap

            enable_block_swap(self.dit, self.args.blocks_to_swap, self.device, BlockSwapOptions.from_args(self.args),
                              blocks=self.arch.swapped_blocks(self.dit, self.args.blocks_to_swap))
        elif on_cpu:
            self.dit.to(self.device)
        self.arch.attach_expert_dits(self.dit, self.load_merged_dit, self.args, self.device)
        if getattr(self.args, "img_in_txt_in_offloading", False):  # after placement: back to CPU memory
            from musubi_tuner.memory.module_offload import offload_input_modules

            offload_input_modules(self.arch, self.dit, self.device)
        from musubi_tuner.memory.attention import apply_attention_backend, compile_dit_from_flags

        apply_attention_backend(self.dit, self.args.attn_mode, "--attn_mode")
        if self.args.split_attn:
            from musubi_tuner.memory.attention import apply_split_attention

            apply_split_attention(self.dit)
        if self.args.compile:
            compile_dit_from_flags(self.dit, self.args)
        return self.dit

    def encode_all(self, specs: list[PromptSpec]) -> list[tuple[dict, dict | None]]:
        """Encode every prompt, then free the text encoders before the DiT is loaded (both rarely fit at once)."""
        encoders = self.arch.load_text_encoders(self.args, self.device)
        conditions = [encode_conditions(self.arch, encoders, spec) for spec in specs]
        del encoders
        free_memory()
        return conditions

    def interactive_encoders(self) -> Any:
        """Interactive mode keeps the text encoders for the whole session, on the CPU beside a GPU DiT."""
        if self._text_encoders is None:
            self._text_encoders = self.arch.load_text_encoders(self.args, torch.device("cpu"))
        return self._text_encoders

    def generate(self, spec: PromptSpec, conditions: tuple[dict, dict | None] | None = None) -> list[Path]:
        """Render one resolved request (conditions from `encode_all`, else encoded now) and write it."""
        cond, uncond = conditions or encode_conditions(self.arch, self.interactive_encoders(), spec)
        latents = render(self.arch, self.dit, self.latent_encoders, spec, cond, uncond, self.settings, self.args)
        return self.write(latents, spec)

    def write(self, latents: torch.Tensor, spec: PromptSpec | None, seed: Any = None) -> list[Path]:
        from musubi_tuner.inference.outputs import write_outputs

        frames = None
        if self.args.output_type != "latent":
            frames = self.arch.decode_latents(self.latent_encoders, latents)[0]
            frames = trim_tail_frames(frames, getattr(self.args, "trim_tail_frames", 0))
        metadata = None if (self.args.no_metadata or spec is None) else generation_metadata(spec)
        paths = write_outputs(self.args.output_type, frames, latents[0].cpu(), self.args.save_path,
                              spec.seed if spec else seed, self.arch.output_fps(self.args), metadata)
        for path in paths:
            print(f"saved {path}")
        return paths


def trim_tail_frames(frames: torch.Tensor, count: int) -> torch.Tensor:
    """--trim_tail_frames: drop the last `count` decoded frames (the reference's fix for a corrupted tail when an
    end image is used); the latent file keeps every frame, as in the reference."""
    if not count:
        return frames
    if count >= frames.shape[0]:
        raise UserError(f"--trim_tail_frames {count} would remove all {frames.shape[0]} frames; use a smaller value")
    return frames[:-count]


def requests(arch: Architecture, args: argparse.Namespace) -> Iterable[PromptSpec]:
    """The prompts to render: --from_file, --interactive, or the single --prompt (inline options allowed).
    Except in interactive mode, every request is parsed and checked here, before any model loads."""
    from musubi_tuner.inference.prompt_checks import checked_requests
    from musubi_tuner.inference.prompts import interactive_prompts, load_prompt_file, parse_prompt_line

    defaults = arch.prompt_spec_from_args(args)
    if args.from_file:
        return checked_requests(arch, load_prompt_file(args.from_file, defaults), args)
    if args.interactive:
        return interactive_prompts(defaults=defaults)
    if not args.prompt:
        raise UserError("nothing to generate: pass --prompt, --from_file or --interactive (or --latent_path to decode)")
    spec = parse_prompt_line(args.prompt, defaults, where="--prompt")
    return checked_requests(arch, [spec] if spec is not None else [], args)


LATENT_NDIMS = (3, 4)
"""A saved latent is (C, H, W) or (C, F, H, W) under the key `latent` (ours and the reference's)."""


def check_latent_files(paths: list[str]) -> None:
    """--latent_path: every file is a latent written with --output_type latent, checked from its header."""
    from musubi_tuner.models.file_kinds import describe_checkpoint, sample_keys
    from musubi_tuner.models.checkpoint_io import read_safetensors_keys, strip_prefix

    for path in paths:
        if not str(path).lower().endswith(".safetensors"):
            raise UserError(f"--latent_path {path}: expected a .safetensors latent written with --output_type latent")
        shapes = read_safetensors_keys(path, flag="--latent_path")
        shape = shapes.get("latent")
        if shape is None or len(shape) not in LATENT_NDIMS:
            kind = describe_checkpoint(strip_prefix(shapes))
            what = f"it looks like {kind}" if kind else f"it holds {sample_keys(shapes)}"
            raise UserError(f"--latent_path {path}: not a latent saved by a generate script ({what}); pass a "
                            "*_latent.safetensors written with --output_type latent or both")


def decode_latent_files(session: GenerationSession, paths: list[str]) -> None:
    from musubi_tuner.inference.outputs import load_latent

    for path in paths:
        latent, metadata = load_latent(path)
        session.write(latent[None].float(), None, seed=metadata.get("seeds", Path(path).stem))


def run_interactive(session: GenerationSession, specs: Iterable[PromptSpec]) -> None:
    """Typed prompts, each checked as it comes; a bad one is reported and the session goes on."""
    import sys

    from musubi_tuner.inference.prompts import PromptOptionError

    session.load_dit()
    for spec in specs:
        try:
            resolved = session.check_request(session.arch, spec, session.args)
        except PromptOptionError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        session.generate(resolved)


def generate_main(arch_name: str, argv: list[str] | None,
                  session_type: type[GenerationSession] = GenerationSession) -> None:
    from musubi_tuner.architectures import get_architecture

    arch = get_architecture(arch_name)
    from musubi_tuner.utils.flag_types import FlagParser, warn_flags_without_effect

    parser = FlagParser(description=f"{arch_name}: generate with a LoRA")
    add_generation_arguments(parser)
    arch.add_arguments(parser, "generate")
    session_type.add_arguments(parser)
    args = parser.parse_args(argv)
    used = [f"--{n}" for n in NOT_YET_SUPPORTED if getattr(args, n, None) not in (None, False)]
    if used:
        raise UserError(f"{', '.join(used)}: not supported by this version yet; remove the flag")
    warn_flags_without_effect(args, NO_EFFECT)
    if args.fp8_scaled and not args.fp8:
        raise UserError("--fp8_scaled needs --fp8")
    if args.fp8_fast and not args.fp8:
        raise UserError("--fp8_fast needs --fp8 (it multiplies the fp8-stored weights directly)")
    if len(args.lora_multiplier) > len(args.lora_weight):
        raise UserError("more --lora_multiplier values than --lora_weight files")
    arch.validate_arguments(args, "generate")
    session_type.check_arguments(arch, args)
    if args.latent_path and args.save_merged_model:
        raise UserError("--latent_path (decode only) and --save_merged_model (merge only) do different jobs; run them separately")
    if not args.save_path and not args.save_merged_model:
        raise UserError("--save_path is required (the output folder)")
    from musubi_tuner.utils.output_location import check_output_dir, check_output_file

    if args.save_merged_model:  # checked before any model loads
        check_output_file(args.save_merged_model, "--save_merged_model")
    else:
        check_output_dir(args.save_path, "--save_path")
    if args.latent_path:
        check_latent_files(args.latent_path)
        decode_latent_files(session_type(arch, args), args.latent_path)
        return
    if args.save_merged_model:
        from musubi_tuner.inference.lora_merge import save_merged_model

        save_merged_model(arch, args)
        return
    if args.interactive:
        run_interactive(session_type(arch, args), session_type.requests(arch, args))
        return
    specs = list(session_type.requests(arch, args))  # all parsed and checked before any model loads
    session = session_type(arch, args)
    conditions = session.encode_all(specs)
    session.load_dit()
    for spec, condition in zip(specs, conditions):
        session.generate(spec, condition)
