"""WanArchitecture: the Wan2.1 / Wan2.2 A14B contract implementation (see architectures/base.py)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from musubi_tuner.architectures.base import Architecture, GenerationDefaults
from musubi_tuner.architectures.wan import fun_control, one_frame
from musubi_tuner.architectures.common import (  # noqa: F401 (re-exported for older imports)
    dit_compute_dtype,
    model_range_to_pixels,
    pixels_to_model_range,
    str_to_dtype,
)
from musubi_tuner.architectures.wan.task_defaults import BASE as WAN_GENERATION_DEFAULTS
from musubi_tuner.architectures.wan.task_defaults import task_generation_defaults
from musubi_tuner.architectures.wan import wan22_experts
from musubi_tuner.dataset.items import ItemPixels
from musubi_tuner.dataset.traits import DatasetTraits
from musubi_tuner.errors import UserError
from musubi_tuner.networks.targets import LoraPart, LoraTarget

logger = logging.getLogger(__name__)

TEXT_LENGTH = 512
"""Wan pads every prompt to 512 tokens; diffusers' I2V attention relies on it (image tokens come after)."""

TASKS = ("t2v-1.3B", "t2v-14B", "i2v-14B", "t2i-14B", "flf2v-14B", "t2v-A14B", "i2v-A14B", *fun_control.FC_TASKS)
I2V_TASKS = ("i2v-14B", "flf2v-14B", "i2v-A14B")
"""Tasks whose DiT takes the start image's latents on its channels (I2V caches)."""
CLIP_TASKS = ("i2v-14B", "flf2v-14B", *fun_control.I2V_FC_TASKS)
"""Start-image tasks whose DiT takes a CLIP image context (Wan2.2 I2V-A14B has none)."""
START_IMAGE_TASKS = (*I2V_TASKS, *fun_control.I2V_FC_TASKS)
"""Tasks conditioned on a start image (--image_path to generate)."""
ONE_FRAME_TASKS = ("i2v-14B", "flf2v-14B")
"""Tasks whose DiT one-frame training and inference drive (the reference's Wan one-frame: Wan2.1 I2V/FLF2V)."""
SIZE_FLAGS = {"height": "--video_size", "width": "--video_size", "frames": "--video_length"}

@dataclass
class WanLatentEncoders:
    vae: nn.Module
    clip: nn.Module | None


@dataclass
class WanTextEncoders:
    t5: nn.Module
    tokenizer: Any


def pad_text_embeddings(embeddings: list[torch.Tensor], length: int = TEXT_LENGTH) -> torch.Tensor:
    """Zero-pad variable-length T5 outputs (L_i, D) to (B, length, D), as Wan does."""
    dim = embeddings[0].shape[-1]
    out = embeddings[0].new_zeros(len(embeddings), length, dim)
    for i, emb in enumerate(embeddings):
        n = min(emb.shape[0], length)
        out[i, :n] = emb[:n]
    return out


def _clip_rows(clip: torch.Tensor | None, dit: nn.Module, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """CLIP context as diffusers takes it: (B, N, D) for I2V; FLF2V wants the first/last image tokens as separate
    rows, (2B, N, D), and re-joins them. One-frame caches hold one row per control image, (B, n, N, D)."""
    if clip is None:
        return None
    clip = clip.to(device, dtype)
    flf2v = bool(getattr(dit.config, "pos_embed_seq_len", None))
    if clip.dim() == 4:  # one-frame: 1 control image -> I2V rows; 2 (start and end) -> FLF2V rows
        if clip.shape[1] == 1:
            return clip[:, 0]
        if not flf2v:
            raise UserError(f"one-frame items with {clip.shape[1]} control images need an FLF2V DiT (--task flf2v-14B); "
                            "an I2V DiT takes one control image (fp_1f_clean_indices with one value)")
        return clip.reshape(-1, *clip.shape[2:])
    if flf2v:
        return clip.reshape(clip.shape[0] * 2, clip.shape[1] // 2, clip.shape[2])
    return clip


class WanArchitecture(Architecture):
    name = "wan"
    script_prefix = "wan"
    traits = DatasetTraits(cache_code="wan", architecture="wan", bucket_step=16, frame_stride=4, target_fps=16.0,
                           control="optional")  # Fun-Control videos; one-frame control images
    network_module = "networks.lora_wan"
    modelspec_architecture = "wan2.1"
    # Reference default excludes (regex fullmatch on the original module path).
    lora_default_excludes = (r".*(patch_embedding|text_embedding|time_embedding|time_projection|norm|head).*",)
    # the reference's FP8_OPTIMIZATION_TARGET_KEYS / EXCLUDE_KEYS (wan/modules/model.py)
    fp8_scaled_keys = (("blocks",), ("norm", "patch_embedding", "text_embedding", "time_embedding", "time_projection",
                                     "head", "modulation", "img_emb"))
    generation_defaults = WAN_GENERATION_DEFAULTS

    def generation_defaults_for(self, args: argparse.Namespace | None, width: int | None = None,
                                height: int | None = None) -> GenerationDefaults:
        return task_generation_defaults(getattr(args, "task", None), width, height)

    # ---- flags -------------------------------------------------------------------------------------
    def add_arguments(self, parser: argparse.ArgumentParser, purpose: str) -> None:
        from musubi_tuner.utils.flag_types import non_negative_int, positive_float, positive_int

        if purpose in ("train", "generate"):
            parser.add_argument("--task", default="t2v-14B", choices=TASKS, help="Wan2.1 / Wan2.2 task (model variant)")
        if purpose in ("cache_latents", "train", "generate"):
            parser.add_argument("--vae_cache_cpu", action="store_true",
                                help="accepted for compatibility; diffusers' Wan VAE keeps its causal cache on the compute device")
            parser.add_argument("--clip", default=None,
                                help="CLIP image encoder (models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth), I2V/FLF2V only")
        if purpose == "cache_latents":
            parser.add_argument("--i2v", action="store_true", help="also cache the first-frame conditioning for I2V training")
            parser.add_argument("--one_frame", action="store_true",
                                help="one-frame training caches: each image with its control images at the dataset's "
                                     "fp_1f_clean_indices / fp_1f_target_index (needs --clip)")
        if purpose == "train":
            parser.add_argument("--one_frame", action="store_true",
                                help="samples during training use one-frame inference: every prompt line gives --of "
                                     "and its control images --ci")
        if purpose == "generate":
            parser.add_argument("--control_path", default=None,
                                help="Fun-Control: control video, a video file or a folder of frames (at least "
                                     "--video_length frames)")
            parser.add_argument("--one_frame_inference", default=None,
                                help="one-frame inference, e.g. target_index=1,control_index=0 (docs/wan.md)")
            parser.add_argument("--control_image_path", nargs="*", default=None,
                                help="one-frame inference: control images, one per control_index")
            parser.add_argument("--control_image_mask_path", nargs="*", default=None,
                                help="accepted for compatibility; Wan one-frame inference ignores masks, as the reference")
        if purpose == "generate":
            parser.add_argument("--video_size", type=positive_int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"),
                                help="video height and width, multiples of 16 (default 480 832)")
            parser.add_argument("--video_length", type=positive_int, default=None,
                                help="frames, 4N+1 (default 81; 1 = image)")
            parser.add_argument("--fps", type=positive_float, default=None, help="output frame rate (default 16)")
            parser.add_argument("--trim_tail_frames", type=non_negative_int, default=0,
                                help="drop the last N decoded frames from the saved video/images (the reference's fix "
                                     "for a corrupted tail with --end_image_path); latents keep every frame")
            parser.add_argument("--image_path", default=None, help="start image (I2V / FLF2V)")
            parser.add_argument("--end_image_path", default=None, help="end image (FLF2V)")
            self._add_generation_mode_arguments(parser)
        if purpose in ("cache_text", "train", "generate"):
            parser.add_argument("--t5", default=None, help="umT5 text encoder: models_t5_umt5-xxl-enc-bf16.pth or an HF-layout .safetensors")
            parser.add_argument("--fp8_t5", action="store_true", help="store umT5 Linear weights in float8_e4m3fn")
            parser.add_argument("--t5_tokenizer", default=None,
                                help="folder with the umT5 tokenizer (google/umt5-xxl: tokenizer.json or spiece.model); "
                                     "default: the HF cache, offline")
            parser.add_argument("--text_encoder_dtype", default=None, help="umT5 compute dtype (default bfloat16)")
        wan22_experts.add_expert_arguments(parser, purpose)

    def validate_arguments(self, args: argparse.Namespace, purpose: str) -> None:
        if purpose == "cache_latents":
            if args.one_frame and args.clip is None:
                raise UserError("--one_frame needs --clip models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth "
                                "(one-frame caches hold the CLIP context of the control images)")
            if args.clip is not None:
                args.i2v = True
            elif args.i2v:  # as the reference: Wan2.2 I2V-A14B caches hold no CLIP context
                logger.info("--i2v without --clip: these caches train Wan2.2 --task i2v-A14B only (Wan2.1 I2V "
                            "training needs the CLIP context: add --clip models_clip_...pth for it)")
        if purpose == "generate":
            self._validate_generation_size(args)
            self._validate_generation_modes(args)
            self._validate_control_flags(args)
        if purpose in ("train", "generate") and args.task in CLIP_TASKS and not args.clip:
            logger.info("--task %s without --clip: the CLIP context must come from the latent caches", args.task)
        wan22_experts.validate_expert_arguments(args, purpose)

    def _validate_generation_size(self, args: argparse.Namespace) -> None:
        height, width = args.video_size or (16, 16)  # a side left to the defaults is always valid
        self.check_request_size(width, height, args.video_length or 1, SIZE_FLAGS)
        if args.video_length and args.trim_tail_frames >= args.video_length:
            raise UserError(f"--trim_tail_frames {args.trim_tail_frames} would remove all {args.video_length} frames "
                            "of --video_length; use a smaller value")

    def _add_generation_mode_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Video to video, CFG skipping, skip-layer guidance and the official model folder."""
        from musubi_tuner.inference.guidance import add_guidance_arguments
        from musubi_tuner.inference.video_to_video import add_video_to_video_arguments

        add_video_to_video_arguments(parser)
        add_guidance_arguments(parser)
        parser.add_argument("--ckpt_dir", default=None,
                            help="official Wan2.1 model folder: fills --vae, --t5, --t5_tokenizer, --clip and --dit "
                                 "from its files when they are not given")

    def _validate_generation_modes(self, args: argparse.Namespace) -> None:
        from musubi_tuner.inference.guidance import guidance_options_from_args
        from musubi_tuner.inference.video_to_video import check_video_to_video_flags

        if args.ckpt_dir:
            from musubi_tuner.architectures.wan.ckpt_dir import fill_from_ckpt_dir

            fill_from_ckpt_dir(args, needs_clip=args.task in CLIP_TASKS)
        check_video_to_video_flags(args, args.infer_steps or self.generation_defaults_for(args).infer_steps)
        slg = guidance_options_from_args(args, warn=True).slg
        if slg is not None and args.dit and not args.latent_path:  # layers beyond the DiT: say so before loading it
            from musubi_tuner.architectures.wan.dit_files import dit_block_count

            blocks = dit_block_count(args.dit)
            beyond = [layer for layer in slg.layers if layer >= blocks]
            if beyond:
                raise UserError(f"--slg_layers {','.join(map(str, beyond))}: --dit {args.dit} has blocks "
                                f"0..{blocks - 1}")

    def _validate_control_flags(self, args: argparse.Namespace) -> None:
        if args.control_image_mask_path:
            logger.warning("--control_image_mask_path has no effect: Wan one-frame inference ignores masks, as the "
                           "reference does")

    def check_request_options(self, request: Any, args: argparse.Namespace | None) -> None:
        task = getattr(args, "task", None)
        fun_control.check_request(request, task)
        # only the training flags carry --one_frame (samples during training); None for the generate script
        one_frame.check_request(request, task, ONE_FRAME_TASKS, getattr(args, "one_frame", None))

    # ---- latent side -------------------------------------------------------------------------------
    def load_vae(self, args: argparse.Namespace, device: torch.device) -> nn.Module:
        from musubi_tuner.architectures.wan.vae_files import load_wan_vae

        if not args.vae:
            raise UserError("no VAE given: pass --vae Wan2.1_VAE.pth (or wan_2.1_vae.safetensors)")
        dtype = str_to_dtype(args.vae_dtype, torch.bfloat16, "--vae_dtype")
        return load_wan_vae(args.vae, device=device, dtype=dtype)

    def load_latent_encoders(self, args: argparse.Namespace, device: torch.device) -> WanLatentEncoders:
        clip = None
        if getattr(args, "clip", None):
            from musubi_tuner.architectures.wan.clip_files import load_wan_clip

            clip = load_wan_clip(args.clip, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
        return WanLatentEncoders(vae=self.load_vae(args, device), clip=clip)

    def _encode_video(self, vae: nn.Module, video: torch.Tensor) -> torch.Tensor:
        from musubi_tuner.architectures.wan.vae_files import normalize_latents

        with torch.no_grad():
            dist = vae.encode(video.to(device=vae.device, dtype=vae.dtype)).latent_dist
        return normalize_latents(vae, dist.mode())

    def image_condition_latents(self, vae: nn.Module, first: torch.Tensor, last: torch.Tensor | None,
                                num_frames: int) -> torch.Tensor:
        """I2V/FLF2V conditioning: 4 mask channels + VAE latents of [first, zeros..., (last)] -> (B, 20, f, h, w)."""
        b, c, _, h, w = first.shape
        frames = first.new_zeros(b, c, num_frames, h, w)
        frames[:, :, :1] = first
        if last is not None:
            frames[:, :, -1:] = last
        y = self._encode_video(vae, frames)
        lat_h, lat_w = y.shape[-2:]
        mask = torch.zeros(b, num_frames, lat_h, lat_w, dtype=y.dtype, device=y.device)
        mask[:, 0] = 1
        if last is not None:
            mask[:, -1] = 1
        # the first frame stands alone in the VAE's time stride, so it fills all 4 mask slots of latent frame 0
        mask = torch.cat([mask[:, :1].repeat(1, 4, 1, 1), mask[:, 1:]], dim=1)
        mask = mask.view(b, mask.shape[1] // 4, 4, lat_h, lat_w).transpose(1, 2)
        return torch.cat([mask, y], dim=1)

    def _clip_context(self, clip: nn.Module, images: list[torch.Tensor]) -> torch.Tensor:
        from musubi_tuner.architectures.wan.clip_files import encode_images_clip

        contexts = [encode_images_clip(clip, img) for img in images]  # each (B, N, D)
        return torch.cat(contexts, dim=1)

    def latent_cache_contents(self, args: argparse.Namespace) -> set[str]:
        contents = {"latents"}
        if getattr(args, "i2v", False):
            contents.add("latents_image")
        if getattr(args, "clip", None):
            contents.add("clip")
        if getattr(args, "one_frame", False):  # validate_arguments: --one_frame comes with --clip
            contents |= {"latents_image", "clip", "f_indices"}
        return contents

    def encode_latents(self, encoders: WanLatentEncoders, batch: list[ItemPixels], args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
        if getattr(args, "one_frame", False):
            return [self._one_frame_contents(encoders, item) for item in batch]
        vae = encoders.vae
        pixels = torch.stack([item.pixels for item in batch])
        video = pixels_to_model_range(pixels, vae.device, vae.dtype)
        latents = self._encode_video(vae, video).to(vae.dtype).cpu()
        contents = [{"latents": latent} for latent in latents]
        if getattr(args, "i2v", False):
            y = self.image_condition_latents(vae, video[:, :, :1], None, video.shape[2]).to(vae.dtype).cpu()
            for content, y_i in zip(contents, y):
                content["latents_image"] = y_i
            if encoders.clip is not None:
                clip_ctx = self._clip_context(encoders.clip, [pixels[:, 0]]).to(torch.float16).cpu()
                for content, ctx in zip(contents, clip_ctx):
                    content["clip"] = ctx
        if batch[0].control:  # Fun-Control: the control video of each item (the dataset's control_directory)
            control = torch.stack([item.control[0] for item in batch])
            control_latents = self._encode_video(vae, pixels_to_model_range(control, vae.device, vae.dtype))
            for content, latent in zip(contents, control_latents.to(vae.dtype).cpu()):
                content["latents_control"] = latent
        return contents

    def _encode_image(self, vae: nn.Module, image: torch.Tensor) -> torch.Tensor:
        """uint8 (H, W, 3) -> (C, 1, h, w) latents of that one frame."""
        return self._encode_video(vae, pixels_to_model_range(image[None, None], vae.device, vae.dtype))[0]

    def _blank_latent(self, vae: nn.Module, height: int, width: int) -> torch.Tensor:
        """Latents of the all-zero frame in model range (mid gray), which the reference calls its black image."""
        return self._encode_image(vae, torch.full((height, width, 3), 127.5))

    def _one_frame_contents(self, encoders: WanLatentEncoders, item: ItemPixels) -> dict[str, torch.Tensor]:
        """One-frame training cache of an image item with its control images (docs of one_frame.py)."""
        layout = one_frame.dataset_layout(item.clean_indices, item.target_index)
        if item.pixels.shape[0] != 1:
            raise UserError("--one_frame caches are made from image datasets (a target image with its control "
                            "images); this dataset has video items: cache it without --one_frame")
        if len(item.control) != len(layout.control_indices):
            raise UserError(f"one-frame caching needs {len(layout.control_indices)} control image(s) per image "
                            f"(fp_1f_clean_indices = {list(layout.control_indices)}), got {len(item.control)}: set "
                            "control_directory in the dataset config (controls named like the images)")
        if len(item.control) > one_frame.MAX_CONTROL_IMAGES:
            raise UserError(f"one-frame training takes 1 or 2 control images, got {len(item.control)}")
        vae = encoders.vae
        controls = [self._encode_image(vae, c[0]) for c in item.control]
        height, width = item.pixels.shape[1:3]
        blank = self._blank_latent(vae, height, width)
        dtype = vae.dtype
        clip = torch.cat([self._clip_context(encoders.clip, [c[:1]]) for c in item.control]).to(torch.float16).cpu()
        return {"latents": one_frame.training_latents(layout, controls, self._encode_image(vae, item.pixels[0])).to(dtype).cpu(),
                "latents_image": one_frame.condition_latents(layout, controls, blank).to(dtype).cpu(),
                "clip": clip, "f_indices": torch.tensor(layout.f_indices, dtype=torch.int32)}

    def decode_latents(self, encoders: WanLatentEncoders | nn.Module, latents: torch.Tensor) -> torch.Tensor:
        from musubi_tuner.architectures.wan.vae_files import denormalize_latents

        vae = encoders.vae if isinstance(encoders, WanLatentEncoders) else encoders
        with torch.no_grad():
            z = denormalize_latents(vae, latents.to(device=vae.device, dtype=vae.dtype))
            video = vae.decode(z).sample
        return model_range_to_pixels(video)

    # ---- text side ---------------------------------------------------------------------------------
    def load_text_encoders(self, args: argparse.Namespace, device: torch.device) -> WanTextEncoders:
        from musubi_tuner.architectures.wan.text_encoder_files import load_umt5
        from musubi_tuner.models.tokenizers import resolve_tokenizer

        if not args.t5:
            raise UserError("no text encoder given: pass --t5 models_t5_umt5-xxl-enc-bf16.pth")
        dtype = str_to_dtype(getattr(args, "text_encoder_dtype", None), torch.bfloat16, "--text_encoder_dtype")
        tokenizer = resolve_tokenizer("t5_tokenizer", args.t5_tokenizer, "google/umt5-xxl", None)
        t5 = load_umt5(args.t5, device=device, dtype=dtype, fp8=bool(getattr(args, "fp8_t5", False)))
        return WanTextEncoders(t5=t5, tokenizer=tokenizer)

    def encode_prompts(self, encoders: WanTextEncoders, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        from musubi_tuner.architectures.wan.text_encoder_files import encode_prompts_umt5

        with torch.no_grad():
            embeddings = encode_prompts_umt5(encoders.t5, encoders.tokenizer, prompts, max_length=TEXT_LENGTH)
        return [{"varlen_t5": emb.cpu()} for emb in embeddings]

    # ---- DiT ---------------------------------------------------------------------------------------
    def load_dit(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> nn.Module:
        from musubi_tuner.architectures.wan.dit_files import load_wan_dit

        if not args.dit:
            raise UserError("no DiT given: pass --dit wan2.1_t2v_1.3B_bf16.safetensors (or the file for your --task)")
        flag = "--dit_high_noise" if getattr(args, "dit_high_noise", None) == args.dit else "--dit"
        dit = load_wan_dit(args.dit, task=args.task, device=device, dtype=dtype, flag=flag)
        dit.requires_grad_(False)
        return dit.eval()

    def attach_expert_dits(self, dit: nn.Module, load: Callable[[argparse.Namespace], nn.Module],
                           args: argparse.Namespace, device: torch.device) -> None:
        wan22_experts.attach_high_noise_expert(dit, load, args, device)

    def lora_candidates(self, dit: nn.Module) -> list[LoraTarget]:
        from musubi_tuner.architectures.wan.dit_names import original_module_name

        targets = []
        for path, module in dit.named_modules():
            if isinstance(module, nn.Linear) and path.startswith("blocks."):
                targets.append(LoraTarget(original_module_name(path), (LoraPart(path, module),)))
        return targets

    def lora_targets_for_conversion(self, lora_sd: dict[str, torch.Tensor]) -> list[LoraTarget]:
        """LoRA targets sized from the LoRA's own keys (no model file needed)."""
        from musubi_tuner.architectures.wan.lora_layout import wan_config_from_lora, wan_lora_targets_from_config

        # meta Linears from the name table, not a diffusers model: convert_lora/merge_lora need not import diffusers
        return wan_lora_targets_from_config(wan_config_from_lora(lora_sd))

    def dit_state_dict_to_original(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from musubi_tuner.architectures.wan.dit_files import wan_dit_to_original

        return wan_dit_to_original(state_dict)

    def check_training_caches(self, latent_keys: dict[str, set[str]], args: argparse.Namespace) -> None:
        if args.task == "flf2v-14B":
            raise UserError("--task flf2v-14B: FLF2V training needs first+last-frame caches, which this version does "
                            "not write; train --task i2v-14B (start-frame conditioning) or a T2V task")
        needed = ("latents_image", "clip") if args.task in CLIP_TASKS else ("latents_image",)
        rerun = ("--i2v --clip models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth" if args.task in CLIP_TASKS
                 else "--i2v")
        for path, keys in latent_keys.items():
            if fun_control.is_fun_control(args.task) and "latents_control" not in keys:
                raise UserError(f"{path} has no latents_control: --task {args.task} (Fun-Control) needs control videos. "
                                "Add control_directory to the dataset config and re-run wan_cache_latents.py (without "
                                "--skip_existing)")
            if args.task not in START_IMAGE_TASKS:
                continue  # I2V caches also train T2V models: predict() ignores their image conditioning
            missing = [k for k in needed if k not in keys]
            if missing:
                raise UserError(f"{path} has no {' / '.join(missing)}: --task {args.task} needs I2V caches. Re-run "
                                f"wan_cache_latents.py {rerun} (without --skip_existing)")

    def sample_noisy_input(self, args: argparse.Namespace, latents: torch.Tensor, noise: torch.Tensor,
                           generator: torch.Generator, image_seq_len: int | None,
                           uniform: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not getattr(args, "dit_high_noise", None):  # one DiT: the flags' range as it is
            return super().sample_noisy_input(args, latents, noise, generator, image_seq_len, uniform)
        from musubi_tuner.training.timesteps import TimestepConfig, noisy_input_from_sample, sample_timesteps

        config = TimestepConfig.from_args(args)
        sample = wan22_experts.draw_same_expert_timesteps(
            lambda n, u: sample_timesteps(config, n, generator, image_seq_len, u), latents.shape[0],
            wan22_experts.timestep_boundary(args), uniform)
        return noisy_input_from_sample(latents, noise, sample)

    def training_conditioning(self, args: argparse.Namespace) -> dict[str, Any]:
        # Fun-Control: i2v-14B-FC trains on the start frame's latents and CLIP context, the T2V tasks on zeros
        if not fun_control.is_fun_control(args.task):
            return {}
        return {fun_control.USES_START_IMAGE: args.task in START_IMAGE_TASKS}

    def predict(self, dit: nn.Module, batch: dict[str, Any], noisy_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        pair = wan22_experts.expert_pair(dit)
        if pair is not None:  # Wan2.2 with --dit_high_noise: each sample through its expert
            return pair.predict(dit, batch, noisy_latents, timesteps, self._predict_one)
        return self._predict_one(dit, batch, noisy_latents, timesteps)

    def _predict_one(self, dit: nn.Module, batch: dict[str, Any], noisy_latents: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
        dtype = dit_compute_dtype(dit)
        device = noisy_latents.device
        context = pad_text_embeddings([t.to(device) for t in batch["t5"]]).to(dtype)
        hidden = noisy_latents
        in_channels = dit.config.in_channels
        if in_channels == fun_control.FC_IN_CHANNELS:  # 16 noisy + 16 control + 16 image latents
            hidden = torch.cat([hidden, fun_control.control_condition(batch, device, hidden.dtype)], dim=1)
            clip = fun_control.clip_context(batch, hidden.shape[0], dit.config.image_dim, device, dtype)
        elif in_channels > noisy_latents.shape[1]:  # I2V/FLF2V DiTs take 16 + 20 channels
            if "latents_image" not in batch:
                raise UserError("this DiT is an I2V/FLF2V model but the batch has no image conditioning; use I2V "
                                "caches (wan_cache_latents.py --i2v --clip ...) or a start image (--image_path)")
            hidden = torch.cat([hidden, batch["latents_image"].to(device, hidden.dtype)], dim=1)
            # Wan2.2 I2V has no CLIP branch (config image_dim None): its image reaches the DiT through the latents only
            clip = _clip_rows(batch.get("clip"), dit, device, dtype) if dit.config.image_dim else None
        else:
            clip = None  # T2V models ignore I2V caches' image conditioning
        with one_frame.rope_time_positions(dit, one_frame.batch_frame_indices(batch.get("f_indices"))):
            out = dit(hidden_states=hidden.to(dtype), timestep=timesteps.to(device), encoder_hidden_states=context,
                      encoder_hidden_states_image=clip, return_dict=False)[0]
        return out.to(noisy_latents.dtype)

    # ---- generation --------------------------------------------------------------------------------
    def latent_shape(self, width: int, height: int, frames: int) -> tuple[int, ...]:
        self.check_request_size(width, height, frames, SIZE_FLAGS)
        return (16, (frames - 1) // 4 + 1, height // 8, width // 8)

    def generation_guidance(self, args: argparse.Namespace):
        from musubi_tuner.inference.guidance import guidance_options_from_args

        return guidance_options_from_args(args) if hasattr(args, "cfg_skip_mode") else None

    def block_skipper(self, dit: nn.Module):
        from functools import partial

        from musubi_tuner.inference.guidance import blocks_passed_through

        return partial(blocks_passed_through, dit.blocks)

    def generation_source_latents(self, encoders: WanLatentEncoders, request: Any, latent_shape: tuple[int, ...],
                                  args: argparse.Namespace) -> tuple[torch.Tensor, float] | None:
        """Video to video (`--video_path`, `--strength`): the source video's first frames, VAE-encoded."""
        video_path = getattr(args, "video_path", None)
        if not video_path:
            return None
        from musubi_tuner.inference.video_to_video import load_source_video

        pixels = load_source_video(video_path, latent_shape)
        video = pixels_to_model_range(pixels[None], encoders.vae.device, encoders.vae.dtype)
        return self._encode_video(encoders.vae, video).float().cpu(), float(args.strength)

    def prompt_spec_from_args(self, args: argparse.Namespace):
        from musubi_tuner.architectures.common import video_prompt_spec

        return video_prompt_spec(args, end_image_path=args.end_image_path, control_path=args.control_path,
                                 one_frame=args.one_frame_inference,
                                 control_image_paths=list(args.control_image_path or []),
                                 control_image_mask_paths=list(args.control_image_mask_path or []))

    def generation_latent_shape(self, request: Any, args: argparse.Namespace) -> tuple[int, ...]:
        shape = self.latent_shape(request.width, request.height, request.frames)
        if request.one_frame:  # one latent frame per control image and one for the target
            return (shape[0], len(one_frame.parse_one_frame_options(request.one_frame).f_indices), *shape[2:])
        return shape

    def generation_output_latents(self, latents: torch.Tensor, request: Any, args: argparse.Namespace) -> torch.Tensor:
        if request.one_frame:  # only the target frame is the result
            position = one_frame.parse_one_frame_options(request.one_frame).target_position
            return latents[:, :, position:position + 1]
        return latents

    def generation_conditioning(self, encoders: WanLatentEncoders, request: Any, latent_shape: tuple[int, ...],
                                args: argparse.Namespace) -> dict[str, Any]:
        """I2V (`image_path`) and FLF2V (`end_image_path`): mask+image latents and CLIP context; Fun-Control: the
        control video's latents; one-frame inference: the control images' conditioning and frame positions."""
        image_path = getattr(request, "image_path", None)
        end_path = getattr(request, "end_image_path", None)
        extras = self._fun_control_conditioning(encoders, request, latent_shape, args)
        if image_path is None and end_path is None:
            if args.task in START_IMAGE_TASKS:
                raise UserError(f"--task {args.task} needs --image_path (the start image)")
            return extras
        if fun_control.is_fun_control(args.task) and end_path is not None:
            raise UserError("--end_image_path is not supported with Fun-Control tasks by this version; drop it")
        if args.task not in START_IMAGE_TASKS:
            raise UserError(f"--image_path/--end_image_path need an I2V/FLF2V --task, not {args.task}")
        if encoders.clip is None and args.task in CLIP_TASKS:
            raise UserError(f"--task {args.task} needs --clip models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
        from musubi_tuner.inference.images import load_image_resized

        height, width = latent_shape[-2] * 8, latent_shape[-1] * 8
        frames = (latent_shape[1] - 1) * 4 + 1
        first = load_image_resized(image_path, width, height)
        last = load_image_resized(end_path, width, height, flag="--end_image_path") if end_path else None
        vae = encoders.vae
        if args.task in CLIP_TASKS:  # Wan2.2 I2V: the image reaches the DiT through its latents only
            images = [first[None]] + ([last[None]] if last is not None else [])
            extras["clip"] = self._clip_context(encoders.clip, images)
        if request.one_frame:
            return {**extras, **self._one_frame_conditioning(vae, request, height, width)}
        first_v = pixels_to_model_range(first[None, None], vae.device, vae.dtype)
        last_v = pixels_to_model_range(last[None, None], vae.device, vae.dtype) if last is not None else None
        extras["latents_image"] = self.image_condition_latents(vae, first_v, last_v, frames)
        return extras

    def _fun_control_conditioning(self, encoders: WanLatentEncoders, request: Any, latent_shape: tuple[int, ...],
                                  args: argparse.Namespace) -> dict[str, Any]:
        """Fun-Control: the control video's latents (and whether the start image is used); {} for other tasks."""
        if not fun_control.is_fun_control(args.task):
            return {}
        if not request.control_path:
            raise UserError(f"--task {args.task} (Fun-Control) needs --control_path (or --cn in the prompt line)")
        height, width = latent_shape[-2] * 8, latent_shape[-1] * 8
        frames = (latent_shape[1] - 1) * 4 + 1
        control = fun_control.load_control_frames(request.control_path, frames, width, height)
        vae = encoders.vae
        latents = self._encode_video(vae, pixels_to_model_range(control[None], vae.device, vae.dtype))
        return {"latents_control": latents, fun_control.USES_START_IMAGE: args.task in START_IMAGE_TASKS}

    def _one_frame_conditioning(self, vae: nn.Module, request: Any, height: int, width: int) -> dict[str, Any]:
        """One-frame inference: control images at their time positions, the target frame blank (one_frame.py)."""
        from musubi_tuner.inference.images import load_image_resized

        layout = one_frame.parse_one_frame_options(request.one_frame)
        controls = [self._encode_image(vae, load_image_resized(path, width, height, flag="--control_image_path"))
                    for path in request.control_image_paths]
        y = one_frame.condition_latents(layout, controls, self._blank_latent(vae, height, width))
        return {"latents_image": y[None], "f_indices": torch.tensor([layout.f_indices])}

    def guidance_schedule(self, args: argparse.Namespace | None, guidance_scale: float) -> Callable[[float], float] | None:
        return wan22_experts.guidance_schedule(args, guidance_scale)
