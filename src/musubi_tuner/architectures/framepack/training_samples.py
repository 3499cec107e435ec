"""Samples during FramePack training (`fpack_train_network.py --sample_prompts`): the generate script's section
loop / one-frame inference (`FramePackSession.sample`) on the DiT being trained.

Sample lines follow the reference trainer (not the generate script): `--f` is a frame count, giving
floor(((f - 1) // 4) / window) sections (`--vs` overrides); `--g` the embedded (distilled) guidance, default 10.0;
`--l` with `--n` the CFG scale; `--i` the start image, required (FramePack is image-to-video); `--fs` a fixed flow
shift, else the resolution-dependent one (the reference trainer ignores `--fs`). Vanilla or F1 follows `--f1`;
with `--one_frame` every line is one-frame inference with its `--of` options (none: the defaults) and `--ci`
control images.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path

import torch

from musubi_tuner.architectures.framepack.generation_session import FramePackSession
from musubi_tuner.inference.prompts import PromptOptionError, PromptSpec

logger = logging.getLogger(__name__)

SAMPLE_DEFAULTS = PromptSpec(width=256, height=256, frames=1, steps=20, embedded_guidance=10.0)
"""The reference trainer's: 256x256, 20 steps, embedded guidance 10.0, no fixed flow shift."""


def session_args(args: argparse.Namespace) -> argparse.Namespace:
    """The generate script's flags at their defaults under the training run's own (model files, --f1,
    --latent_window_size, --bulk_decode), writing to the sample folder."""
    from musubi_tuner.architectures.framepack.generation_flags import add_framepack_generation_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_framepack_generation_arguments(parser)
    generation = argparse.Namespace(**{**vars(parser.parse_args([])), **vars(args)})
    generation.save_path = str(Path(args.output_dir) / "sample")
    generation.no_metadata, generation.output_type = False, "video"
    return generation


def video_sections(frames: int, window: int) -> int:
    """Sections a `--f` frame count holds, as the reference trainer: whole windows after the start latent."""
    return ((frames - 1) // 4) // window


def check_sample_line(arch, spec: PromptSpec, args: argparse.Namespace,
                      generation: argparse.Namespace) -> PromptSpec:
    """One sample line made a FramePack request and checked (raises PromptOptionError naming the line).
    generation: `session_args(args)`."""
    from musubi_tuner.architectures.framepack.generation_flags import check_framepack_request
    from musubi_tuner.inference.training_samples import sample_request

    where = spec.source or "sample prompt"
    spec = sample_request(spec, args)
    if not spec.image_path:
        raise PromptOptionError(f"{where}: FramePack samples are image-to-video; add --i start_image.png")
    if args.one_frame:
        spec = dataclasses.replace(spec, one_frame=spec.one_frame or "", video_sections=None)
    else:
        if spec.one_frame:
            logger.warning("%s: --of is ignored without --one_frame", where)
        sections = spec.video_sections or video_sections(spec.frames, args.latent_window_size)
        if sections < 1:
            need = 4 * args.latent_window_size + 1
            raise PromptOptionError(f"{where}: --f {spec.frames} frames make no section of --latent_window_size "
                                    f"{args.latent_window_size}; give --f {need} or more (or --vs N)")
        spec = dataclasses.replace(spec, one_frame=None, video_sections=sections)
    return check_framepack_request(arch, spec, generation)


def load_framepack_sample_requests(arch, args: argparse.Namespace) -> list[PromptSpec]:
    from musubi_tuner.inference.prompts import load_prompt_file

    generation = session_args(args)
    return [check_sample_line(arch, spec, args, generation)
            for spec in load_prompt_file(args.sample_prompts, SAMPLE_DEFAULTS)]


class FramePackTrainingSampler(FramePackSession):
    """The generate session without its own DiT or flags: prompts and images as `fpack_generate_video.py` encodes
    them, files named as the shared training sampler names them."""

    def __init__(self, arch, args: argparse.Namespace, device: torch.device):
        from musubi_tuner.inference.generate import free_memory

        self.arch, self.train_args, self.device = arch, args, device
        self.args = session_args(args)
        self.specs = load_framepack_sample_requests(arch, args)
        self._text_encoders, self.dit = None, None
        self.conditions = self.encode_all(self.specs)
        free_memory()
        self.latent_encoders = arch.load_latent_encoders(args, device)
        self.folder = Path(self.args.save_path)
        logger.info("%d FramePack sample prompts ready", len(self.specs))

    def _settings(self, spec: PromptSpec):
        """The generate script's, in the trained DiT's compute dtype (a bf16/fp16 DiT under the step's autocast,
        fp32 without mixed precision) rather than its bf16-on-CUDA."""
        from musubi_tuner.architectures.common import dit_compute_dtype

        return dataclasses.replace(super()._settings(spec), dtype=dit_compute_dtype(self.dit), progress=False)

    def run(self, dit: torch.nn.Module, *, epoch: int | None = None, step: int | None = None,
            autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext) -> list[Path]:
        from musubi_tuner.inference.generate import generation_metadata
        from musubi_tuner.inference.outputs import write_outputs

        tag = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
        written: list[Path] = []
        was_training, self.dit = dit.training, dit
        try:
            for spec, conditions in zip(self.specs, self.conditions):
                # sampling must not move the training RNG nor build a graph
                with torch.random.fork_rng(devices=[]), torch.no_grad(), autocast():
                    latents = self.sample(spec, conditions)
                frames = self.decode(latents, spec.one_frame is not None)
                stamp = datetime.now().strftime("%Y%m%d%H%M%S")
                name = f"{self.train_args.output_name}_{tag}_{spec.index:02d}_{stamp}_{spec.seed}"
                kind = "images" if frames.shape[0] == 1 else "video"
                written += write_outputs(kind, frames, latents[0].cpu(), self.folder, spec.seed, self.args.fps,
                                         generation_metadata(spec), basename=name)
        finally:
            dit.train(was_training)
            self.dit = None
        logger.info("samples written to %s", self.folder)
        return written
