"""The DiTs the benchmarks measure, one entry per family: published widths, random bf16 weights written in the
original single-file layout (the files users have), and the family's own loader to read them back.

`bench_load_memory.py` measures loading them; `bench_train_overhead.py --arch` runs its bare LoRA step on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from _bench_util import stopwatch

WAN_TASK = "t2v-1.3B"
HV_RELEASED_BLOCKS = (20, 40)
"""HunyuanVideo T2V: 20 double-stream + 40 single-stream blocks (the ~13B model)."""


def hv_config(double_blocks: int, single_blocks: int) -> dict[str, Any]:
    """HunyuanVideo T2V at its published widths (3072 = 24 heads x 128, MLP x4, LLM 4096, CLIP pooled 768, 16
    latent channels, guidance embedding, 2 refiner blocks) with any number of blocks."""
    return {
        "in_channels": 16, "out_channels": 16, "num_attention_heads": 24, "attention_head_dim": 128,
        "num_layers": double_blocks, "num_single_layers": single_blocks, "num_refiner_layers": 2, "mlp_ratio": 4.0,
        "patch_size": 2, "patch_size_t": 1, "qk_norm": "rms_norm", "guidance_embeds": True,
        "text_embed_dim": 4096, "pooled_projection_dim": 768, "rope_theta": 256.0, "rope_axes_dim": (16, 56, 56),
    }


@dataclass(frozen=True)
class BenchDiT:
    arch: str
    """Registry name: where `fp8_targets` and the LoRA targets come from."""
    title: str
    file_name: str
    original_shapes: Callable[[], dict[str, tuple[int, ...]]]
    """Original-layout key -> shape, without the file's prefix."""
    load: Callable[..., Any]
    """(path, device=..., dtype=...) -> frozen diffusers DiT."""
    key_prefix: str = ""
    released_meta_model: Callable[[], Any] | None = None
    """The released model on the meta device (shapes only) when this one has fewer blocks (None: this is it)."""


def _wan_shapes() -> dict[str, tuple[int, ...]]:
    from musubi_tuner.architectures.wan.dit_files import build_empty_wan_dit, get_wan_task, wan_dit_to_original

    empty = build_empty_wan_dit(get_wan_task(WAN_TASK).diffusers_config())
    return {k: tuple(v.shape) for k, v in wan_dit_to_original(empty.state_dict()).items()}


def _load_wan(path: Path, **kwargs: Any):
    from musubi_tuner.architectures.wan.dit_files import load_wan_dit

    return load_wan_dit(path, task=WAN_TASK, **kwargs)


def _hv_meta_model(double_blocks: int, single_blocks: int):
    from musubi_tuner.architectures.hunyuan_video.dit_files import build_empty_hv_dit

    return build_empty_hv_dit(hv_config(double_blocks, single_blocks))


def _hv_shapes(double_blocks: int, single_blocks: int) -> dict[str, tuple[int, ...]]:
    from musubi_tuner.architectures.hunyuan_video.dit_files import hv_diffusers_to_original

    meta = _hv_meta_model(double_blocks, single_blocks).state_dict()
    return {k: tuple(v.shape) for k, v in hv_diffusers_to_original(meta).items()}


def _load_hv(path: Path, **kwargs: Any):
    from musubi_tuner.architectures.hunyuan_video.dit_files import load_hv_dit

    return load_hv_dit(path, **kwargs)


def _framepack_meta_model(double_blocks: int, single_blocks: int):
    from musubi_tuner.architectures.framepack.dit_files import build_empty_framepack_dit

    # FramePackI2V_HY: HunyuanVideo's widths plus the SigLIP projection (1152) and the history embedder
    return build_empty_framepack_dit({**hv_config(double_blocks, single_blocks), "has_image_proj": True,
                                      "image_proj_dim": 1152, "has_clean_x_embedder": True})


def _framepack_shapes(double_blocks: int, single_blocks: int) -> dict[str, tuple[int, ...]]:
    # the released shards hold diffusers' own names
    return {k: tuple(v.shape) for k, v in _framepack_meta_model(double_blocks, single_blocks).state_dict().items()}


def _load_framepack(path: Path, **kwargs: Any):
    from musubi_tuner.architectures.framepack.dit_files import load_framepack_dit

    return load_framepack_dit(path, **kwargs)


def bench_dit(arch: str, blocks: tuple[int, int] | None = None) -> BenchDiT:
    """The benchmark DiT of `arch`; `blocks` = (double, single) for HunyuanVideo and FramePack (widths stay the
    released ones)."""
    if arch == "wan":
        return BenchDiT("wan", f"Wan2.1 {WAN_TASK}-shaped DiT", "wan2.1_t2v_1.3B_random_bf16.safetensors",
                        _wan_shapes, _load_wan)
    if arch == "hunyuan_video":
        double, single = blocks or (4, 8)
        return BenchDiT(
            "hunyuan_video", f"HunyuanVideo DiT, released widths, {double} double + {single} single blocks",
            f"hunyuan_video_{double}d{single}s_random_bf16.safetensors", lambda: _hv_shapes(double, single), _load_hv,
            # ComfyUI's repackaged file (hunyuan_video_t2v_720p_bf16.safetensors) keeps this prefix
            key_prefix="model.diffusion_model.",
            released_meta_model=lambda: _hv_meta_model(*HV_RELEASED_BLOCKS),
        )
    if arch == "framepack":
        double, single = blocks or (4, 8)
        return BenchDiT(
            "framepack", f"FramePack DiT, released widths, {double} double + {single} single blocks",
            f"framepack_{double}d{single}s_random_bf16.safetensors", lambda: _framepack_shapes(double, single),
            _load_framepack, released_meta_model=lambda: _framepack_meta_model(*HV_RELEASED_BLOCKS),
        )
    raise ValueError(f"unknown benchmark architecture {arch!r}; choose wan, hunyuan_video or framepack")


def write_random_checkpoint(shapes: Mapping[str, tuple[int, ...]], path: Path, *, prefix: str = "",
                            seed: int = 0) -> float:
    """Random bf16 weights (std 0.02) under the given original names, written atomically; returns seconds."""
    import torch

    from musubi_tuner.utils.atomic import save_safetensors_atomic

    with stopwatch() as elapsed:
        generator = torch.Generator().manual_seed(seed)
        state = {}
        for key, shape in shapes.items():
            # small values: the fp8 cast must not clamp everything, and norms near 1 keep outputs finite
            tensor = torch.randn(shape, generator=generator, dtype=torch.float32).mul_(0.02)
            state[prefix + key] = tensor.to(torch.bfloat16)
        save_safetensors_atomic(state, path, metadata={"format": "pt", "note": "random weights for benchmarks"})
    return elapsed[0]
