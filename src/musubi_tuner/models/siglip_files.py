"""SigLIP image encoder files (FramePack's image conditioning): the ComfyUI single file, the Redux
`image_encoder/model.safetensors`, or an `image_encoder` folder -> transformers' `SiglipVisionModel`."""

from __future__ import annotations

TINY_SIGLIP_HIDDEN = 32
"""Hidden size of the tiny SigLIP test encoder = the tiny FramePack DiT's `image_proj_dim`."""
