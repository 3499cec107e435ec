"""FramePackArchitecture: FramePack / FramePack-F1 (and one-frame training), model and training side.

FramePack is HunyuanVideo with a packed history: it reuses the HunyuanVideo VAE and text encoders
(`models/hunyuan_video/`), adds a SigLIP image encoder (`models/siglip_files.py`) and a DiT that also takes clean
history latents at 1x/2x/4x compression with their RoPE frame indices (diffusers'
`HunyuanVideoFramepackTransformer3DModel`, driven by `packed_forward` as the reference drives its packed model).

Caches, as the reference's `fpack_cache_latents.py` / `fpack_cache_text_encoder_outputs.py` write them:
- latents are scaled by the VAE factor when cached (unlike HunyuanVideo), one cache per section of
  `fp_latent_window_size` latents, named `{stem}_{start:05d}-{frames:03d}-{section:04d}_{W}x{H}_fp.safetensors`
  (`cache_sections.py` holds the arithmetic); one-frame caches come from image datasets with control images;
- text: `llama_vec` (512, 4096) zero-padded after the prompt's tokens, `llama_attention_mask` (512,) bool,
  `clip_l_pooler` (768,).
Training feeds `--guidance_scale` x1000 to the guidance embedder (the reference trainer's convention,
`packed_forward.embedded_guidance`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from musubi_tuner.architectures.base import Architecture, GenerationDefaults
from musubi_tuner.architectures.common import dit_compute_dtype, pixels_to_model_range
from musubi_tuner.architectures.framepack import cache_sections
from musubi_tuner.architectures.framepack.lora_conversion import LORA_DEFAULT_EXCLUDES
from musubi_tuner.dataset.items import Item, ItemPixels
from musubi_tuner.dataset.traits import DatasetTraits
from musubi_tuner.errors import UserError
from musubi_tuner.networks.targets import LoraTarget

logger = logging.getLogger(__name__)

LATENT_CHANNELS = 16
LLAMA_VEC_LENGTH = 512
"""The reference pads (or crops) the LLM states to this many tokens (`crop_or_pad_yield_mask(..., 512)`)."""
LATENT_CACHE_KEYS = ("latents", "latent_indices", "latents_clean", "clean_latent_indices", "image_embeddings")
"""Batch keys every FramePack latent cache has (2x/4x history is optional: one-frame caches may leave it out)."""


class FramePackArchitecture(Architecture):
    name = "framepack"
    script_prefix = "fpack"
    # the reference's FramePack datasets resample videos to 30 fps; one-frame image datasets take control images
    traits = DatasetTraits(cache_code="fp", architecture="framepack", bucket_step=16, frame_stride=4,
                           target_fps=30.0, control="optional")
    network_module = "networks.lora_framepack"
    modelspec_architecture = "framepack"
    lora_default_excludes = LORA_DEFAULT_EXCLUDES
    # FramePack's original names are diffusers' own: diffusers' FramePack pipeline reads `transformer.<name>` keys
    # (it would take `diffusion_model.` keys for original HunyuanVideo names and mis-convert them)
    other_lora_prefix = "transformer"
    # the reference's FramePack fp8_optimization keys (its packed model is published in diffusers' names)
    fp8_scaled_keys = (("transformer_blocks", "single_transformer_blocks"), ("norm",))
    # fpack_generate_video.py defaults: --video_size 256 256, --fps 30, --infer_steps 25, --guidance_scale 1.0,
    # --embedded_cfg_scale 10.0, --flow_shift None (resolution-dependent), UniPC; frames: --video_seconds 5 at 30 fps
    # = round(150 / 36) = 4 sections of 9 latents = 4 * 9 * 4 + 1 frames
    generation_defaults = GenerationDefaults(
        width=256, height=256, frames=145, fps=30.0, infer_steps=25, guidance_scale=1.0, flow_shift=None,
        negative_prompt="", embedded_guidance=10.0, sample_solver="unipc",
    )

    # ---- flags -------------------------------------------------------------------------------------
    def add_arguments(self, parser: argparse.ArgumentParser, purpose: str) -> None:
        if purpose in ("cache_latents", "train", "generate"):
            from musubi_tuner.models.hunyuan_video.vae_flags import add_hv_vae_arguments

            add_hv_vae_arguments(parser)
            parser.add_argument("--image_encoder", default=None,
                                help="SigLIP image encoder: sigclip_vision_patch14_384.safetensors or "
                                     "flux_redux_bfl image_encoder/model.safetensors (caching: required; "
                                     "training: only for sample images)")
        if purpose in ("cache_text", "train", "generate"):
            from musubi_tuner.models.hunyuan_video.text_encoders import add_text_encoder_arguments

            add_text_encoder_arguments(parser)
        if purpose in ("cache_latents", "train"):
            parser.add_argument("--f1", action="store_true",
                                help="FramePack-F1: caches for forward (vanilla) sampling instead of the inverted "
                                     "anti-drifting order of plain FramePack (training: F1 sample images)")
            parser.add_argument("--one_frame", action="store_true",
                                help="one-frame training: caches from image datasets with control images "
                                     "(fp_1f_* dataset keys); training: one-frame sample images")
        if purpose == "cache_latents":
            parser.add_argument("--one_frame_no_2x", action="store_true",
                                help="one-frame: no 2x history indices in the caches")
            parser.add_argument("--one_frame_no_4x", action="store_true",
                                help="one-frame: no 4x history indices in the caches")
        if purpose == "train":
            parser.add_argument("--latent_window_size", type=int, default=9,
                                help="latents per section for sample images (default 9)")
            parser.add_argument("--bulk_decode", action="store_true",
                                help="decode all sections of a sample video at once")

    def validate_arguments(self, args: argparse.Namespace, purpose: str) -> None:
        from musubi_tuner.models.hunyuan_video.vae_flags import validate_hv_vae_arguments

        validate_hv_vae_arguments(args)
        if purpose == "cache_latents":
            if not args.image_encoder:
                raise UserError("--image_encoder is required: FramePack caches the SigLIP embedding of each clip's "
                                "first frame (sigclip_vision_patch14_384.safetensors)")
            if not Path(args.image_encoder).exists():
                raise UserError(f"--image_encoder {args.image_encoder}: file not found (check the path)")
            if (args.one_frame_no_2x or args.one_frame_no_4x) and not args.one_frame:
                raise UserError("--one_frame_no_2x / --one_frame_no_4x only apply with --one_frame; add --one_frame "
                                "or drop them")
            if args.f1 and args.one_frame:
                raise UserError("--f1 and --one_frame are different cache kinds; give one of them")
        if purpose == "train" and getattr(args, "sample_prompts", None) and not args.image_encoder:
            raise UserError("--sample_prompts needs --image_encoder (sigclip_vision_patch14_384.safetensors): "
                            "FramePack samples are conditioned on the SigLIP embedding of each line's --i image")
        if getattr(args, "latent_window_size", 9) < 1:
            raise UserError(f"--latent_window_size {args.latent_window_size}: must be a positive number (default 9)")

    # ---- latent side -------------------------------------------------------------------------------
    def load_vae(self, args: argparse.Namespace, device: torch.device) -> nn.Module:
        from musubi_tuner.models.hunyuan_video.vae_flags import load_hv_vae_from_args

        return load_hv_vae_from_args(args, device)

    def load_latent_encoders(self, args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, nn.Module]:
        from musubi_tuner.models.siglip_files import load_siglip_image_encoder

        vae = self.load_vae(args, device)
        return vae, load_siglip_image_encoder(args.image_encoder, device=device, dtype=vae.dtype)

    def latent_cache_contents(self, args: argparse.Namespace) -> set[str]:
        contents = set(LATENT_CACHE_KEYS)
        if not getattr(args, "one_frame", False):
            contents |= {"latents_clean_2x", "latents_clean_4x"}
        return contents

    def latent_pixels(self, item: Item, spec: Any, pixels: ItemPixels) -> ItemPixels:
        if item.frame_indices is None:
            return pixels
        used = cache_sections.used_frame_count(item.frame_count, spec.fp_latent_window_size)
        if used < pixels.pixels.shape[0]:
            logger.info("%s: %d frames, %d used (whole sections of %d latents)", item.item_key, item.frame_count,
                        used, spec.fp_latent_window_size)
        return ItemPixels(pixels=pixels.pixels[:used], control=pixels.control, control_alpha=pixels.control_alpha,
                          mask=pixels.mask)

    def latent_cache_paths(self, item: Item, spec: Any, args: argparse.Namespace) -> list[Path]:
        what = f"{spec.label}: {item.media_path}"
        if item.mask_path is not None:
            raise UserError(f"{what}: FramePack training takes no loss masks; remove mask_directory / alpha_mask "
                            "from the dataset")
        if getattr(args, "one_frame", False):
            if item.frame_indices is not None:
                raise UserError(f"{spec.label}: --one_frame trains on image datasets with control images; use "
                                "image_directory with control_directory (or drop --one_frame for videos)")
            if not item.control_paths:
                raise UserError(f"{what} has no control image; --one_frame needs one per fp_1f_clean_indices entry "
                                "in control_directory (same stem)")
            return [item.latent_cache_path]
        if item.frame_indices is None:
            raise UserError(f"{spec.label}: FramePack trains on video datasets; for image datasets with control "
                            "images add --one_frame (one-frame training)")
        sections = cache_sections.check_clip_length(item.frame_count, spec.fp_latent_window_size, what)
        return [section_cache_path(item.latent_cache_path, s) for s in range(sections)]

    def encode_latents(self, encoders: tuple[nn.Module, nn.Module], batch: list[ItemPixels],
                       args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
        """Video: {"latents": (16, F, H, W) scaled, the whole clip; "image_embeddings": SigLIP of frame 0}.
        One-frame: "latents" holds the control images' latents, then the target's, each encoded on its own
        (the VAE is temporally compressing), controls masked by their alpha; the embedding is the first control's."""
        from musubi_tuner.models.siglip_files import encode_siglip_images

        vae, image_encoder = encoders
        if getattr(args, "one_frame", False):
            latents = torch.stack([self._one_frame_latents(vae, item) for item in batch])
            firsts = [item.control[0][0] for item in batch]
        else:
            video = torch.stack([item.pixels for item in batch])
            latents = self._encode(vae, video)
            firsts = [item.pixels[0] for item in batch]
        embeddings = encode_siglip_images(image_encoder, [f.numpy() for f in firsts]).to("cpu", latents.dtype)
        return [{"latents": lat, "image_embeddings": emb} for lat, emb in zip(latents, embeddings)]

    @staticmethod
    def _encode(vae: nn.Module, video: torch.Tensor) -> torch.Tensor:
        """uint8 (B, F, H, W, 3) -> DiT-space latents (B, 16, f, h, w) in the VAE's dtype, on the CPU (a posterior
        sample times the scaling factor, as the reference's `vae_encode`)."""
        from musubi_tuner.models.hunyuan_video.vae_files import HV_VAE_SCALING_FACTOR, encode_hv_latents

        pixels = pixels_to_model_range(video, vae.device, vae.dtype)
        return (encode_hv_latents(vae, pixels, sample=True) * HV_VAE_SCALING_FACTOR).to(vae.dtype).cpu()

    def _one_frame_latents(self, vae: nn.Module, item: ItemPixels) -> torch.Tensor:
        frames = [*item.control, item.pixels]
        if any(f.shape[1:] != item.pixels.shape[1:] for f in item.control):
            raise UserError("one-frame training needs control images at the image's size; drop no_resize_control / "
                            "control_resolution from the dataset")
        latents = torch.cat([self._encode(vae, f[:1][None])[0] for f in frames], dim=1)  # (16, N + 1, h, w)
        for index, alpha in enumerate(item.control_alpha):
            if alpha is not None:
                latents[:, index] *= latent_mask(alpha, latents.shape[-2:]).to(latents.dtype)
        return latents

    def latent_cache_files(self, item: Item, spec: Any, content: dict[str, torch.Tensor],
                           args: argparse.Namespace) -> list[tuple[Path, dict[str, torch.Tensor]]]:
        window, embeddings = spec.fp_latent_window_size, content["image_embeddings"]
        if getattr(args, "one_frame", False):
            cache = cache_sections.one_frame_cache(
                content["latents"], window=window, clean_indices=spec.fp_1f_clean_indices,
                target_index=spec.fp_1f_target_index, no_post=spec.fp_1f_no_post, no_2x=args.one_frame_no_2x,
                no_4x=args.one_frame_no_4x)
            return [(item.latent_cache_path, {**cache, "image_embeddings": embeddings})]
        split = cache_sections.f1_sections if args.f1 else cache_sections.inverted_sections
        sections = split(content["latents"], window)
        return [(section_cache_path(item.latent_cache_path, index), {**section, "image_embeddings": embeddings})
                for index, section in enumerate(sections)]

    def decode_latents(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        from musubi_tuner.models.hunyuan_video.vae_files import decode_hv_pixels

        return decode_hv_pixels(vae, latents)

    # ---- text side ---------------------------------------------------------------------------------
    def load_text_encoders(self, args: argparse.Namespace, device: torch.device) -> Any:
        from musubi_tuner.models.hunyuan_video.text_encoders import load_hunyuan_text_encoders

        return load_hunyuan_text_encoders(args, device)

    def encode_prompts(self, encoders: Any, prompts: list[str], system_prompt: str | None = None
                       ) -> list[dict[str, torch.Tensor]]:
        """`llama_vec` (512, hidden): the prompt's LLM states, zeros after them; `llama_attention_mask` (512,) bool;
        `clip_l_pooler` (768,): the reference's FramePack text cache. system_prompt: generation's
        `--custom_system_prompt` in place of the video template's system text."""
        from musubi_tuner.models.hunyuan_video.prompt_template import system_prompt_template
        from musubi_tuner.models.hunyuan_video.text_encoders import encode_clip, encode_llm

        template = system_prompt_template(system_prompt) if system_prompt else None
        states, masks = encode_llm(encoders.llm, encoders.llm_tokenizer, prompts, template=template)
        pooled, _ = encode_clip(encoders.clip, encoders.clip_tokenizer, prompts)
        out = []
        for state, mask, pool in zip(states, masks, pooled):
            count = min(int(mask.sum()), LLAMA_VEC_LENGTH)
            vec = state.new_zeros((LLAMA_VEC_LENGTH, state.shape[-1]))
            vec[:count] = state[:count]
            keep = torch.zeros(LLAMA_VEC_LENGTH, dtype=torch.bool)
            keep[:count] = True
            out.append({"llama_vec": vec, "llama_attention_mask": keep, "clip_l_pooler": pool})
        return out

    # ---- DiT ---------------------------------------------------------------------------------------
    def load_dit(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> nn.Module:
        from musubi_tuner.architectures.framepack.dit_files import load_framepack_dit

        if not args.dit:
            raise UserError("no DiT given: pass --dit diffusion_pytorch_model-00001-of-00003.safetensors "
                            "(FramePackI2V_HY) or FramePackI2V_HY_bf16.safetensors")
        return load_framepack_dit(args.dit, device=device, dtype=dtype)

    def swapped_blocks(self, dit: nn.Module, count: int) -> list[nn.Module]:
        from musubi_tuner.memory.block_swap import double_single_split

        return double_single_split(list(dit.transformer_blocks), list(dit.single_transformer_blocks), count)

    def lora_candidates(self, dit: nn.Module) -> list[LoraTarget]:
        from musubi_tuner.architectures.framepack.lora_conversion import framepack_lora_candidates

        return framepack_lora_candidates(dit)

    def lora_state_dict_for_merge(self, lora_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Generation also takes musubi and diffusion-pipe HunyuanVideo LoRAs, converted (as the reference)."""
        from musubi_tuner.architectures.framepack.lora_conversion import framepack_lora_from_any

        return framepack_lora_from_any(lora_sd)

    def lora_targets_for_conversion(self, lora_sd: dict[str, torch.Tensor]) -> list[LoraTarget]:
        from musubi_tuner.architectures.framepack.lora_conversion import framepack_lora_targets_for_conversion

        return framepack_lora_targets_for_conversion(lora_sd)

    def dit_state_dict_to_original(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # FramePackI2V_HY is published in diffusers' names; the merged model is saved as it loads
        return dict(state_dict)

    def check_training_caches(self, latent_keys: dict[str, set[str]], args: argparse.Namespace) -> None:
        for path, keys in latent_keys.items():
            missing = [k for k in LATENT_CACHE_KEYS if k not in keys]
            if missing:
                raise UserError(f"{path} is not a FramePack section cache (no {', '.join(missing)}); re-run "
                                "fpack_cache_latents.py with --image_encoder (without --skip_existing)")

    def training_conditioning(self, args: argparse.Namespace) -> dict[str, Any]:
        # the reference's FramePack trainer feeds --guidance_scale (default 1.0) x1000 to the guidance embedder
        return {"guidance": torch.tensor([float(args.guidance_scale)])}

    def predict(self, dit: nn.Module, batch: dict[str, Any], noisy_latents: torch.Tensor,
                timesteps: torch.Tensor) -> torch.Tensor:
        from musubi_tuner.architectures.framepack.packed_forward import embedded_guidance, packed_forward

        dtype, device = dit_compute_dtype(dit), noisy_latents.device
        b, c, _, h, w = noisy_latents.shape

        def tensor(key: str, cast: bool = True) -> torch.Tensor | None:
            value = batch.get(key)
            if value is None:
                return None
            return value.to(device, dtype) if cast else value.to(device)

        history = {}
        for size, name in ((2, "2x"), (4 * 4, "4x")):
            indices = tensor(f"clean_latent_{name}_indices", cast=False)
            latents = tensor(f"latents_clean_{name}")
            if indices is not None and latents is None:  # one-frame caches leave the zero history out
                latents = torch.zeros((b, c, size, h, w), device=device, dtype=dtype)
            history[name] = (latents, indices)
        guidance = None
        if dit.config.guidance_embeds:  # x1000 in training and generation alike (the reference's trainer)
            scale = float(torch.as_tensor(batch.get("guidance", 1.0)).reshape(-1)[0])
            guidance = embedded_guidance(scale, b, device=device, dtype=dtype)
        out = packed_forward(
            dit, hidden_states=noisy_latents.to(dtype), timestep=timesteps.to(device, torch.float32),
            encoder_hidden_states=tensor("llama_vec"), encoder_attention_mask=tensor("llama_attention_mask", False),
            pooled_projections=tensor("clip_l_pooler"), image_embeddings=tensor("image_embeddings"),
            latent_indices=tensor("latent_indices", False), latents_clean=tensor("latents_clean"),
            clean_latent_indices=tensor("clean_latent_indices", False),
            latents_clean_2x=history["2x"][0], clean_latent_2x_indices=history["2x"][1],
            latents_clean_4x=history["4x"][0], clean_latent_4x_indices=history["4x"][1], guidance=guidance)
        return out.to(noisy_latents.dtype)

    # ---- generation (the section loop lives in sampling.py) ------------------------------------------
    def sample_requests(self, args: argparse.Namespace) -> list[Any]:
        from musubi_tuner.architectures.framepack.training_samples import load_framepack_sample_requests

        return load_framepack_sample_requests(self, args)

    def training_sampler(self, args: argparse.Namespace, device: torch.device) -> Any:
        from musubi_tuner.architectures.framepack.training_samples import FramePackTrainingSampler

        return FramePackTrainingSampler(self, args, device)

    def latent_shape(self, width: int, height: int, frames: int) -> tuple[int, ...]:
        if width % 16 or height % 16:
            raise UserError(f"--video_size {height} {width}: height and width must be multiples of 16")
        if frames < 1:
            raise UserError(f"frames {frames}: must be at least 1")
        return (LATENT_CHANNELS, cache_sections.latent_frame_count(frames), height // 8, width // 8)


def section_cache_path(item_path: Path, section: int) -> Path:
    """`clip_00000-045_0640x0480_fp.safetensors` -> `clip_00000-045-0002_0640x0480_fp.safetensors`: the section
    index joins the frame window token, as the reference names it (its parser splits names from the right)."""
    stem, size, code = item_path.name.rsplit("_", 2)
    return item_path.with_name(f"{stem}-{section:04d}_{size}_{code}")


def latent_mask(alpha: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """uint8 alpha (H, W) -> float weights (h, w) on the latent grid: a LANCZOS resize to 1/8, / 255, as the
    reference masks one-frame control latents."""
    from PIL import Image

    h, w = grid
    small = Image.fromarray(alpha.numpy(), mode="L").resize((w, h), Image.LANCZOS)
    return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)
