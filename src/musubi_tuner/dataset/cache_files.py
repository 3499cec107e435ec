"""Cache file names, tensor keys and I/O, interchangeable with the reference tool.

Names (W, H = ORIGINAL media size, `code` = architecture short code):
- latents: `{item_key}_{W:04d}x{H:04d}_{code}.safetensors`; a video item_key is
  `{stem}_{start:05d}-{count:03d}` (FramePack may add `-{section:04d}`).
- text encoder: `{stem}_{code}_te.safetensors` (one per media file).

Keys: "content" names from the architecture (`latents`, `latents_control`, `varlen_t5`, `llm_mask`)
become file keys `latents_{F}x{H}x{W}_{dtype}`, `varlen_t5_{dtype}`, `llm_mask` (no dtype for masks).
Reading strips them back to batch keys (`latents`, `t5`, `llm_mask`) and reports which were varlen.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from musubi_tuner.dataset.traits import DatasetTraits
from musubi_tuner.errors import UserError
from musubi_tuner.utils.atomic import save_safetensors_atomic

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1.0.1"
VARLEN_PREFIX = "varlen_"
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
_WINDOW_RE = re.compile(r"^\d{5}-\d{3}(-\d{4})?$")
_SHAPE_SUFFIX_RE = re.compile(r"_\d+x\d+(x\d+)?$")


# ---- names --------------------------------------------------------------------------------------


def video_item_key(stem: str, start: int, count: int) -> str:
    return f"{stem}_{start:05d}-{count:03d}"


def latent_cache_name(item_key: str, original_size: tuple[int, int], code: str) -> str:
    w, h = original_size
    return f"{item_key}_{w:04d}x{h:04d}_{code}.safetensors"


def text_cache_name(stem: str, code: str) -> str:
    return f"{stem}_{code}_te.safetensors"


def empty_caption_cache_name(code: str) -> str:
    """Text-encoder cache of the empty prompt that caption dropout trains on. Not `{stem}_{code}_te`, so no
    media stem can collide with it and the stale-cache sweep leaves it alone."""
    return f"{code}_empty_caption_te.safetensors"


def parse_text_cache_name(name: str, code: str) -> str | None:
    """The media stem of a text-encoder cache file name for `code`; None if it is not one."""
    suffix = f"_{code}_te.safetensors"
    if not name.endswith(suffix) or len(name) == len(suffix):
        return None
    return name[: -len(suffix)]


@dataclass(frozen=True)
class LatentCacheName:
    item_key: str
    """Everything before the size token (`clip_00000-025` for a video window)."""
    media_stem: str
    """The media file's stem: names its text-encoder cache."""
    original_size: tuple[int, int]
    window: str | None
    """`00000-025` for video items, None for images."""


def parse_latent_cache_name(name: str, code: str, *, video: bool) -> LatentCacheName | None:
    """Split a latent cache file name from the right; None if it is not one for `code`.

    Splitting from the right keeps underscores in media stems intact (reference issue #3).
    """
    suffix = f"_{code}.safetensors"
    if not name.endswith(suffix):
        return None
    body = name[: -len(suffix)]
    parts = body.rsplit("_", 1)
    if len(parts) != 2 or not _SIZE_RE.match(parts[1]):
        return None
    item_key, size = parts
    w, h = (int(x) for x in size.split("x"))
    if not video:
        return LatentCacheName(item_key, item_key, (w, h), None)
    stem_window = item_key.rsplit("_", 1)
    if len(stem_window) != 2 or not _WINDOW_RE.match(stem_window[1]):
        return None
    return LatentCacheName(item_key, stem_window[0], (w, h), stem_window[1])


# ---- keys ---------------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    """`bfloat16`, `float8_e4m3fn`, ... (torch's name without `torch.`)."""
    return str(dtype).removeprefix("torch.")


_DTYPE_NAMES = sorted(
    {dtype_name(d) for d in vars(torch).values() if isinstance(d, torch.dtype)}, key=len, reverse=True
)


def file_key(content_key: str, tensor: torch.Tensor) -> str:
    """Content name -> key in the safetensors file."""
    if content_key.endswith("_mask"):
        return content_key
    if content_key.startswith("latents"):
        if tensor.dim() == 3:  # (C, H, W): an image latent, one frame
            f, h, w = 1, tensor.shape[1], tensor.shape[2]
        elif tensor.dim() >= 4:
            f, h, w = tensor.shape[-3:]
        else:
            raise ValueError(f"{content_key}: latents must be (C,H,W) or (C,F,H,W), got shape {tuple(tensor.shape)}")
        return f"{content_key}_{f}x{h}x{w}_{dtype_name(tensor.dtype)}"
    return f"{content_key}_{dtype_name(tensor.dtype)}"


def batch_key(key: str) -> tuple[str, bool]:
    """File key -> (batch key, is_varlen): strip `varlen_`, the dtype and a latent's FxHxW."""
    varlen = key.startswith(VARLEN_PREFIX)
    name = key[len(VARLEN_PREFIX):] if varlen else key
    if name.endswith("_mask"):
        return name, varlen
    for dt in _DTYPE_NAMES:  # longest first: `float8_e4m3fn` contains `_`
        if name.endswith("_" + dt):
            name = name[: -len(dt) - 1]
            break
    if name.startswith("latents"):
        name = _SHAPE_SUFFIX_RE.sub("", name)
    return name, varlen


# ---- writing ------------------------------------------------------------------------------------


def latent_metadata(original_size: tuple[int, int], frame_count: int | None) -> dict[str, str]:
    """Metadata of a latent cache; frame_count only for video items, as the reference writes it."""
    meta = {"width": str(original_size[0]), "height": str(original_size[1])}
    if frame_count is not None:
        meta["frame_count"] = str(frame_count)
    return meta


def write_cache(
    path: str | Path,
    content: dict[str, torch.Tensor],
    traits: DatasetTraits,
    extra_metadata: dict[str, object],
    *,
    merge: bool | None = None,
) -> None:
    """Write one cache file atomically.

    content: content name -> tensor (see module doc). extra_metadata: `width/height/frame_count`
    (latents; see `latent_metadata`) or `caption1` (text); values are stored as strings, None
    values are left out. merge (default: True exactly when `caption1` is given, i.e. text caches):
    keys of an existing file that this write does not replace are kept, as the reference does when
    encoders are cached in separate passes.
    """
    path = Path(path)
    if merge is None:
        merge = "caption1" in extra_metadata
    tensors = {file_key(k, t): _finite(k, t.detach().cpu(), path) for k, t in content.items()}
    extra = {k: str(v) for k, v in extra_metadata.items() if v is not None}
    metadata = {"architecture": traits.architecture, **extra, "format_version": FORMAT_VERSION}
    if merge and path.exists():
        tensors, metadata = _merge_existing(path, tensors, metadata)
    save_safetensors_atomic(tensors, path, metadata=metadata)


def write_text_cache(path: str | Path, caption: str, content: dict[str, torch.Tensor], traits: DatasetTraits) -> None:
    write_cache(path, content, traits, {"caption1": caption})


def _finite(key: str, tensor: torch.Tensor, path: Path) -> torch.Tensor:
    if not tensor.is_floating_point():
        return tensor
    wide = tensor.float()  # isnan is not implemented for every dtype (fp8) on every device
    nan = torch.isnan(wide)
    if nan.any():
        logger.warning("%s: tensor %s has NaN values; they are replaced by 0", path.name, key)
        tensor = torch.where(nan, torch.zeros_like(wide), wide).to(tensor.dtype)
    return tensor


def _merge_existing(path: Path, tensors: dict, metadata: dict) -> tuple[dict, dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            old_meta = f.metadata() or {}
            old = {k: f.get_tensor(k) for k in f.keys() if k not in tensors}
    except Exception as exc:
        raise UserError(f"cannot read existing cache {path} to merge into it ({exc}); "
                        "delete it and cache again") from exc
    if old_meta.get("architecture", metadata["architecture"]) != metadata["architecture"]:
        raise UserError(f"{path} was written for architecture {old_meta.get('architecture')!r}, not "
                        f"{metadata['architecture']!r}; use a separate cache_directory per architecture or delete it")
    if "caption1" in old_meta and old_meta["caption1"] != metadata.get("caption1"):
        logger.warning("%s: caption changed since the last text caching; the new caption is stored", path.name)
    kept = {k: v for k, v in old_meta.items() if k not in ("caption1", "format_version")}
    return {**old, **tensors}, {**metadata, **kept}


# ---- reading ------------------------------------------------------------------------------------


def read_cache(path: str | Path) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Load a cache file -> ({batch key: tensor}, set of varlen batch keys)."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        raw = load_file(str(path))
    except Exception as exc:
        raise UserError(f"cannot read cache file {path} ({exc}); delete it and run the caching script again") from exc
    out: dict[str, torch.Tensor] = {}
    varlen: set[str] = set()
    for key, tensor in raw.items():
        name, is_varlen = batch_key(key)
        out[name] = tensor
        if is_varlen:
            varlen.add(name)
    return out, varlen


def read_cache_shapes(path: str | Path) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Header only: {batch key: (shape, is_varlen)} without loading tensor data."""
    from safetensors import safe_open

    shapes = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            name, is_varlen = batch_key(key)
            shapes[name] = (tuple(f.get_slice(key).get_shape()), is_varlen)
    return shapes


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
