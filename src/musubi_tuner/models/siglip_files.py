"""SigLIP image encoder files (FramePack's image conditioning) -> transformers' `SiglipVisionModel`, offline.

Users pass ComfyUI's `sigclip_vision_patch14_384.safetensors` (Comfy-Org/sigclip_vision_384), the FLUX Redux
`image_encoder/model.safetensors` (lllyasviel/flux_redux_bfl), that `image_encoder` folder (config.json + weights)
or the folder above it. Both files hold transformers' own `vision_model.*` names (the reference loads them
strictly into `SiglipVisionModel` with older transformers; transformers 5 dropped the `vision_model` wrapper, so
names are mapped to whichever the installed class uses); every size is read from the weights. The head count is not stored: SigLIP
so400m's heads are 72 wide (1152 = 16 x 72), so a single file gets hidden / 72 heads; a folder's config.json wins.

`encode_siglip_images` preprocesses as the reference's `SiglipImageProcessor` (bicubic resize to the model's
square input, x/255, then (x - 0.5) / 0.5) and returns `last_hidden_state`, the FramePack DiT's `image_embeddings`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from musubi_tuner.errors import CheckpointError, UserError
from musubi_tuner.models.checkpoint_io import count_numbered, load_state_dict
from musubi_tuner.models.file_kinds import describe_checkpoint, sample_keys
from musubi_tuner.models.hf_folder import read_model_folder
from musubi_tuner.models.meta_loading import assign_weights

__all__ = ["load_siglip_image_encoder", "encode_siglip_images", "preprocess_siglip_images", "save_tiny_siglip",
           "tiny_siglip", "infer_siglip_config", "TINY_SIGLIP_HIDDEN"]

FLAG = "--image_encoder"
HINT = ("--image_encoder expects SigLIP: sigclip_vision_patch14_384.safetensors (Comfy-Org/sigclip_vision_384), "
        "flux_redux_bfl's image_encoder/model.safetensors, or that image_encoder folder")
HEAD_WIDTH = 72
INPUT_SIZES = {(27, 14): 384}
"""(patch grid side, patch size) -> input pixels, where they differ from side x patch: so400m-patch14-384 sees 384 px
(27 patches of 14; the stride drops the last 6), a size the weights do not hold."""
FILE_PREFIX = "vision_model."
"""Every key of the released files starts with this."""
_PATCH = "vision_model.embeddings.patch_embedding.weight"
_POSITIONS = "vision_model.embeddings.position_embedding.weight"

TINY_SIGLIP_HIDDEN = 144
"""Hidden size of the tiny SigLIP test encoder (2 heads of 72) = the tiny FramePack DiT's `image_proj_dim`."""
TINY_SIGLIP_CONFIG = {"hidden_size": TINY_SIGLIP_HIDDEN, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": TINY_SIGLIP_HIDDEN // HEAD_WIDTH, "num_channels": 3, "image_size": 28,
                      "patch_size": 14, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
                      "attention_dropout": 0.0, "vision_use_head": True}


# ---- config and loading -----------------------------------------------------------------------------------
def infer_siglip_config(shapes: dict, *, source: str = "the checkpoint", flag: str = FLAG) -> dict:
    """`SiglipVisionConfig` arguments from a `SiglipVisionModel` state dict (tensors or shape tuples; with or
    without the files' `vision_model.` prefix)."""
    given = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in shapes.items()}
    shape = _with_file_prefix(given)
    if _PATCH not in shape or _POSITIONS not in shape:
        kind = describe_checkpoint(given) or f"not a SigLIP vision encoder (first keys: {sample_keys(given)})"
        raise CheckpointError(f"{flag} {source} is {kind}; {HINT}")
    hidden, channels, patch, _ = shape[_PATCH]
    side = round(shape[_POSITIONS][0] ** 0.5)
    if side * side != shape[_POSITIONS][0] or hidden % HEAD_WIDTH:
        raise CheckpointError(f"{flag} {source}: {shape[_POSITIONS][0]} positions / width {hidden} are not a "
                              f"SigLIP so400m-style encoder (square grid, {HEAD_WIDTH}-wide heads); {HINT}")
    return {"hidden_size": int(hidden), "num_channels": int(channels), "patch_size": int(patch),
            "image_size": INPUT_SIZES.get((side, int(patch)), int(side * patch)),
            "intermediate_size": int(shape["vision_model.encoder.layers.0.mlp.fc1.weight"][0]),
            "num_hidden_layers": count_numbered(shape, r"vision_model\.encoder\.layers\.(\d+)\."),
            "num_attention_heads": int(hidden // HEAD_WIDTH), "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6, "attention_dropout": 0.0,
            "vision_use_head": any(k.startswith("vision_model.head.") for k in shape)}


def _with_file_prefix(state: dict) -> dict:
    """Keys as the released files name them (`vision_model.` prefix), whichever way they came."""
    if any(k.startswith(FILE_PREFIX) for k in state):
        return dict(state)
    return {FILE_PREFIX + k: v for k, v in state.items()}


def _as_model_names(state: dict, model: nn.Module) -> dict:
    """File-named `state` renamed to `model`'s own parameter names."""
    if any(k.startswith(FILE_PREFIX) for k in model.state_dict()):
        return state
    return {k[len(FILE_PREFIX):] if k.startswith(FILE_PREFIX) else k: v for k, v in state.items()}


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json or {}, state dict) of a file, an image_encoder folder, or the folder above one."""
    if path.is_dir():
        folder = path / "image_encoder" if (path / "image_encoder").is_dir() else path
        return read_model_folder(folder, FLAG)
    return {}, load_state_dict(path, device="cpu", flag=FLAG)


def load_siglip_image_encoder(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                              dtype: torch.dtype | None = None) -> nn.Module:
    """A frozen, eval-mode `SiglipVisionModel` from any of the layouts in the module docstring (no network)."""
    from accelerate import init_empty_weights
    from transformers import SiglipVisionConfig, SiglipVisionModel

    path = Path(path)
    if not path.exists():
        raise UserError(f"{FLAG} {path}: no such file or folder; {HINT}")
    folder_config, state = _read(path)
    config = infer_siglip_config(state, source=str(path))
    if folder_config.get("num_attention_heads"):  # the one size the weights do not hold
        config["num_attention_heads"] = int(folder_config["num_attention_heads"])
    with init_empty_weights():
        model = SiglipVisionModel(SiglipVisionConfig(**config))
    assign_weights(model, _as_model_names(_with_file_prefix(state), model), dtype=dtype, device=device, source=str(path), flag=FLAG, what="SigLIP image encoder")
    model.to(device)  # buffers (position ids) were built on the CPU
    return model.eval().requires_grad_(False)


# ---- encoding ---------------------------------------------------------------------------------------------
def preprocess_siglip_images(images: list[np.ndarray], size: int) -> torch.Tensor:
    """(B, 3, size, size) float32 in [-1, 1]: PIL bicubic resize of each HxWx3 uint8 image, x/255, (x-0.5)/0.5."""
    from PIL import Image

    batch = []
    for i, image in enumerate(images):
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
            got = getattr(image, "shape", type(image).__name__)
            raise ValueError(f"encode_siglip_images: image {i} must be an HxWx3 uint8 array, got {got}")
        resized = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC), dtype=np.float32)
        batch.append(torch.from_numpy((resized / 255.0 - 0.5) / 0.5).permute(2, 0, 1))
    return torch.stack(batch)


@torch.no_grad()
def encode_siglip_images(encoder: nn.Module, images: list[np.ndarray]) -> torch.Tensor:
    """`last_hidden_state` (B, tokens, hidden) of `images` (HxWx3 uint8), in the encoder's dtype and device."""
    param = next(encoder.parameters())
    pixels = preprocess_siglip_images(images, encoder.config.image_size).to(param.device, param.dtype)
    return encoder(pixel_values=pixels).last_hidden_state


# ---- tiny test encoder ------------------------------------------------------------------------------------
def tiny_siglip(seed: int = 0) -> nn.Module:
    """A seeded tiny `SiglipVisionModel` (2 layers, 2 heads of 72, 28 px input = 2x2 patches of 14), eval mode."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SiglipVisionModel(SiglipVisionConfig(**TINY_SIGLIP_CONFIG))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def save_tiny_siglip(folder: str | os.PathLike, layout: str = "comfy", seed: int = 0) -> Path:
    """Save `tiny_siglip(seed)` with the released files' key names as `comfy` (one `sigclip_vision_tiny.safetensors`, returned) or `folder`
    (`image_encoder/config.json` + `model.safetensors`; the `image_encoder` folder is returned)."""
    from musubi_tuner.models.checkpoint_io import save_state_dict
    from musubi_tuner.utils.atomic import write_text_atomic

    model = tiny_siglip(seed)
    state = _with_file_prefix({k: v.detach().contiguous() for k, v in model.state_dict().items()})
    folder = Path(folder)
    if layout == "comfy":
        folder.mkdir(parents=True, exist_ok=True)
        save_state_dict(state, folder / "sigclip_vision_tiny.safetensors")
        return folder / "sigclip_vision_tiny.safetensors"
    if layout != "folder":
        raise ValueError(f"unknown layout {layout!r}; use comfy or folder")
    target = folder / "image_encoder"
    target.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model", **TINY_SIGLIP_CONFIG}
    write_text_atomic(target / "config.json", json.dumps(config, indent=2))
    save_state_dict(state, target / "model.safetensors")
    return target
