"""FLUX.1 Kontext [dev] as an architecture module.

Networks are diffusers' `FluxTransformer2DModel` / `AutoencoderKL` and transformers' `T5EncoderModel` /
`CLIPTextModel`; this package only knows how to load them from the files users have (BFL / ComfyUI
layouts), what goes in the caches, how a batch with its control image becomes DiT inputs, and the BFL
layer names LoRA files use.
"""

from musubi_tuner.architectures.flux_kontext.architecture import FluxKontextArchitecture

__all__ = ["FluxKontextArchitecture"]
