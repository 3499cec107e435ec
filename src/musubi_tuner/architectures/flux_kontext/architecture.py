"""FluxKontextArchitecture: the FLUX.1 Kontext [dev] contract implementation (see architectures/base.py).

What is Kontext-specific lives here and nowhere else: images only, two text encoders (T5-XXL
sequence + CLIP-L pooled), the control image's latents packed 2x2 and appended to the target
tokens with index-1 position ids, the guidance embedding, and LoRA names from the BFL checkpoint
(fused `img_attn.qkv` / `linear1` spanning several diffusers Linears).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from musubi_tuner.architectures.base import Architecture, GenerationDefaults
from musubi_tuner.architectures.common import (
    dit_compute_dtype,
    model_range_to_pixels,
    pixels_to_model_range,
    str_to_dtype,
)
from musubi_tuner.dataset.items import ItemPixels
from musubi_tuner.dataset.traits import DatasetTraits
from musubi_tuner.errors import UserError
from musubi_tuner.networks.targets import LoraTarget, targets_from_layout

logger = logging.getLogger(__name__)

LATENT_CHANNELS = 16
TRAINING_GUIDANCE = 1.0
"""Embedded guidance while training: the reference feeds 1.0 to Kontext's guidance embedder."""


@dataclass
class FluxTextEncoders:
    t5: nn.Module
    t5_tokenizer: Any
    clip: nn.Module
    clip_tokenizer: Any


class FluxKontextArchitecture(Architecture):
    name = "flux_kontext"
    script_prefix = "flux_kontext"
    traits = DatasetTraits(cache_code="fk", architecture="flux_kontext", bucket_step=16, frame_stride=None,
                           target_fps=None, control="required")
    network_module = "networks.lora_flux"
    modelspec_architecture = "Flux.1-dev"
    # Reference defaults (regex fullmatch on the BFL module path): norms always; modulation only when the
    # user gives no exclude_patterns of their own.
    lora_default_excludes = (r".*(norm).*",)
    lora_default_excludes_if_unset = (r".*(img_mod\.lin|txt_mod\.lin|modulation\.lin).*",)
    # the reference's fp8_optimization keys for FLUX.1 Kontext: the modulation layers (`img_mod.lin`, `modulation.lin`)
    # stay in bf16
    fp8_scaled_keys = (("single_blocks", "double_blocks"), ("norm", "mod"))
    generation_defaults = GenerationDefaults(
        width=1024, height=1024, frames=1, fps=1.0, infer_steps=25, guidance_scale=1.0, flow_shift=None,
        negative_prompt="", embedded_guidance=2.5, sample_solver="vanilla",  # the reference samples FLUX with Euler
    )

    # ---- flags -------------------------------------------------------------------------------------
    def add_arguments(self, parser: argparse.ArgumentParser, purpose: str) -> None:
        from musubi_tuner.utils.flag_types import finite_float, positive_int

        if purpose in ("cache_text", "train", "generate"):
            parser.add_argument("--text_encoder1", default=None, help="T5-XXL text encoder (t5xxl_fp16.safetensors)")
            parser.add_argument("--text_encoder2", default=None, help="CLIP-L text encoder (clip_l.safetensors)")
            parser.add_argument("--fp8_t5", action="store_true", help="store T5-XXL Linear weights in float8_e4m3fn")
            parser.add_argument("--t5_tokenizer", default=None,
                                help="folder with the T5 tokenizer (google/t5-v1_1-xxl); default: HF cache, offline")
            parser.add_argument("--clip_tokenizer", default=None,
                                help="folder with the CLIP tokenizer (openai/clip-vit-large-patch14); default: HF cache")
            parser.add_argument("--text_encoder_dtype", default=None,
                                help="text encoder compute dtype (default bfloat16)")
        if purpose == "generate":
            parser.add_argument("--image_size", type=positive_int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"),
                                help="image height and width, multiples of 16 (default 1024 1024)")
            parser.add_argument("--control_image_path", default=None, help="control (reference) image to edit")
            parser.add_argument("--no_resize_control", action="store_true",
                                help="keep the control image's size (cropped to multiples of 16) instead of "
                                     "resizing it to the nearest preferred Kontext resolution")
            parser.add_argument("--embedded_cfg_scale", type=finite_float, default=None,
                                help="embedded (distilled) guidance scale (default 2.5)")
            # The reference writes images and samples with FLUX's Euler schedule.
            parser.set_defaults(output_type="images")

    def validate_arguments(self, args: argparse.Namespace, purpose: str) -> None:
        if purpose != "generate":
            return
        if args.output_type in ("video", "both"):
            raise UserError(f"--output_type {args.output_type}: FLUX.1 Kontext makes images; "
                            "use images, latent or latent_images")
        if args.image_size is not None:
            self.check_request_size(args.image_size[1], args.image_size[0], 1,
                                    {"height": "--image_size HEIGHT", "width": "--image_size WIDTH"})

    # ---- latent side -------------------------------------------------------------------------------
    def load_vae(self, args: argparse.Namespace, device: torch.device) -> nn.Module:
        from musubi_tuner.architectures.flux_kontext.ae_files import load_flux_ae

        if not args.vae:
            raise UserError("no autoencoder given: pass --vae ae.safetensors (the FLUX.1 AE)")
        # float32 by default, as the reference runs the FLUX AE
        return load_flux_ae(args.vae, device=device, dtype=str_to_dtype(args.vae_dtype, torch.float32, "--vae_dtype"))

    def _encode_images(self, ae: nn.Module, images: list[torch.Tensor], generator=None) -> list[torch.Tensor]:
        """uint8 (1, H, W, 3) images -> latents (16, H/8, W/8); same-size images share one VAE call."""
        from musubi_tuner.architectures.flux_kontext.ae_files import encode_flux_latents

        out: list[torch.Tensor | None] = [None] * len(images)
        by_size: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            by_size.setdefault(tuple(img.shape), []).append(i)
        for indices in by_size.values():
            pixels = torch.stack([images[i] for i in indices])  # (B, 1, H, W, 3)
            x = pixels_to_model_range(pixels, ae.device, ae.dtype)[:, :, 0]
            latents = encode_flux_latents(ae, x, sample=True, generator=generator).to(ae.dtype).cpu()
            for i, latent in zip(indices, latents):
                out[i] = latent
        return out

    def latent_cache_contents(self, args: argparse.Namespace) -> set[str]:
        return {"latents", "latents_control"}

    def encode_latents(self, encoders: nn.Module, batch: list[ItemPixels],
                       args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
        for item in batch:
            if len(item.control) != 1:
                raise UserError(f"FLUX.1 Kontext needs exactly one control image per item, got {len(item.control)}; "
                                "check control_directory / control_path in the dataset config")
        targets = self._encode_images(encoders, [item.pixels[:1] for item in batch])
        # a control kept at its own size (no_resize_control) must still pack 2x2: crop to multiples of 16
        controls = [item.control[0][:1, : item.control[0].shape[1] // 16 * 16, : item.control[0].shape[2] // 16 * 16]
                    for item in batch]
        if any(c.shape[1] == 0 or c.shape[2] == 0 for c in controls):
            raise UserError("a control image is smaller than 16x16 pixels; use a larger control image")
        control_latents = self._encode_images(encoders, controls)
        return [{"latents": t, "latents_control": c} for t, c in zip(targets, control_latents)]

    def decode_latents(self, encoders: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        from musubi_tuner.architectures.flux_kontext.ae_files import decode_flux_latents

        if latents.dim() == 5:  # (B, C, 1, H, W) from a latent file
            latents = latents[:, :, 0]
        images = decode_flux_latents(encoders, latents)
        return model_range_to_pixels(images.unsqueeze(2))

    # ---- text side ---------------------------------------------------------------------------------
    def load_text_encoders(self, args: argparse.Namespace, device: torch.device) -> FluxTextEncoders:
        from musubi_tuner.architectures.flux_kontext.text_encoder_files import load_flux_tokenizers, load_t5xxl
        from musubi_tuner.models.clip_text import load_clip_l

        if not args.text_encoder1 or not args.text_encoder2:
            raise UserError("FLUX.1 Kontext needs both text encoders: --text_encoder1 t5xxl_fp16.safetensors "
                            "--text_encoder2 clip_l.safetensors")
        dtype = str_to_dtype(getattr(args, "text_encoder_dtype", None), torch.bfloat16, "--text_encoder_dtype")
        t5_tok, clip_tok = load_flux_tokenizers(args.t5_tokenizer, args.clip_tokenizer)
        t5 = load_t5xxl(args.text_encoder1, device=device, dtype=dtype, fp8=bool(getattr(args, "fp8_t5", False)))
        clip = load_clip_l(args.text_encoder2, device=device, dtype=dtype)
        return FluxTextEncoders(t5=t5, t5_tokenizer=t5_tok, clip=clip, clip_tokenizer=clip_tok)

    def encode_prompts(self, encoders: FluxTextEncoders, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        from musubi_tuner.architectures.flux_kontext.text_encoder_files import encode_prompts_flux

        return encode_prompts_flux(encoders.t5, encoders.t5_tokenizer, encoders.clip, encoders.clip_tokenizer, prompts)

    # ---- DiT ---------------------------------------------------------------------------------------
    def load_dit(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> nn.Module:
        from musubi_tuner.architectures.flux_kontext.dit_files import load_flux_dit

        if not args.dit:
            raise UserError("no DiT given: pass --dit flux1-kontext-dev.safetensors")
        return load_flux_dit(args.dit, device=device, dtype=dtype)

    def swapped_blocks(self, dit: nn.Module, count: int) -> list[nn.Module]:
        from musubi_tuner.memory.block_swap import double_single_split

        # the reference's FLUX keeps two blocks of each kind on the device
        return double_single_split(list(dit.transformer_blocks), list(dit.single_transformer_blocks), count, keep=2)

    def lora_candidates(self, dit: nn.Module) -> list[LoraTarget]:
        from musubi_tuner.architectures.flux_kontext.dit_files import original_linear_parts

        return targets_from_layout(dit, original_linear_parts(dit))

    def lora_targets_for_conversion(self, lora_sd: dict[str, torch.Tensor]) -> list[LoraTarget]:
        """LoRA targets of a shapes-only (meta) DiT sized from the LoRA's own keys (no model file needed)."""
        from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

        from musubi_tuner.architectures.key_plan import block_layout_from_lora, default_axes_dims_rope, heads_for_width

        num_double, num_single, hidden = block_layout_from_lora(lora_sd)
        head_dim, heads = heads_for_width(hidden)
        config = {"in_channels": 64, "num_layers": num_double, "num_single_layers": num_single,
                  "attention_head_dim": head_dim, "num_attention_heads": heads,
                  "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
                  "axes_dims_rope": default_axes_dims_rope(head_dim)}
        with torch.device("meta"):
            dit = FluxTransformer2DModel.from_config(config)
        return self.lora_candidates(dit)

    def dit_state_dict_to_original(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from musubi_tuner.architectures.flux_kontext.dit_files import diffusers_to_bfl

        return diffusers_to_bfl(state_dict)

    def predict(self, dit: nn.Module, batch: dict[str, Any], noisy_latents: torch.Tensor,
                timesteps: torch.Tensor) -> torch.Tensor:
        from musubi_tuner.architectures.flux_kontext.packing import (
            pack_latents,
            prepare_image_ids,
            prepare_text_ids,
            unpack_latents,
        )

        dtype, device = dit_compute_dtype(dit), noisy_latents.device
        b, _, h, w = noisy_latents.shape
        tokens = pack_latents(noisy_latents)
        ids = prepare_image_ids(h // 2, w // 2, index=0)
        control = batch.get("latents_control")
        if control is not None:  # reference-image tokens follow the target tokens, with index 1 in their ids
            control = control.to(device, noisy_latents.dtype)
            tokens = torch.cat([tokens, pack_latents(control)], dim=1)
            ids = torch.cat([ids, prepare_image_ids(control.shape[-2] // 2, control.shape[-1] // 2, index=1)])
        t5 = batch["t5_vec"].to(device, dtype)
        guidance = None
        if dit.config.guidance_embeds:
            value = batch.get("guidance", TRAINING_GUIDANCE)
            guidance = torch.as_tensor(value, dtype=torch.float32).reshape(-1).expand(b).to(device, dtype)
        out = dit(hidden_states=tokens.to(dtype), encoder_hidden_states=t5,
                  pooled_projections=batch["clip_l_pooler"].to(device, dtype),
                  timestep=(timesteps.to(device, torch.float32) / 1000.0).to(dtype),
                  img_ids=ids.to(device), txt_ids=prepare_text_ids(t5.shape[1]).to(device), guidance=guidance,
                  return_dict=False)[0]
        return unpack_latents(out[:, : (h // 2) * (w // 2)], h, w).to(noisy_latents.dtype)

    # ---- generation --------------------------------------------------------------------------------
    def latent_shape(self, width: int, height: int, frames: int) -> tuple[int, ...]:
        self.check_request_size(width, height, frames, {"height": "--image_size", "width": "--image_size"})
        return (LATENT_CHANNELS, height // 8, width // 8)

    def prompt_spec_from_args(self, args: argparse.Namespace):
        from musubi_tuner.inference.prompts import PromptSpec

        height, width = args.image_size if args.image_size else (None, None)
        return PromptSpec(prompt=args.prompt or "", negative_prompt=args.negative_prompt, width=width, height=height,
                          frames=1, seed=args.seed, steps=args.infer_steps, guidance_scale=args.guidance_scale,
                          embedded_guidance=args.embedded_cfg_scale, flow_shift=args.flow_shift)

    def generation_conditioning(self, encoders: nn.Module, request: Any, latent_shape: tuple[int, ...],
                                args: argparse.Namespace) -> dict[str, Any]:
        """The control image (a prompt's first `--ci`, else --control_image_path) as packed-ready latents."""
        from musubi_tuner.architectures.flux_kontext.control import load_control_image

        paths = list(getattr(request, "control_image_paths", None) or [])
        path = paths[0] if paths else getattr(args, "control_image_path", None)
        if not path:
            logger.warning("no control image (--control_image_path / --ci): generating from the prompt alone")
            return {}
        # The generate script resizes to a preferred Kontext size unless --no_resize_control; samples during
        # training (no such flag) keep the control's own size, as the reference does.
        resize = hasattr(args, "no_resize_control") and not args.no_resize_control
        pixels = load_control_image(path, resize_to_preferred=resize, flag="--ci" if paths else "--control_image_path")
        seed = getattr(request, "seed", None)
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        latent = self._encode_images(encoders, [pixels[None]], generator=generator)[0]
        return {"latents_control": latent[None]}
