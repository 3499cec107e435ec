"""Metadata written into LoRA files: `ss_*` training keys, SAI `modelspec.*` keys and the `sshs_*` hashes.

Key names and hash definitions follow the reference tool (and sd-scripts before it), so tools that index LoRA
files (webui additional-networks, civitai) read ours the same way.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from collections.abc import Mapping
from typing import Any

import torch

# Keys kept under --no_metadata.
MINIMUM_KEYS = ("ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")

# Training flags recorded as `ss_<name>` (value str()-ed; missing flags are recorded as "None", as the reference does).
_RECORDED_FLAGS = (
    "output_name", "learning_rate", "gradient_checkpointing", "gradient_checkpointing_cpu_offload",
    "gradient_accumulation_steps", "max_train_steps", "lr_warmup_steps", "lr_scheduler", "network_module",
    "network_dim", "network_alpha", "network_dropout", "mixed_precision", "seed", "training_comment",
    "max_grad_norm", "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "guidance_scale",
    "timestep_sampling", "sigmoid_scale", "discrete_flow_shift",
)  # fmt: skip

_IMPLEMENTATIONS = {
    "wan2.1": "https://github.com/Wan-Video/Wan2.1",
    "Flux.1-dev": "https://github.com/black-forest-labs/flux",
    "hunyuan-video": "https://github.com/Tencent/HunyuanVideo",
    "framepack": "https://github.com/lllyasviel/FramePack",
}


def _get(args: Any, name: str, default: Any = None) -> Any:
    if isinstance(args, Mapping):
        return args.get(name, default)
    return getattr(args, name, default)


def network_args_dict(network_args: list[str] | Mapping[str, Any] | None) -> dict[str, str]:
    """`--network_args k=v ...` as the {k: v} strings recorded in `ss_network_args`."""
    if not network_args:
        return {}
    if isinstance(network_args, Mapping):
        return {str(k): str(v) for k, v in network_args.items()}
    return dict(arg.split("=", 1) for arg in network_args if "=" in arg)


def build_training_metadata(
    args: Any,
    arch: Any,
    *,
    steps: int | None = None,
    epoch: int | None = None,
    session_id: int | None = None,
    training_started_at: float | None = None,
    extra: Mapping[str, Any] | None = None,
    timestamp: float | None = None,
) -> dict[str, str]:
    """All metadata of a trained LoRA: `ss_*` from the flags (args: Namespace or dict) plus `modelspec.*`.

    arch: the Architecture (its `name` is `ss_base_model_version`, as the reference's full architecture name).
    extra: more `ss_*` keys from the trainer (ss_datasets, ss_num_train_items, ss_optimizer ...).
    """
    timestamp = time.time() if timestamp is None else timestamp
    meta: dict[str, Any] = {f"ss_{flag}": _get(args, flag) for flag in _RECORDED_FLAGS}
    meta.update(
        ss_session_id=session_id,
        ss_training_started_at=training_started_at,
        ss_base_model_version=arch.name,
        ss_fp8_base=bool(_get(args, "fp8_base", False)),
        ss_full_fp16=bool(_get(args, "full_fp16", False)),  # full-precision switches of full fine-tuning; LoRA: False
        ss_full_bf16=bool(_get(args, "full_bf16", False)),
        ss_training_finished_at=timestamp,
        ss_steps=steps,
        ss_epoch=epoch,
    )
    if _get(args, "network_args"):
        meta["ss_network_args"] = json.dumps(network_args_dict(_get(args, "network_args")))
    for flag, key in (("dit", "ss_sd_model_name"), ("vae", "ss_vae_name")):
        if _get(args, flag):
            meta[key] = _base_name(_get(args, flag))
    meta.update(extra or {})
    metadata = {k: str(v) for k, v in meta.items()}
    if _get(args, "no_metadata", False):
        metadata = {k: metadata[k] for k in MINIMUM_KEYS if k in metadata}

    timesteps = None
    if _get(args, "min_timestep") is not None or _get(args, "max_timestep") is not None:
        timesteps = (
            _get(args, "min_timestep") or 0,
            _get(args, "max_timestep") if _get(args, "max_timestep") is not None else 1000,
        )
    metadata.update(
        build_modelspec(
            arch,
            timestamp=timestamp,
            title=_get(args, "metadata_title") or _get(args, "output_name"),
            reso=_get(args, "metadata_reso"),
            author=_get(args, "metadata_author"),
            description=_get(args, "metadata_description"),
            license=_get(args, "metadata_license"),
            tags=_get(args, "metadata_tags"),
            timesteps=timesteps,
            custom_arch=_get(args, "metadata_arch"),
        )
    )
    return metadata


def dataset_metadata(spec: Any) -> dict[str, Any]:
    """One `[[datasets]]` entry as the reference records it in `ss_datasets` (folders by base name only)."""
    meta: dict[str, Any] = {
        "resolution": list(spec.resolution),
        "caption_extension": spec.caption_extension,
        "batch_size_per_device": spec.batch_size,
        "num_repeats": spec.num_repeats,
        "enable_bucket": bool(spec.enable_bucket),
        "bucket_no_upscale": bool(spec.bucket_no_upscale),
    }
    sources = ("image_directory", "image_jsonl_file") if spec.kind == "image" else ("video_directory", "video_jsonl_file")
    for key in (*sources, "control_directory"):
        if getattr(spec, key, None) is not None:
            meta[key] = _base_name(getattr(spec, key))
    if spec.kind == "video":
        meta.update(frame_extraction=spec.frame_extraction, frame_stride=spec.frame_stride,
                    frame_sample=spec.frame_sample, target_frames=list(spec.target_frames), max_frames=spec.max_frames,
                    source_fps=spec.source_fps)
    meta["has_control"] = spec.control_directory is not None
    return meta


def run_metadata(specs: list[Any], *, num_train_items: int, batches_per_epoch: int, num_epochs: int,
                 optimizer: str) -> dict[str, str]:
    """The `ss_*` keys that describe the data and optimizer of a run (`extra` of `build_training_metadata`).

    optimizer: `module.Class(k=v,...)` (`OptimizerInfo.metadata_value`); num_train_items counts repeats.
    """
    return {
        "ss_datasets": json.dumps([dataset_metadata(spec) for spec in specs]),
        "ss_num_train_items": str(num_train_items),
        "ss_num_batches_per_epoch": str(batches_per_epoch),
        "ss_num_epochs": str(num_epochs),
        "ss_optimizer": optimizer,
    }


def _base_name(path: Any) -> str:
    return str(path).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def build_modelspec(
    arch: Any,
    *,
    timestamp: float,
    title: str | None = None,
    reso: int | str | tuple[int, int] | None = None,
    author: str | None = None,
    description: str | None = None,
    license: str | None = None,
    tags: str | None = None,
    merged_from: str | None = None,
    timesteps: tuple[int, int] | None = None,
    custom_arch: str | None = None,
    is_lora: bool = True,
) -> dict[str, str]:
    """SAI model-spec keys as the reference writes them (`modelspec.architecture` = `<arch>/lora` for a LoRA)."""
    architecture = arch.modelspec_architecture + ("/lora" if is_lora else "")
    implementation = getattr(arch, "modelspec_implementation", None) or _IMPLEMENTATIONS.get(
        arch.modelspec_architecture, ""
    )
    spec: dict[str, str] = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": custom_arch or architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": title or f"{'LoRA' if is_lora else arch.name}@{timestamp}",
        "modelspec.resolution": _resolution(reso),
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
    }
    optional = {
        "author": author,
        "description": description,
        "license": license,
        "tags": tags,
        "merged_from": merged_from,
    }
    spec.update({f"modelspec.{k}": str(v) for k, v in optional.items() if v is not None})
    if timesteps is not None:
        spec["modelspec.timestep_range"] = f"{timesteps[0]},{timesteps[1]}"
    return spec


def _resolution(reso: int | str | tuple[int, int] | None) -> str:
    if reso is None:
        reso = (1280, 720)  # the reference's default: resolution lives in the dataset config
    if isinstance(reso, str):
        reso = tuple(int(v) for v in reso.split(","))
    if isinstance(reso, int):
        reso = (reso, reso)
    if len(reso) == 1:
        reso = (reso[0], reso[0])
    return f"{reso[0]}x{reso[1]}"


def safetensors_hashes(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[str, str]:
    """(`sshs_model_hash`, `sshs_legacy_hash`) as sd-webui additional-networks computes them.

    The file is serialised in memory with only the `ss_*` metadata (user metadata may change later); the model hash
    is the sha256 of everything after the header, the legacy hash the first 8 hex digits of the sha256 of the
    64 KiB at offset 1 MiB (empty for small files, as in the reference).
    """
    from safetensors.torch import save

    training_only = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    blob = save({k: v.contiguous() for k, v in tensors.items()}, training_only)
    header_len = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash
