"""`fpack_generate_video.py`'s session: models loaded once, then each request is encoded (per-section prompts and
images), sampled section by section (vanilla, F1) or as one frame, decoded section by section and written."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from musubi_tuner.architectures.framepack import generation_flags as flags
from musubi_tuner.architectures.framepack import generation_sections as gs
from musubi_tuner.architectures.framepack.sampling import SamplerSettings, SectionImage, TextCondition, VideoRequest
from musubi_tuner.architectures.framepack.section_inputs import parse_section_strings
from musubi_tuner.errors import UserError
from musubi_tuner.inference.generate_cli import GenerationSession
from musubi_tuner.inference.prompts import PromptSpec

logger = logging.getLogger(__name__)

Conditions = tuple[dict[int, TextCondition], TextCondition]


def text_condition(content: dict[str, torch.Tensor], prompt: str) -> TextCondition:
    """A cache-style text content dict (`llama_vec`, `llama_attention_mask`, `clip_l_pooler`) with a batch axis."""
    return TextCondition(content["llama_vec"][None], content["llama_attention_mask"][None],
                         content["clip_l_pooler"][None], prompt)


def encode_section_prompts(arch, encoders: Any, spec: PromptSpec, custom_system_prompt: str | None = None
                           ) -> Conditions:
    """Every section prompt once (a repeated prompt is encoded once), and the negative prompt: zeros without CFG,
    as the reference (the distilled model never sees it then)."""
    sections = parse_section_strings(spec.prompt or " ")
    wanted = list(dict.fromkeys(sections.values()))
    use_cfg = spec.guidance_scale is not None and spec.guidance_scale != 1.0
    negative = spec.negative_prompt or ""
    texts = wanted + ([negative] if use_cfg and negative not in wanted else [])
    extra = {"system_prompt": custom_system_prompt} if custom_system_prompt else {}
    encoded = dict(zip(texts, arch.encode_prompts(encoders, texts, **extra)))
    prompts = {index: text_condition(encoded[text], text) for index, text in sections.items()}
    if use_cfg:
        return prompts, text_condition(encoded[negative], negative)
    first = prompts[0]
    return prompts, TextCondition(torch.zeros_like(first.llama_vec), first.llama_attention_mask.clone(),
                                  torch.zeros_like(first.clip_l_pooler), "")


class FramePackSession(GenerationSession):
    add_arguments = staticmethod(flags.add_framepack_generation_arguments)

    @classmethod
    def check_arguments(cls, arch, args: argparse.Namespace) -> None:
        flags.check_framepack_generation_arguments(args)

    @classmethod
    def requests(cls, arch, args: argparse.Namespace) -> Iterable[PromptSpec]:
        return flags.framepack_requests(arch, args)

    @classmethod
    def check_request(cls, arch, spec: PromptSpec, args: argparse.Namespace) -> PromptSpec:
        return flags.check_framepack_request(arch, spec, args)

    # ---- text ----------------------------------------------------------------------------------------
    def encode_all(self, specs: list[PromptSpec]) -> list[Conditions]:
        from musubi_tuner.inference.generate import free_memory

        encoders = self.arch.load_text_encoders(self.args, self.device)
        conditions = [encode_section_prompts(self.arch, encoders, spec, self.args.custom_system_prompt)
                      for spec in specs]
        del encoders
        free_memory()
        return conditions

    # ---- images --------------------------------------------------------------------------------------
    def _vae(self):
        return self.latent_encoders[0]

    def _encode_image(self, pixels: np.ndarray, seed: int) -> torch.Tensor:
        """uint8 (H, W, 3) -> scaled VAE latent (1, 16, 1, h, w): a posterior sample seeded by the request, as the
        reference's `vae_encode` (which samples unseeded)."""
        from musubi_tuner.architectures.common import pixels_to_model_range
        from musubi_tuner.models.hunyuan_video.vae_files import encode_hv_latents

        vae = self._vae()
        generator = torch.Generator(device=vae.device).manual_seed(int(seed))
        video = pixels_to_model_range(torch.from_numpy(np.ascontiguousarray(pixels))[None, None], vae.device, vae.dtype)
        return encode_hv_latents(vae, video, sample=True, generator=generator).float().cpu() * vae.config.scaling_factor

    def _section_images(self, spec: PromptSpec, width: int, height: int) -> dict[int, SectionImage]:
        """Section images (a black image when none is given, as the reference's placeholder), each VAE-encoded and
        SigLIP-embedded."""
        from musubi_tuner.inference.images import load_image_resized
        from musubi_tuner.models.siglip_files import encode_siglip_images

        flag = "--image_path" if spec.image_path == self.args.image_path else "--i"
        paths = parse_section_strings(spec.image_path, flag=flag)
        pixels = {i: load_image_resized(p, width, height, flag=flag).numpy() for i, p in paths.items()}
        if not pixels:
            logger.warning("no --image_path: starting from a black image (FramePack is an image-to-video model)")
            pixels = {0: np.zeros((height, width, 3), dtype=np.uint8)}
        siglip = self.latent_encoders[1]
        images = {}
        for index, image in pixels.items():
            embedding = encode_siglip_images(siglip, [image]).float().cpu()
            images[index] = SectionImage(self._encode_image(image, spec.seed), embedding)
        return images

    def _control_inputs(self, spec: PromptSpec, width: int, height: int) -> tuple[list[torch.Tensor], list]:
        """One-frame control images: latents, and latent-size masks from --control_image_mask_path (or --cim) or
        else the image's alpha channel."""
        from musubi_tuner.architectures.framepack.one_frame import latent_mask
        from musubi_tuner.inference.images import load_image_resized

        latents, masks = [], []
        for i, path in enumerate(spec.control_image_paths):
            latents.append(self._encode_image(load_image_resized(path, width, height, "--control_image_path").numpy(),
                                              spec.seed))
            mask = None
            if i < len(spec.control_image_mask_paths):
                mask = _grey_resized(spec.control_image_mask_paths[i], width, height, alpha=False)
            else:
                mask = _grey_resized(path, width, height, alpha=True)
            masks.append(None if mask is None else latent_mask(mask, height // 8, width // 8))
        return latents, masks

    # ---- sampling ------------------------------------------------------------------------------------
    def _settings(self, spec: PromptSpec) -> SamplerSettings:
        threshold = self.args.rope_scaling_timestep_threshold
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        return SamplerSettings(steps=spec.steps, embedded_cfg_scale=spec.embedded_guidance,
                               guidance_scale=spec.guidance_scale, guidance_rescale=self.args.guidance_rescale,
                               flow_shift=spec.flow_shift or None, dtype=dtype, device=self.device,
                               rope_scaling=None if threshold is None else (self.args.rope_scaling_factor, threshold))

    def _magcache(self, spec: PromptSpec):
        from musubi_tuner.architectures.framepack.magcache import MagCache, parse_mag_ratios

        if self.args.magcache_mag_ratios is None and not self.args.magcache_calibration:
            return None
        ratios = None if self.args.magcache_mag_ratios is None else parse_mag_ratios(self.args.magcache_mag_ratios)
        return MagCache(mag_ratios=ratios, retention_ratio=spec.magcache_retention_ratio,
                        threshold=spec.magcache_threshold, k=spec.magcache_k,
                        calibrate=self.args.magcache_calibration)

    def _size(self, spec: PromptSpec) -> tuple[int, int]:
        """(width, height); --one_frame_auto_resize takes the first control image's aspect at the requested area."""
        if spec.one_frame is None or not self.args.one_frame_auto_resize or not spec.control_image_paths:
            return spec.width, spec.height
        from musubi_tuner.dataset.bucket import fit_area_bucket
        from musubi_tuner.inference.images import open_image_for_flag

        size = open_image_for_flag(spec.control_image_paths[0], "--control_image_path").size
        width, height = fit_area_bucket(size, (spec.width, spec.height), self.arch.traits.bucket_step)
        logger.info("--one_frame_auto_resize: %dx%d from the control image's %dx%d", width, height, *size)
        return width, height

    def generate(self, spec: PromptSpec, conditions: Conditions | None = None) -> list[Path]:
        return self.write(self.sample(spec, conditions), spec)

    def sample(self, spec: PromptSpec, conditions: Conditions | None = None) -> torch.Tensor:
        """The request's latents (1, 16, T, h, w): its section loop or one-frame inference (samples during
        training call this with the DiT being trained)."""
        from musubi_tuner.architectures.framepack import one_frame

        prompts, negative = conditions or encode_section_prompts(self.arch, self.interactive_encoders(), spec,
                                                                 self.args.custom_system_prompt)
        width, height = self._size(spec)
        images = self._section_images(spec, width, height)
        settings, magcache = self._settings(spec), self._magcache(spec)
        generator = torch.Generator(device="cpu").manual_seed(int(spec.seed))
        self.dit.eval()
        if spec.one_frame is not None:
            controls, masks = self._control_inputs(spec, width, height)
            options = one_frame.parse_one_frame_options(spec.one_frame)
            inputs = one_frame.one_frame_inputs(options, controls, masks, self.args.latent_window_size,
                                                height // 8, width // 8)
            latents = one_frame.sample_one_frame(self.dit, inputs, prompts[0], negative, images[0], settings,
                                                 generator, height, width, magcache=magcache)
        else:
            latents = self._sample_video(spec, prompts, negative, images, width, height, settings, generator, magcache)
        if magcache is not None:
            self._report_magcache(magcache)
        return latents

    def _sample_video(self, spec, prompts, negative, images, width, height, settings, generator, magcache):
        from musubi_tuner.architectures.framepack import sampling

        window = self.args.latent_window_size
        sections = spec.video_sections or gs.section_count(spec.video_seconds, window)
        paddings = gs.parse_latent_paddings(self.args.latent_paddings) if self.args.latent_paddings else None
        end_latent = None
        if spec.end_image_path:
            from musubi_tuner.inference.images import load_image_resized

            flag = "--end_image_path" if spec.end_image_path == self.args.end_image_path else "--ei"
            end_latent = self._encode_image(load_image_resized(spec.end_image_path, width, height, flag).numpy(),
                                            spec.seed)
        logger.info("%dx%d, %d sections of %d frames (%d frames in all), %d steps", width, height, sections,
                    gs.section_frames(window), gs.total_pixel_frames(sections, window), spec.steps)
        request = VideoRequest(height=height, width=width, latent_window_size=window,
                               plan=gs.plan_sections(sections, self.args.f1, paddings), prompts=prompts,
                               negative=negative, images=images, end_latent=end_latent,
                               on_section=lambda step, prompt: logger.info("section %d: %s", step.section_index,
                                                                           prompt))
        loop = sampling.sample_f1 if self.args.f1 else sampling.sample_vanilla
        return loop(self.dit, request, settings, generator, magcache=magcache)

    @staticmethod
    def _report_magcache(magcache) -> None:
        ratios = magcache.finish()
        if magcache.calibrate:
            for section, values in enumerate(ratios):
                print(f"MagCache ratios, section {section} (pass to --magcache_mag_ratios):")
                print(",".join(f"{v:.5f}" for v in values))
        else:
            logger.info("MagCache skipped %d block-stack runs", magcache.skipped)

    # ---- output --------------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor, one_frame: bool) -> torch.Tensor:
        """(1, 16, T, h, w) -> uint8 (T', H, W, 3): one frame at a time in one-frame mode, all at once with
        --bulk_decode (or a length no section split explains), else section by section, cross-faded."""
        from musubi_tuner.architectures.common import model_range_to_pixels
        from musubi_tuner.models.hunyuan_video.vae_files import decode_hv_latents

        vae, window = self._vae(), self.args.latent_window_size
        frames = latents.shape[2]
        if one_frame:
            pixels = torch.cat([decode_hv_latents(vae, latents[:, :, i:i + 1]).float().cpu() for i in range(frames)],
                               dim=2)
        elif self.args.bulk_decode or (frames - 1) % window or frames == 1:
            pixels = decode_hv_latents(vae, latents).float().cpu()
        else:
            chunks = gs.decode_chunks((frames - 1) // window, window)
            pixels = None
            for chunk in reversed(chunks):  # the reference joins from the end of the video back to the start
                part = decode_hv_latents(vae, latents[:, :, chunk]).float().cpu()
                pixels = part if pixels is None else gs.cross_fade(part, pixels, gs.section_frames(window))
        return model_range_to_pixels(pixels)[0]

    def write(self, latents: torch.Tensor, spec: PromptSpec | None, seed: Any = None) -> list[Path]:
        from musubi_tuner.inference.generate import generation_metadata
        from musubi_tuner.inference.outputs import write_outputs

        one_frame = (spec.one_frame if spec is not None else self.args.one_frame_inference) is not None
        frames = None if self.args.output_type == "latent" else self.decode(latents, one_frame)
        metadata = None
        if not self.args.no_metadata and spec is not None:
            metadata = {**generation_metadata(spec), "video_length": str(4 * (latents.shape[2] - 1) + 1),
                        "latent_window_size": str(self.args.latent_window_size), "f1": str(self.args.f1),
                        "one_frame": spec.one_frame or "", "embedded_cfg_scale": str(spec.embedded_guidance)}
        paths = write_outputs(self.args.output_type, frames, latents[0].cpu(), self.args.save_path,
                              spec.seed if spec else seed, self.args.fps, metadata)
        for path in paths:
            print(f"saved {path}")
        return paths


def _grey_resized(path: str, width: int, height: int, alpha: bool) -> np.ndarray | None:
    """A mask image as uint8 (H, W), scaled and cropped like the image it masks; alpha=True: the image's alpha
    channel, or None when it has none."""
    from PIL import Image

    from musubi_tuner.dataset.media import resize_to_bucket

    flag = "--control_image_path" if alpha else "--control_image_mask_path"
    if not Path(path).is_file():
        raise UserError(f"{flag} {path}: image not found (check the path)")
    with Image.open(path) as image:
        if alpha:
            if "A" not in image.getbands():
                return None
            grey = image.getchannel("A")
        else:
            grey = image.convert("L")
        return resize_to_bucket(grey, (width, height))
