"""HunyuanVideoArchitecture: the HunyuanVideo (T2V, SkyReels V1 I2V) contract implementation, model side.

What is HunyuanVideo-specific lives here: the official DiT names (fused `img_attn_qkv` / `linear1` spanning
several diffusers Linears), the causal 3D VAE with scaling 0.476986 and no shift, caches holding the raw VAE
posterior sample (the reference's cache format; the scaling is applied when training), and the reference's
script names (`cache_latents.py`, `cache_text_encoder_outputs.py`, `hv_train_network.py`, `hv_generate_video.py`).
The text encoders and the prediction/generation side are added by their own modules.
"""

from __future__ import annotations

import argparse
import logging
from typing import ClassVar

import torch
from torch import nn

from musubi_tuner.architectures.base import Architecture, GenerationDefaults
from musubi_tuner.architectures.common import model_range_to_pixels, pixels_to_model_range, str_to_dtype
from musubi_tuner.dataset.items import ItemPixels
from musubi_tuner.dataset.traits import DatasetTraits
from musubi_tuner.errors import UserError
from musubi_tuner.networks.targets import LoraTarget, targets_from_layout

logger = logging.getLogger(__name__)

LATENT_CHANNELS = 16
VAE_SCALING_FACTOR = 0.476986
"""Same value as `models.hunyuan_video.vae_files.HV_VAE_SCALING_FACTOR` (kept import-free for the registry)."""


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
    # hv_generate_video.py defaults: 256x256, 129 frames, 24 fps, 50 steps, CFG 1.0, embedded 6.0, shift 7.0
    generation_defaults = GenerationDefaults(
        width=256, height=256, frames=129, fps=24.0, infer_steps=50, guidance_scale=1.0, flow_shift=7.0,
        negative_prompt="", embedded_guidance=6.0,
    )

    def script_name(self, stage: str) -> str:
        # The reference's HunyuanVideo caching scripts carry no prefix (it was its first architecture).
        if stage in ("cache_latents", "cache_text_encoder_outputs"):
            return f"{stage}.py"
        return super().script_name(stage)

    # ---- flags -------------------------------------------------------------------------------------
    def add_arguments(self, parser: argparse.ArgumentParser, purpose: str) -> None:
        if purpose in ("cache_latents", "train", "generate"):
            parser.add_argument("--vae_tiling", action="store_true",
                                help="spatial VAE tiling (256 px tiles, 1/4 overlap); implied by "
                                     "--vae_spatial_tile_sample_min_size")
            parser.add_argument("--vae_chunk_size", type=int, default=None,
                                help="run the VAE's causal 3D convolutions over at most this many frames at a time "
                                     "(same result, less memory), e.g. 32")
            parser.add_argument("--vae_spatial_tile_sample_min_size", type=int, default=None,
                                help="spatial tile size in pixels (default 256 when tiling)")
        if purpose in ("train", "generate"):
            parser.add_argument("--dit_in_channels", type=int, default=None,
                                help="DiT input channels: 16 (T2V), 32 (SkyReels V1 I2V); checked against --dit")
            parser.add_argument("--dit_dtype", default=None, help="DiT dtype (default bfloat16)")

    # ---- latent side -------------------------------------------------------------------------------
    def load_vae(self, args: argparse.Namespace, device: torch.device) -> nn.Module:
        from musubi_tuner.models.hunyuan_video.vae_files import configure_hv_vae_memory, load_hv_vae

        if not args.vae:
            raise UserError("no VAE given: pass --vae vae/pytorch_model.pt (or hunyuan_video_vae_bf16.safetensors)")
        # float16 by default, as the reference runs the HunyuanVideo VAE
        vae = load_hv_vae(args.vae, device=device, dtype=str_to_dtype(args.vae_dtype, torch.float16, "--vae_dtype"))
        configure_hv_vae_memory(vae, chunk_size=getattr(args, "vae_chunk_size", None),
                                tiling=bool(getattr(args, "vae_tiling", False)),
                                spatial_tile_sample_min_size=getattr(args, "vae_spatial_tile_sample_min_size", None))
        return vae

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
        return latents * VAE_SCALING_FACTOR

    def decode_latents(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        from musubi_tuner.models.hunyuan_video.vae_files import decode_hv_latents

        if latents.dim() == 4:  # one sample without the batch axis
            latents = latents[None]
        return model_range_to_pixels(decode_hv_latents(vae, latents))

    # ---- DiT ---------------------------------------------------------------------------------------
    def load_dit(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> nn.Module:
        from musubi_tuner.architectures.hunyuan_video.dit_files import load_hv_dit

        if not args.dit:
            raise UserError("no DiT given: pass --dit mp_rank_00_model_states.pt "
                            "(or hunyuan_video_t2v_720p_bf16.safetensors)")
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

    # ---- generation --------------------------------------------------------------------------------
    def latent_shape(self, width: int, height: int, frames: int) -> tuple[int, ...]:
        if width % 16 or height % 16:
            raise UserError(f"--video_size {height} {width}: height and width must be multiples of 16")
        if frames < 1 or (frames - 1) % 4:
            raise UserError(f"--video_length {frames}: HunyuanVideo needs 4N+1 frames (e.g. 1, 5, ..., 129)")
        return (LATENT_CHANNELS, (frames - 1) // 4 + 1, height // 8, width // 8)

