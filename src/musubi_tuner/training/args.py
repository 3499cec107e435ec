"""The flags every `*_train_network.py` shares, with the reference's names, types and defaults.

`add_common_training_arguments(parser)` adds them; `validate_training_args(args)` checks them early
(before any model is loaded) and raises `UserError` naming the flag. Architecture modules add their
own flags (`--t5`, `--task`, ...) on the same parser; they must not re-add the ones here
(`--fp8_scaled` included).
"""

from __future__ import annotations

import argparse
import math
import pathlib

from musubi_tuner.errors import UserError
from musubi_tuner.utils.flag_types import (
    finite_float,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    seed_int,
    unit_float,
)

TIMESTEP_SAMPLING_CHOICES = (
    "sigma",
    "uniform",
    "sigmoid",
    "shift",
    "flux_shift",
    "qwen_shift",
    "logsnr",
    "qinglong_flux",
    "qinglong_qwen",
)
WEIGHTING_SCHEME_CHOICES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")
ATTENTION_FLAGS = ("sdpa", "flash_attn", "sage_attn", "xformers", "flash3")
HUGGINGFACE_FLAGS = (
    "huggingface_repo_id",
    "huggingface_repo_type",
    "huggingface_path_in_repo",
    "huggingface_token",
    "huggingface_repo_visibility",
    "save_state_to_huggingface",
    "resume_from_huggingface",
    "async_upload",
)


def int_or_float(value: str) -> int | float:
    """`10` -> 10 steps; `0.1` or `10%` -> ratio 0.1 of the total steps (the reference's parsing)."""
    text = value.strip()
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a step count, a ratio or a percentage") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"{value!r} is not a finite number")
    # A whole number >= 1 is a step count; anything else is a ratio of the total steps.
    if number >= 1 and number.is_integer():
        return int(number)
    return number


def _dynamo_backends() -> list[str]:
    try:
        from accelerate.utils import DynamoBackend

        return [e.value for e in DynamoBackend]
    except ImportError:  # pragma: no cover - accelerate is a hard dependency
        return ["NO", "INDUCTOR", "EAGER", "AOT_EAGER"]


def _add_general(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config_file", type=str, default=None, help="TOML file with any of these flags (CLI wins)")
    p.add_argument("--dataset_config", type=pathlib.Path, default=None, help="dataset config (TOML)")


def _add_attention(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sdpa", action="store_true", help="PyTorch scaled_dot_product_attention (default)")
    p.add_argument("--flash_attn", action="store_true", help="FlashAttention 2 (needs flash-attn)")
    p.add_argument("--sage_attn", action="store_true", help="SageAttention (inference only)")
    p.add_argument("--xformers", action="store_true", help="xformers attention (use with --split_attn)")
    p.add_argument("--flash3", action="store_true", help="FlashAttention 3 (needs flash-attn 3)")
    p.add_argument("--split_attn", action="store_true", help="compute attention one batch item at a time")


def add_compile_arguments(p: argparse.ArgumentParser) -> None:
    """torch.compile flags shared by the training and generate scripts (see memory/attention.compile_dit_from_flags)."""
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks")
    p.add_argument("--compile_backend", type=str, default="inductor")
    p.add_argument(
        "--compile_mode",
        type=str,
        default="default",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
    )
    p.add_argument("--compile_dynamic", type=str, default=None, choices=["true", "false", "auto"])
    p.add_argument("--compile_fullgraph", action="store_true")
    p.add_argument("--compile_cache_size_limit", type=positive_int, default=None, help="torch._dynamo cache_size_limit")


def _add_compile(p: argparse.ArgumentParser) -> None:
    add_compile_arguments(p)
    p.add_argument("--cuda_allow_tf32", action="store_true", help="allow TF32 matmuls on Ampere+")
    p.add_argument("--cuda_cudnn_benchmark", action="store_true")
    p.add_argument("--dynamo_backend", type=str, default="NO", choices=_dynamo_backends())
    p.add_argument("--dynamo_mode", type=str, default=None, choices=["default", "reduce-overhead", "max-autotune"])
    p.add_argument("--dynamo_fullgraph", action="store_true")
    p.add_argument("--dynamo_dynamic", action="store_true")


def _add_training(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max_train_steps", type=positive_int, default=1600, help="optimizer steps to train")
    p.add_argument("--max_train_epochs", type=positive_int, default=None, help="epochs to train (overrides --max_train_steps)")
    p.add_argument("--max_data_loader_n_workers", type=non_negative_int, default=8, help="DataLoader workers (capped at CPU count)")
    p.add_argument("--persistent_data_loader_workers", action="store_true")
    p.add_argument("--seed", type=seed_int, default=None, help="random seed (random when omitted)")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--gradient_checkpointing_cpu_offload", action="store_true")
    p.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    p.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    p.add_argument(
        "--save_precision",
        type=str,
        default="fp32",
        choices=["float", "fp32", "fp16", "bf16"],
        help="dtype of saved LoRA weights (float = fp32)",
    )
    p.add_argument(
        "--save_lora_format",
        default="default",
        choices=["default", "other"],
        help="key layout of the saved LoRA files: default = the reference's lora_unet_* (what its tools read); other = "
             "diffusion_model.<original name>.lora_A/B (alpha baked in; FramePack: transformer.<name>), which ComfyUI "
             "and diffusers load unconverted for every family, HunyuanVideo included. Resume states are not affected",
    )


def _add_logging(p: argparse.ArgumentParser) -> None:
    p.add_argument("--logging_dir", type=str, default=None, help="write TensorBoard logs here")
    p.add_argument("--log_with", type=str, default=None, choices=["tensorboard", "wandb", "all"])
    p.add_argument("--log_prefix", type=str, default=None, help="prefix of the log folder name")
    p.add_argument("--log_tracker_name", type=str, default=None)
    p.add_argument("--wandb_run_name", type=str, default=None)
    p.add_argument("--log_tracker_config", type=str, default=None, help="TOML with tracker init kwargs")
    p.add_argument("--wandb_api_key", type=str, default=None)
    p.add_argument("--log_config", action="store_true", help="log the flags (paths and keys removed)")


def _add_ddp(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ddp_timeout", type=positive_int, default=None, help="minutes; accelerate's default when omitted")
    p.add_argument("--ddp_gradient_as_bucket_view", action="store_true")
    p.add_argument("--ddp_static_graph", action="store_true")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sample_every_n_steps", type=positive_int, default=None)
    p.add_argument("--sample_at_first", action="store_true", help="sample before the first step")
    p.add_argument("--sample_every_n_epochs", type=positive_int, default=None, help="overrides --sample_every_n_steps")
    p.add_argument("--sample_prompts", type=str, default=None, help="prompt file (.txt, .toml or .json)")


def _add_validation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--validate_every_n_steps", type=positive_int, default=None,
                   help="compute the loss over the dataset config's [[validation_datasets]] every N steps")
    p.add_argument("--validate_every_n_epochs", type=positive_int, default=None,
                   help="compute the validation loss every N epochs")
    p.add_argument("--validation_seed", type=seed_int, default=None,
                   help="seed of the fixed validation noise (default: --seed)")


def _add_optimizer(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--optimizer_type",
        type=str,
        default="",
        help="AdamW (default), AdamW8bit, AdaFactor, or module.Class (a bare class name is looked up in torch.optim)",
    )
    p.add_argument(
        "--optimizer_args", type=str, default=None, nargs="*", help='e.g. "weight_decay=0.01 betas=0.9,0.999"'
    )
    p.add_argument("--learning_rate", type=non_negative_float, default=2.0e-6)
    p.add_argument("--max_grad_norm", type=non_negative_float, default=1.0, help="gradient clipping norm; 0 disables")


def _add_lr_scheduler(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lr_scheduler", type=str, default="constant", help="constant, linear, cosine, rex, ... (see docs)")
    p.add_argument("--lr_warmup_steps", type=int_or_float, default=0, help="steps, or ratio (<1) of total steps")
    p.add_argument("--lr_decay_steps", type=int_or_float, default=0, help="steps, or ratio (<1) of total steps")
    p.add_argument("--lr_scheduler_num_cycles", type=positive_int, default=1)
    p.add_argument("--lr_scheduler_power", type=finite_float, default=1)
    p.add_argument("--lr_scheduler_timescale", type=positive_int, default=None, help="inverse_sqrt timescale")
    p.add_argument("--lr_scheduler_min_lr_ratio", type=unit_float, default=None)
    p.add_argument("--lr_scheduler_type", type=str, default="", help="custom scheduler class (module.Class)")
    p.add_argument("--lr_scheduler_args", type=str, default=None, nargs="*", help='e.g. "T_max=100"')


def _add_memory(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fp8_base", action="store_true", help="store the base DiT in fp8")
    p.add_argument("--fp8_scaled", action="store_true", help="scaled fp8 (needs --fp8_base)")
    p.add_argument("--blocks_to_swap", type=non_negative_int, default=None, help="DiT blocks kept on CPU and swapped in")
    p.add_argument("--use_pinned_memory_for_block_swap", action="store_true",
                   help="pin all swapped weights (faster copies, more pinned RAM) instead of two staging buffers")
    p.add_argument("--block_swap_h2d_only", action="store_true",
                   help="copy swapped blocks into a ring of reused GPU buffers (needs --gradient_checkpointing)")
    p.add_argument("--block_swap_ring_size", type=positive_int, default=2,
                   help="swapped blocks resident at once (2: copy the next while one runs; 1: least VRAM)")
    p.add_argument("--img_in_txt_in_offloading", action="store_true", help="HunyuanVideo: keep img_in/txt_in in CPU memory, on the GPU only while they run")
    p.add_argument("--disable_numpy_memmap", action="store_true")


def _add_timesteps(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guidance_scale", type=finite_float, default=1.0, help="embedded guidance (HunyuanVideo)")
    p.add_argument("--timestep_sampling", choices=list(TIMESTEP_SAMPLING_CHOICES), default="sigma")
    p.add_argument("--discrete_flow_shift", type=positive_float, default=1.0)
    p.add_argument("--sigmoid_scale", type=positive_float, default=1.0)
    p.add_argument("--weighting_scheme", type=str, default="none", choices=list(WEIGHTING_SCHEME_CHOICES))
    p.add_argument("--logit_mean", type=finite_float, default=0.0)
    p.add_argument("--logit_std", type=positive_float, default=1.0)
    p.add_argument("--mode_scale", type=finite_float, default=1.29)
    p.add_argument("--min_timestep", type=non_negative_int, default=None, help="0..999 (default 0)")
    p.add_argument("--max_timestep", type=positive_int, default=None, help="1..1000 (default 1000)")
    p.add_argument("--preserve_distribution_shape", action="store_true", help="rejection-sample into the range")
    p.add_argument("--num_timestep_buckets", type=positive_int, default=None, help="stratified timesteps per epoch (>= 2)")
    p.add_argument("--show_timesteps", type=str, default=None, choices=["image", "console"])


def _add_network(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no_metadata", action="store_true")
    p.add_argument("--network_weights", type=str, default=None, help="start from these LoRA weights")
    p.add_argument("--network_module", type=str, default=None)
    p.add_argument("--network_dim", type=positive_int, default=None)
    p.add_argument("--network_alpha", type=non_negative_float, default=1)
    p.add_argument("--network_dropout", type=unit_float, default=None)
    p.add_argument("--network_args", type=str, default=None, nargs="*", help="key=value ...")
    p.add_argument("--training_comment", type=str, default=None)
    p.add_argument("--dim_from_weights", action="store_true")
    p.add_argument("--scale_weight_norms", type=positive_float, default=None)
    p.add_argument("--base_weights", type=str, default=None, nargs="*")
    p.add_argument("--base_weights_multiplier", type=finite_float, default=None, nargs="*")


def _add_save_load(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output_dir", type=str, default=None)
    p.add_argument("--output_name", type=str, default=None)
    p.add_argument("--resume", type=str, default=None, help="state folder to resume from, or `auto` for the newest complete state of --output_name in --output_dir")
    p.add_argument("--save_every_n_epochs", type=positive_int, default=None)
    p.add_argument("--save_every_n_steps", type=positive_int, default=None)
    p.add_argument("--save_last_n_epochs", type=positive_int, default=None, help="keep this many epoch saves")
    p.add_argument(
        "--save_last_n_epochs_state", type=positive_int, default=None, help="overrides --save_last_n_epochs for states"
    )
    p.add_argument("--save_last_n_steps", type=non_negative_int, default=None, help="keep step saves of the last N steps")
    p.add_argument("--save_last_n_steps_state", type=non_negative_int, default=None, help="overrides --save_last_n_steps for states")
    p.add_argument("--save_state", action="store_true", help="also save optimizer/scheduler/RNG state")
    p.add_argument("--save_state_on_train_end", action="store_true")


def _add_metadata(p: argparse.ArgumentParser) -> None:
    for key in ("title", "author", "description", "license", "tags", "reso", "arch"):
        p.add_argument(f"--metadata_{key}", type=str, default=None)


def _add_huggingface(p: argparse.ArgumentParser) -> None:
    # Accepted so existing configs parse; using them is a UserError (no upload code in this build).
    for key in HUGGINGFACE_FLAGS:
        if key in ("save_state_to_huggingface", "resume_from_huggingface", "async_upload"):
            p.add_argument(f"--{key}", action="store_true", help="not supported in this build")
        else:
            p.add_argument(f"--{key}", type=str, default=None, help="not supported in this build")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dit", type=str, default=None, help="DiT checkpoint")
    p.add_argument("--vae", type=str, default=None, help="VAE checkpoint")
    p.add_argument("--vae_dtype", type=str, default=None, help="VAE dtype (default: the architecture's, bfloat16 for Wan, float32 for the FLUX AE)")


def add_common_training_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every flag shared by the training scripts to `parser`; returns it."""
    for add in (
        _add_general,
        _add_attention,
        _add_compile,
        _add_training,
        _add_logging,
        _add_ddp,
        _add_sampling,
        _add_validation,
        _add_optimizer,
        _add_lr_scheduler,
        _add_memory,
        _add_timesteps,
        _add_network,
        _add_save_load,
        _add_metadata,
        _add_huggingface,
        _add_model,
    ):
        add(parser)
    return parser


def attention_mode(args: argparse.Namespace) -> str:
    """`sdpa` | `flash_attn` | `xformers` | `flash3`; sdpa when no attention flag is given."""
    chosen = [name for name in ATTENTION_FLAGS if getattr(args, name, False)]
    return chosen[0] if chosen else "sdpa"


# ---- validation -------------------------------------------------------------------------------


def _check_attention(args: argparse.Namespace) -> None:
    if getattr(args, "sage_attn", False):
        raise UserError(
            "--sage_attn does not support training (no backward pass); use --sdpa, --flash_attn or --xformers"
        )
    chosen = [f"--{name}" for name in ATTENTION_FLAGS if getattr(args, name, False)]
    if len(chosen) > 1:
        raise UserError(f"choose one attention backend, got {' and '.join(chosen)}")


def _check_steps_or_ratio(args: argparse.Namespace, name: str) -> None:
    value = getattr(args, name)
    if value is None:
        return
    if value < 0:
        raise UserError(f"--{name} must not be negative, got {value}")
    if isinstance(value, float) and not value < 1.0:
        raise UserError(f"--{name} as a ratio of the total steps must be in [0, 1), got {value}")


def _check_saving(args: argparse.Namespace) -> None:
    # Ranges are checked by the flags' types: an epoch count of 0 would delete the save just written (so >= 1);
    # a step window of 0 keeps only the newest (so >= 0). Pruning counts back from the save interval, so it needs one.
    for kind in ("epochs", "steps"):
        for name in (f"save_last_n_{kind}", f"save_last_n_{kind}_state"):
            if getattr(args, name, None) is not None and getattr(args, f"save_every_n_{kind}", None) is None:
                raise UserError(f"--{name} needs --save_every_n_{kind}")


def _check_timesteps(args: argparse.Namespace) -> None:
    lo, hi = args.min_timestep, args.max_timestep
    if lo is not None and not 0 <= lo <= 999:
        raise UserError(f"--min_timestep must be in 0..999, got {lo}")
    if hi is not None and not 1 <= hi <= 1000:
        raise UserError(f"--max_timestep must be in 1..1000, got {hi}")
    if (lo if lo is not None else 0) >= (hi if hi is not None else 1000):
        raise UserError(f"--min_timestep ({lo}) must be smaller than --max_timestep ({hi})")


def _check_unsupported(args: argparse.Namespace) -> None:
    used = [f"--{name}" for name in HUGGINGFACE_FLAGS if getattr(args, name, None) not in (None, False)]
    if used:
        joined = ", ".join(used)
        raise UserError(f"{joined}: Hugging Face upload/download is not supported in this build; remove the flag")


def _check_offloading(args: argparse.Namespace) -> None:
    if args.block_swap_h2d_only and not (args.blocks_to_swap and args.gradient_checkpointing):
        # the ring's device buffers are refilled as soon as a block's forward ends; only a checkpointed backward
        # (which recomputes the block) never reads the old contents again, as in the reference
        raise UserError("--block_swap_h2d_only needs --blocks_to_swap N and --gradient_checkpointing")
    if args.gradient_checkpointing_cpu_offload and not args.gradient_checkpointing:
        raise UserError("--gradient_checkpointing_cpu_offload needs --gradient_checkpointing")


def validate_training_args(args: argparse.Namespace) -> None:
    """Check the common flags; raise `UserError` naming the first bad flag."""
    _check_unsupported(args)
    _check_attention(args)
    # single-flag ranges are the flags' `type=` (utils/flag_types.py); here: what needs several flags
    _check_steps_or_ratio(args, "lr_warmup_steps")
    _check_steps_or_ratio(args, "lr_decay_steps")
    if args.fp8_scaled and not args.fp8_base:
        raise UserError("--fp8_scaled needs --fp8_base")
    _check_offloading(args)
    _check_saving(args)
    _check_timesteps(args)
