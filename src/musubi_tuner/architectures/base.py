"""The per-family contract. The trainer, caching drivers and inference loop call only this.

Adding an architecture = one subclass in `architectures/<name>` + one line in the registry.
Each required method raises NotImplementedError naming the class and the method.

Conventions shared by every method:
- "content dicts" are cache tensors keyed by content name without dtype/shape suffix
  (`latents`, `latents_image`, `clip`, `varlen_t5`, `t5_vec`, `clip_l_pooler` ...). The cache
  writer adds the reference suffixes (`latents_{F}x{H}x{W}_{dtype}`, `varlen_t5_{dtype}`).
- a "batch" is what `dataset.batches` yields: the same names with suffixes stripped (`latents`,
  `t5` ...); `varlen_*` entries become lists of tensors (prefix stripped), the rest are stacked.
- timesteps handed to `predict` are on the 0..1000 scale, one per sample (float tensor (B,)).
- `predict` returns the flow-matching velocity (noise - latents) for the target latents only.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from musubi_tuner.dataset.items import Item, ItemPixels
from musubi_tuner.dataset.traits import DatasetTraits
from musubi_tuner.errors import UserError
from musubi_tuner.networks.targets import LoraTarget


@dataclass(frozen=True, kw_only=True)
class GenerationDefaults:
    """Inference defaults; `--flag` values of None fall back to these."""

    width: int
    height: int
    frames: int
    fps: float
    infer_steps: int
    guidance_scale: float
    flow_shift: float | None
    """None: resolution-dependent shift (FLUX)."""
    negative_prompt: str = ""
    embedded_guidance: float | None = None
    sample_solver: str = "unipc"
    """The reference's sampler for this family (`--sample_solver` default and samples during training)."""


class Architecture:
    """Base class: one instance per model family (stateless; models are passed in)."""

    name: ClassVar[str]
    """Registry key and `--arch` value, e.g. `wan`."""
    script_prefix: ClassVar[str]
    """Prefix of the reference scripts (`wan`, `flux_kontext`)."""
    traits: ClassVar[DatasetTraits]
    network_module: ClassVar[str]
    """Reference `--network_module` value for this family, e.g. `networks.lora_wan`."""
    modelspec_architecture: ClassVar[str]
    """SAI model-spec `modelspec.architecture` string, e.g. `wan2.1`."""
    lora_default_excludes: ClassVar[tuple[str, ...]] = ()
    other_lora_prefix: ClassVar[str] = "diffusion_model"
    """Key prefix of `--save_lora_format other` files (`<prefix>.<original name>.lora_A/B`): what ComfyUI and diffusers
    read for this family's original names."""
    """Regexes (fullmatch on the original module path) always excluded, as the reference does."""
    lora_default_excludes_if_unset: ClassVar[tuple[str, ...]] = ()
    """Regexes excluded only when the user gives no `exclude_patterns` (FLUX's modulation layers)."""
    fp8_scaled_keys: ClassVar[tuple[tuple[str, ...], tuple[str, ...]]] = ((), ())
    """The reference's `--fp8_scaled` rule: (targets, excludes), substrings of ORIGINAL weight keys; a Linear is
    quantized when its key contains a target and no exclude (`memory.fp8.reference_fp8_layers`). Plain
    `--fp8_base` needs no rule: the reference casts every weight."""

    def script_name(self, stage: str) -> str:
        """The reference's script file for a stage (`cache_latents`, `cache_text_encoder_outputs`,
        `train_network`, `generate_video` ...), named in messages that tell the user what to run."""
        return f"{self.script_prefix}_{stage}.py"

    def _missing(self, method: str) -> NotImplementedError:
        return NotImplementedError(f"{type(self).__name__}.{method} is not implemented")

    # ---- command-line flags ------------------------------------------------------------------
    def add_arguments(self, parser: argparse.ArgumentParser, purpose: str) -> None:
        """Add the family's flags. purpose: cache_latents | cache_text | train | generate."""
        raise self._missing("add_arguments")

    def validate_arguments(self, args: argparse.Namespace, purpose: str) -> None:
        """Check flags early (before loading models); raise UserError naming the flag."""

    # ---- latent caching ------------------------------------------------------------------------
    def load_vae(self, args: argparse.Namespace, device: torch.device) -> Any:
        raise self._missing("load_vae")

    def load_latent_encoders(self, args: argparse.Namespace, device: torch.device) -> Any:
        """Everything `encode_latents` needs (VAE, image encoder ...)."""
        return self.load_vae(args, device)

    def latent_cache_contents(self, args: argparse.Namespace) -> set[str]:
        """The content names `encode_latents` writes with these flags (`--skip_existing` re-encodes caches that
        lack any, e.g. T2V caches when `--i2v` is asked for)."""
        return {"latents"}

    def encode_latents(self, encoders: Any, batch: list[ItemPixels], args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
        """One content dict per item, e.g. {"latents": (C,F,H,W)}."""
        raise self._missing("encode_latents")

    def latent_pixels(self, item: Item, spec: Any, pixels: ItemPixels) -> ItemPixels:
        """The decoded media of one item as `encode_latents` should see it. Default: as decoded; FramePack drops
        the frames after its last whole section, as the reference."""
        return pixels

    def latent_cache_paths(self, item: Item, spec: Any, args: argparse.Namespace) -> list[Path]:
        """Every latent cache file one dataset item writes with these flags (spec: its `DatasetSpec`). Called for
        every item before any model loads, so it may refuse an item with a UserError naming it. Default: the
        item's own cache; FramePack writes one per section."""
        return [item.latent_cache_path]

    def latent_cache_files(self, item: Item, spec: Any, content: dict[str, torch.Tensor],
                           args: argparse.Namespace) -> list[tuple[Path, dict[str, torch.Tensor]]]:
        """`encode_latents`' content of one item -> (cache file, content) for each of `latent_cache_paths`.
        Default: the content as is, in the item's own cache."""
        return [(item.latent_cache_path, content)]

    def latents_from_cache(self, latents: torch.Tensor) -> torch.Tensor:
        """Cached latents -> the DiT's latent space, when training. Identity for families that cache DiT-space
        latents (Wan, FLUX); HunyuanVideo caches the raw VAE sample, as the reference, and scales here."""
        return latents

    # ---- text caching --------------------------------------------------------------------------
    def load_text_encoders(self, args: argparse.Namespace, device: torch.device) -> Any:
        raise self._missing("load_text_encoders")

    def encode_prompts(self, encoders: Any, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        """One content dict per prompt, e.g. {"varlen_t5": (L, 4096)}."""
        raise self._missing("encode_prompts")

    # ---- DiT ---------------------------------------------------------------------------------
    def load_dit(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> nn.Module:
        """The diffusers transformer, frozen, in eval mode, weights in `dtype` (fp8 handled by caller)."""
        raise self._missing("load_dit")

    def attach_expert_dits(self, dit: nn.Module, load: Callable[[argparse.Namespace], nn.Module],
                           args: argparse.Namespace, device: torch.device) -> None:
        """Families with several DiT experts (Wan2.2 A14B: `--dit_high_noise`) load the others with
        `load(flags naming that expert's file)` (the same preparation as `dit`: LoRA merge, fp8 ...) and attach them
        to `dit`, so that `predict` picks the expert per timestep. Called before LoRA/compile wrap `dit`. Default:
        one DiT, nothing to attach."""

    def swapped_blocks(self, dit: nn.Module, count: int) -> list[nn.Module]:
        """`--blocks_to_swap N`: the DiT blocks kept in CPU memory, in execution order, with the reference's meaning
        of N. Default: the last N of the class's repeated blocks (Wan); double + single stream families override
        with `memory.block_swap.double_single_split`. Raise UserError when N is out of range."""
        from musubi_tuner.memory.block_swap import last_blocks, repeated_blocks

        return last_blocks(repeated_blocks(dit), count)

    def offloaded_input_modules(self, dit: nn.Module) -> list[nn.Module]:
        """`--img_in_txt_in_offloading`: the DiT's input embedders kept in CPU memory and moved to the device only
        for their own forward (HunyuanVideo: `img_in` and `txt_in`). Default: none (the flag has no effect)."""
        return []

    def lora_candidates(self, dit: nn.Module) -> list[LoraTarget]:
        """Every Linear the reference's LoRA may target, named by its ORIGINAL module path."""
        raise self._missing("lora_candidates")

    def lora_targets_for_conversion(self, lora_sd: dict[str, torch.Tensor]) -> list[LoraTarget]:
        """`lora_candidates` of a model sized from a LoRA file's own keys, without any model file
        (convert_lora.py: exact names, and the diffusers layout)."""
        raise self._missing("lora_targets_for_conversion")

    def lora_state_dict_for_merge(self, lora_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A LoRA file's state dict -> this family's module names, before it is merged for generation (FramePack
        also takes HunyuanVideo LoRAs, converted, as the reference). Default: as it is."""
        return lora_sd

    def dit_state_dict_to_original(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Diffusers state dict -> original/ComfyUI key layout (for --save_merged_model)."""
        raise self._missing("dit_state_dict_to_original")

    def check_training_caches(self, latent_keys: dict[str, set[str]], args: argparse.Namespace) -> None:
        """Before any model loads: refuse caches that cannot train this model/task (e.g. T2V caches for an I2V
        task). latent_keys: one latent cache per bucket -> its batch keys. Raise UserError naming a file."""

    def training_conditioning(self, args: argparse.Namespace) -> dict[str, Any]:
        """Constant batch entries for every training step, from the training flags (HunyuanVideo: the embedded
        guidance `--guidance_scale`). Default: none."""
        return {}

    def sample_noisy_input(self, args: argparse.Namespace, latents: torch.Tensor, noise: torch.Tensor,
                           generator: torch.Generator, image_seq_len: int | None,
                           uniform: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One training draw: (noisy latents, model timesteps (B,), noise coefficients (B,)). Default: the
        `--timestep_sampling` flags as they are (`training.timesteps.sample_noisy_input`); Wan2.2 keeps every sample
        of a step on one expert's side of the boundary."""
        from musubi_tuner.training.timesteps import sample_noisy_input

        return sample_noisy_input(args, latents, noise, generator, image_seq_len, uniform)

    def predict(self, dit: nn.Module, batch: dict[str, Any], noisy_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Velocity prediction for `noisy_latents` (same shape), conditioned on the batch."""
        raise self._missing("predict")

    # ---- generation ----------------------------------------------------------------------------
    generation_defaults: ClassVar[GenerationDefaults]

    def generation_defaults_for(self, args: argparse.Namespace | None, width: int | None = None,
                                height: int | None = None) -> GenerationDefaults:
        """Defaults for these flags (e.g. Wan's `--task`) and this output size; None args: the family's defaults."""
        return self.generation_defaults

    def latent_shape(self, width: int, height: int, frames: int) -> tuple[int, ...]:
        """Shape (without batch) of the noise for one sample."""
        raise self._missing("latent_shape")

    def request_size_problems(self, width: int, height: int, frames: int) -> dict[str, str]:
        """Why this size cannot be generated, per request field (`width`/`height`/`frames`) -> reason; {} when
        it can. Used to check every prompt line and size flag before any model loads. Default: sides are positive
        multiples of the bucket step; frames are 4N+1 style (`frame_stride`), or exactly 1 for image-only families."""
        step, stride = self.traits.bucket_step, self.traits.frame_stride
        problems = {field: f"must be a positive multiple of {step}, got {value}"
                    for field, value in (("height", height), ("width", width)) if value <= 0 or value % step}
        if stride is None and frames != 1:
            problems["frames"] = f"{self.name} makes single images; got {frames} frames (drop the frame option)"
        elif stride is not None and (frames < 1 or (frames - 1) % stride):
            problems["frames"] = f"must be {stride}N+1 (1, {stride + 1}, {2 * stride + 1}, ...), got {frames}"
        return problems

    def check_request_size(self, width: int, height: int, frames: int, names: dict[str, str]) -> None:
        """Raise UserError for the first size problem, naming what set the field (names: field -> flag/option)."""
        for field, reason in self.request_size_problems(width, height, frames).items():
            raise UserError(f"{names.get(field, field)}: {reason}")

    def guidance_schedule(self, args: argparse.Namespace | None, guidance_scale: float) -> Callable[[float], float] | None:
        """The CFG scale per timestep (0..1000 scale) when it changes during sampling (Wan2.2: one scale per
        expert); None (the default): `guidance_scale` at every step."""
        return None

    def check_request_options(self, request: Any, args: argparse.Namespace | None) -> None:
        """Raise UserError when a request's family-specific options cannot be used with these flags (checked for
        every prompt line before any model loads; the caller adds where the request came from). Default: none."""

    def generation_latent_shape(self, request: Any, args: argparse.Namespace) -> tuple[int, ...]:
        """Shape (without batch) of the noise for one resolved request. Default: `latent_shape` of its size and
        frames; Wan one-frame inference denoises one latent frame per control/target time position instead."""
        return self.latent_shape(request.width, request.height, request.frames)

    def generation_output_latents(self, latents: torch.Tensor, request: Any, args: argparse.Namespace) -> torch.Tensor:
        """The part of the denoised latents (1, ...) that is decoded and saved. Default: all of them; Wan one-frame
        inference keeps only the target frame."""
        return latents

    def generation_conditioning(self, encoders: Any, request: Any, latent_shape: tuple[int, ...], args: argparse.Namespace) -> dict[str, Any]:
        """Extra batch entries for image/control conditioning (I2V image latents, Kontext control)."""
        return {}

    def generation_source_latents(self, encoders: Any, request: Any, latent_shape: tuple[int, ...],
                                  args: argparse.Namespace) -> tuple[torch.Tensor, float] | None:
        """Video to video: (clean DiT-space latents of the source video, strength in (0, 1]) to start the sampler
        from part way (`inference.video_to_video`); None (the default): start from pure noise."""
        return None

    def generation_guidance(self, args: argparse.Namespace) -> Any:
        """Per-step guidance choices from the generate flags (`inference.guidance.GuidanceOptions`: Wan's
        `--cfg_skip_mode/--cfg_apply_ratio` and `--slg_*`); None (the default): CFG on every step."""
        return None

    def block_skipper(self, dit: nn.Module) -> Any:
        """`skip(indices)` -> a context in which those DiT blocks pass their input through (skip-layer guidance);
        None (the default): this family cannot skip blocks."""
        return None

    def sample_requests(self, args: argparse.Namespace) -> list[Any]:
        """Every `--sample_prompts` line parsed and checked (training calls this before any model loads).
        Default: one latent block per line (`inference.training_samples`)."""
        from musubi_tuner.inference.training_samples import load_sample_requests

        return load_sample_requests(self, args)

    def training_sampler(self, args: argparse.Namespace, device: torch.device) -> Any:
        """What renders the sample prompts during training: an object with `run(dit, epoch=, step=, autocast=)`.
        Default: the generate scripts' `render()`; FramePack runs its section loop."""
        from musubi_tuner.inference.training_samples import TrainingSampler

        return TrainingSampler(self, args, device)

    def prompt_spec_from_args(self, args: argparse.Namespace) -> Any:
        """The generate script's flags (size, frames, images ...) as an `inference.prompts.PromptSpec`."""
        raise self._missing("prompt_spec_from_args")

    def output_fps(self, args: argparse.Namespace) -> float:
        return getattr(args, "fps", None) or self.generation_defaults.fps

    def decode_latents(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, F, H, W) or (B, C, H, W) latents -> uint8 (B, F, H, W, 3) pixels."""
        raise self._missing("decode_latents")

    def timestep_shift_sequence_length(self, latent_shape: tuple[int, ...]) -> int:
        """Image-token count used by resolution-dependent shifts (flux_shift)."""
        h, w = latent_shape[-2:]
        return (h // 2) * (w // 2)
