"""HunyuanVideoArchitecture: the HunyuanVideo (T2V, SkyReels V1 I2V) contract implementation, model side.

What is HunyuanVideo-specific lives here: the official DiT names (fused `img_attn_qkv` / `linear1` spanning
several diffusers Linears), the causal 3D VAE with scaling 0.476986 and no shift, caches holding the raw VAE
posterior sample (the reference's cache format; the scaling is applied when training), and the reference's
script names (`cache_latents.py`, `cache_text_encoder_outputs.py`, `hv_train_network.py`, `hv_generate_video.py`).
Text encoders: `models.hunyuan_video.text_encoders` (shared with FramePack). Prediction drives diffusers'
`HunyuanVideoTransformer3DModel` as the reference drives its model: LLM states + mask, CLIP-L pooled, embedded
guidance (x1000 at generation; `--guidance_scale` as is when training, as the reference), SkyReels V1 I2V image
latents concatenated on channels.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from musubi_tuner.architectures.base import Architecture, GenerationDefaults
from musubi_tuner.architectures.common import (
    dit_compute_dtype,
    pixels_to_model_range,
    str_to_dtype,
    video_prompt_spec,
)
from musubi_tuner.dataset.items import ItemPixels
from musubi_tuner.dataset.traits import DatasetTraits
from musubi_tuner.errors import UserError
from musubi_tuner.models.hunyuan_video.vae_files import HV_VAE_SCALING_FACTOR
from musubi_tuner.networks.targets import LoraTarget, targets_from_layout

logger = logging.getLogger(__name__)

LATENT_CHANNELS = 16
GUIDANCE_EMBED_SCALE = 1000.0
"""Generation feeds the embedded guidance scale x1000 to the guidance embedder (reference and diffusers alike)."""
TRAINING_GUIDANCE_INPUT = 1.0
"""The reference trainer's default `--guidance_scale`, fed to the guidance embedder without the x1000."""
I2V_IN_CHANNELS = 32
"""SkyReels V1 I2V: 16 noisy + 16 image-latent channels."""
SINGLE_BLOCK_LORA_PATTERN = r"single_blocks|single_transformer_blocks"
"""`--exclude_single_blocks`: LoRA modules of the single-stream blocks (original and diffusers names)."""


class HunyuanVideoArchitecture(Architecture):
    name = "hunyuan_video"
    script_prefix = "hv"
    traits = DatasetTraits(cache_code="hv", architecture="hunyuan_video", bucket_step=16, frame_stride=4,
                           target_fps=24.0)
    # The reference trains HunyuanVideo with its generic `networks.lora` (targets MMDoubleStreamBlock /
    # MMSingleStreamBlock) and always excludes the modulation layers.
    network_module = "networks.lora"
    modelspec_architecture = "hunyuan-video"
    lora_default_excludes = (r".*(img_mod|txt_mod|modulation).*",)
    fp8_targets: ClassVar[tuple[str, ...]] = (r"^transformer_blocks\.", r"^single_transformer_blocks\.")
    # hv_generate_video.py defaults (checked against its parser): --video_size 256 256, --video_length 129,
    # --fps 24, --infer_steps 50, --guidance_scale 1.0, --embedded_cfg_scale 6.0, --flow_shift 7.0, and the
    # Euler flow-matching sampler (FlowMatchDiscreteScheduler, solver "euler")
    generation_defaults = GenerationDefaults(
        width=256, height=256, frames=129, fps=24.0, infer_steps=50, guidance_scale=1.0, flow_shift=7.0,
        negative_prompt="", embedded_guidance=6.0, sample_solver="vanilla",
    )

    def script_name(self, stage: str) -> str:
        # The reference's HunyuanVideo caching scripts carry no prefix (it was its first architecture).
        if stage in ("cache_latents", "cache_text_encoder_outputs"):
            return f"{stage}.py"
        return super().script_name(stage)

    # ---- flags -------------------------------------------------------------------------------------
    def add_arguments(self, parser: argparse.ArgumentParser, purpose: str) -> None:
        if purpose in ("cache_latents", "train", "generate"):
            from musubi_tuner.models.hunyuan_video.vae_flags import add_hv_vae_arguments

            add_hv_vae_arguments(parser)
        if purpose in ("train", "generate"):
            parser.add_argument("--dit_in_channels", type=int, default=None,
                                help="DiT input channels: 16 (T2V), 32 (SkyReels V1 I2V); checked against --dit")
            parser.add_argument("--dit_dtype", default=None,
                                help="DiT dtype (default: bfloat16 when generating, the --mixed_precision dtype "
                                     "when training)")
        if purpose in ("cache_text", "train", "generate"):
            from musubi_tuner.models.hunyuan_video.text_encoders import add_text_encoder_arguments

            add_text_encoder_arguments(parser)
        if purpose == "generate":
            parser.add_argument("--video_size", type=int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"),
                                help="video height and width, multiples of 16 (default 256 256)")
            parser.add_argument("--video_length", type=int, default=None, help="frames, 4N+1 (default 129; 1 = image)")
            parser.add_argument("--fps", type=float, default=None, help="output frame rate (default 24)")
            parser.add_argument("--embedded_cfg_scale", type=float, default=None,
                                help="embedded (distilled) guidance scale (default 6.0)")
            parser.add_argument("--split_uncond", action="store_true",
                                help="accepted for compatibility: the positive and negative passes always run "
                                     "separately (batch-size-1 memory)")
            parser.add_argument("--video_path", default=None,
                                help="video to video: the source video (file or folder of frames), resized to "
                                     "--video_size; its first --video_length frames are used")
            parser.add_argument("--strength", type=float, default=0.8,
                                help="video to video: share of the steps re-run on the noised source (default 0.8; "
                                     "1.0 ignores the source)")
            parser.add_argument("--image_path", default=None,
                                help="SkyReels V1 I2V: the start image (needs a 32-channel DiT, --dit_in_channels 32)")
            parser.add_argument("--exclude_single_blocks", action="store_true",
                                help="do not apply the LoRA modules of the single-stream blocks")

    def validate_arguments(self, args: argparse.Namespace, purpose: str) -> None:
        if getattr(args, "dit_in_channels", None) not in (None, 16, I2V_IN_CHANNELS):
            raise UserError(f"--dit_in_channels {args.dit_in_channels}: use 16 (T2V) or 32 (SkyReels V1 I2V)")
        if getattr(args, "dit_dtype", None) is not None:
            str_to_dtype(args.dit_dtype, torch.bfloat16, "--dit_dtype")
        from musubi_tuner.models.hunyuan_video.vae_flags import validate_hv_vae_arguments

        validate_hv_vae_arguments(args)
        if purpose == "generate":
            self._validate_generation(args)

    def _validate_generation(self, args: argparse.Namespace) -> None:
        if args.video_size is not None:
            height, width = args.video_size
            if height <= 0 or width <= 0:
                raise UserError(f"--video_size {height} {width}: height and width must be positive multiples of 16")
            self.latent_shape(width, height, args.video_length or 1)
        elif args.video_length is not None:
            self.latent_shape(16, 16, args.video_length)
        if args.fps is not None and args.fps <= 0:
            raise UserError(f"--fps {args.fps}: must be > 0")
        if args.video_path:
            from musubi_tuner.inference.video_to_video import steps_for_strength

            if not Path(args.video_path).exists():
                raise UserError(f"--video_path {args.video_path}: video not found (check the path)")
            steps_for_strength(args.infer_steps or self.generation_defaults.infer_steps, args.strength)
        if args.image_path:
            if args.dit_in_channels == 16:
                raise UserError("--image_path needs the SkyReels V1 I2V DiT (32 input channels): pass "
                                "--dit_in_channels 32 with skyreels_hunyuan_i2v_bf16.safetensors, or drop --image_path")
            if not Path(args.image_path).is_file():
                raise UserError(f"--image_path {args.image_path}: image not found (check the path)")
        elif args.dit_in_channels == I2V_IN_CHANNELS and not (args.from_file or args.interactive):
            raise UserError("--dit_in_channels 32 (SkyReels V1 I2V) needs a start image: pass --image_path")
        if args.exclude_single_blocks:  # the shared LoRA filter drops these modules before merging
            args.exclude_patterns = [*(args.exclude_patterns or []), SINGLE_BLOCK_LORA_PATTERN]

    # ---- latent side -------------------------------------------------------------------------------
    def load_vae(self, args: argparse.Namespace, device: torch.device) -> nn.Module:
        from musubi_tuner.models.hunyuan_video.vae_flags import load_hv_vae_from_args

        return load_hv_vae_from_args(args, device)

    def latent_cache_contents(self, args: argparse.Namespace) -> set[str]:
        return {"latents"}

    def encode_latents(self, encoders: nn.Module, batch: list[ItemPixels],
                       args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
        """{"latents": (16, F, H, W)}: the VAE posterior sample, unscaled, exactly what the reference caches."""
        from musubi_tuner.models.hunyuan_video.vae_files import encode_hv_latents

        vae = encoders
        video = pixels_to_model_range(torch.stack([item.pixels for item in batch]), vae.device, vae.dtype)
        latents = encode_hv_latents(vae, video, sample=True).to(vae.dtype).cpu()
        return [{"latents": latent} for latent in latents]

    def latents_from_cache(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * HV_VAE_SCALING_FACTOR

    def decode_latents(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        from musubi_tuner.models.hunyuan_video.vae_files import decode_hv_pixels

        return decode_hv_pixels(vae, latents)

    # ---- text side ---------------------------------------------------------------------------------
    def load_text_encoders(self, args: argparse.Namespace, device: torch.device) -> Any:
        from musubi_tuner.models.hunyuan_video.text_encoders import load_hunyuan_text_encoders

        return load_hunyuan_text_encoders(args, device)

    def encode_prompts(self, encoders: Any, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        """`llm` (256, 4096), `llm_mask`, `clipL` (768,), `clipL_mask`: the reference's cache keys once suffixed."""
        from musubi_tuner.models.hunyuan_video.text_encoders import encode_hunyuan_prompts

        return encode_hunyuan_prompts(encoders, prompts)

    # ---- DiT ---------------------------------------------------------------------------------------
    def load_dit(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> nn.Module:
        from musubi_tuner.architectures.hunyuan_video.dit_files import load_hv_dit

        if not args.dit:
            raise UserError("no DiT given: pass --dit mp_rank_00_model_states.pt "
                            "(or hunyuan_video_t2v_720p_bf16.safetensors)")
        dtype = str_to_dtype(getattr(args, "dit_dtype", None), dtype, "--dit_dtype")
        return load_hv_dit(args.dit, device=device, dtype=dtype, in_channels=getattr(args, "dit_in_channels", None))

    def lora_candidates(self, dit: nn.Module) -> list[LoraTarget]:
        from musubi_tuner.architectures.hunyuan_video.dit_files import original_linear_parts

        return targets_from_layout(dit, original_linear_parts(dit))

    def lora_targets_for_conversion(self, lora_sd: dict[str, torch.Tensor]) -> list[LoraTarget]:
        """LoRA targets of a shapes-only (meta) DiT sized from the LoRA's own keys (no model file needed)."""
        from musubi_tuner.architectures.hunyuan_video.dit_files import build_empty_hv_dit
        from musubi_tuner.architectures.key_plan import block_layout_from_lora, default_axes_dims_rope, heads_for_width

        num_double, num_single, hidden = block_layout_from_lora(lora_sd)
        head_dim, heads = heads_for_width(hidden)
        config = {"num_layers": num_double, "num_single_layers": num_single, "num_refiner_layers": 0,
                  "attention_head_dim": head_dim, "num_attention_heads": heads,
                  "rope_axes_dim": default_axes_dims_rope(head_dim)}
        return self.lora_candidates(build_empty_hv_dit(config))

    def dit_state_dict_to_original(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from musubi_tuner.architectures.hunyuan_video.dit_files import hv_diffusers_to_original

        return hv_diffusers_to_original(state_dict)

    def training_conditioning(self, args: argparse.Namespace) -> dict[str, Any]:
        # The reference's trainer feeds --guidance_scale (default 1.0) to the guidance embedder as is, without
        # the x1000 of generation; `guidance_input` carries the embedder's input itself.
        return {"guidance_input": torch.tensor([float(args.guidance_scale)])}

    def check_training_caches(self, latent_keys: dict[str, set[str]], args: argparse.Namespace) -> None:
        # SkyReels I2V training conditions on each clip's own first latent frame, so T2V caches serve both;
        # what must be there is the latent itself.
        for path, keys in latent_keys.items():
            if "latents" not in keys:
                raise UserError(f"{path} has no latents; re-run cache_latents.py (without --skip_existing)")

    def predict(self, dit: nn.Module, batch: dict[str, Any], noisy_latents: torch.Tensor,
                timesteps: torch.Tensor) -> torch.Tensor:
        dtype, device = dit_compute_dtype(dit), noisy_latents.device
        hidden = noisy_latents
        if dit.config.in_channels > noisy_latents.shape[1]:  # SkyReels V1 I2V: image latents on the channels
            hidden = torch.cat([hidden, self._image_condition(batch).to(device, hidden.dtype)], dim=1)
        b = hidden.shape[0]
        guidance = None
        if dit.config.guidance_embeds:
            guidance = self._guidance_input(batch).reshape(-1).expand(b).to(device, dtype)
        out = dit(hidden_states=hidden.to(dtype), timestep=timesteps.to(device, torch.float32),
                  encoder_hidden_states=batch["llm"].to(device, dtype),
                  encoder_attention_mask=batch["llm_mask"].to(device),
                  pooled_projections=batch["clipL"].to(device, dtype), guidance=guidance, return_dict=False)[0]
        return out.to(noisy_latents.dtype)

    def _guidance_input(self, batch: dict[str, Any]) -> torch.Tensor:
        """The guidance embedder's input: `guidance` (the embedded scale of a generation request, always set by
        the generation code) x1000; else `guidance_input` as is (training, `training_conditioning`); else the
        reference trainer's default, 1.0 as is, so any training-side caller without the flags matches it."""
        if "guidance" in batch:
            return torch.as_tensor(batch["guidance"], dtype=torch.float32) * GUIDANCE_EMBED_SCALE
        return torch.as_tensor(batch.get("guidance_input", TRAINING_GUIDANCE_INPUT), dtype=torch.float32)

    def _image_condition(self, batch: dict[str, Any]) -> torch.Tensor:
        """SkyReels V1 I2V conditioning (B, 16, F, H, W): the start image's latents in frame 0, zeros after.
        Generation gives it (`latents_image`); training takes each clip's own first frame, as the reference."""
        if "latents_image" in batch:
            return batch["latents_image"]
        if "latents" not in batch:
            raise UserError("this DiT is a SkyReels V1 I2V model (32 input channels) but no start image was given; "
                            "pass --image_path (or --i in the prompt line)")
        latents = self.latents_from_cache(batch["latents"].float())
        return first_frame_only(latents)

    # ---- generation --------------------------------------------------------------------------------
    def prompt_spec_from_args(self, args: argparse.Namespace):
        return video_prompt_spec(args, embedded_guidance=args.embedded_cfg_scale)

    def _encode_for_generation(self, vae: nn.Module, pixels: torch.Tensor, seed: Any) -> torch.Tensor:
        """uint8 (F, H, W, 3) -> DiT-space latents (1, 16, f, h, w): a posterior sample (seeded by the request's
        seed) x 0.476986, as the reference's `encode_to_latents`."""
        from musubi_tuner.models.hunyuan_video.vae_files import encode_hv_latents

        generator = torch.Generator(device=vae.device).manual_seed(int(seed)) if seed is not None else None
        video = pixels_to_model_range(pixels[None], vae.device, vae.dtype)
        return encode_hv_latents(vae, video, sample=True, generator=generator).float().cpu() * HV_VAE_SCALING_FACTOR

    def generation_conditioning(self, encoders: nn.Module, request: Any, latent_shape: tuple[int, ...],
                                args: argparse.Namespace) -> dict[str, Any]:
        """SkyReels V1 I2V (`--image_path` / `--i`): the start image's latents in frame 0 of a zero video."""
        image_path = getattr(request, "image_path", None)
        if not image_path:
            return {}
        from musubi_tuner.inference.images import load_image_resized

        height, width = latent_shape[-2] * 8, latent_shape[-1] * 8
        flag = "--image_path" if image_path == getattr(args, "image_path", None) else "--i"
        image = load_image_resized(image_path, width, height, flag=flag)
        first = self._encode_for_generation(encoders, image[None], getattr(request, "seed", None))
        condition = torch.zeros((1, *latent_shape))
        condition[:, :, :1] = first
        return {"latents_image": condition}

    def generation_source_latents(self, encoders: nn.Module, request: Any, latent_shape: tuple[int, ...],
                                  args: argparse.Namespace) -> tuple[torch.Tensor, float] | None:
        """Video to video (`--video_path`, `--strength`): the source video's first frames, encoded."""
        video_path = getattr(args, "video_path", None)
        if not video_path:
            return None
        from musubi_tuner.inference.images import load_video_resized

        frames = (latent_shape[1] - 1) * 4 + 1
        pixels = load_video_resized(video_path, frames, latent_shape[-1] * 8, latent_shape[-2] * 8)
        return self._encode_for_generation(encoders, pixels, getattr(request, "seed", None)), float(args.strength)

    def latent_shape(self, width: int, height: int, frames: int) -> tuple[int, ...]:
        if width % 16 or height % 16:
            raise UserError(f"--video_size {height} {width}: height and width must be multiples of 16")
        if frames < 1 or (frames - 1) % 4:
            raise UserError(f"--video_length {frames}: HunyuanVideo needs 4N+1 frames (e.g. 1, 5, ..., 129)")
        return (LATENT_CHANNELS, (frames - 1) // 4 + 1, height // 8, width // 8)



def first_frame_only(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) latents with every frame after the first zeroed (SkyReels V1 I2V conditioning)."""
    condition = torch.zeros_like(latents)
    condition[:, :, :1] = latents[:, :, :1]
    return condition
