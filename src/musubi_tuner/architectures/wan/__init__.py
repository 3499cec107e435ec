"""Wan2.1 (T2V, I2V, FLF2V, T2I) as an architecture module.

Networks are diffusers' `WanTransformer3DModel` / `AutoencoderKLWan` and transformers' `UMT5EncoderModel` /
`CLIPVisionModel`; this module only knows how to load them from the files users have, what goes in the
caches, how a batch becomes DiT inputs, and the original layer names LoRA files use.
"""

from musubi_tuner.architectures.wan.architecture import WanArchitecture

__all__ = ["WanArchitecture"]
