"""FramePack / FramePack-F1 (and one-frame training) as an architecture module.

The DiT is diffusers' `HunyuanVideoFramepackTransformer3DModel`; the VAE and text encoders are HunyuanVideo's
(`models/hunyuan_video/`), the image encoder SigLIP (`models/siglip_files.py`). `cache_sections.py` cuts clips
into the reference's per-section training caches.
"""

from musubi_tuner.architectures.framepack.architecture import FramePackArchitecture

__all__ = ["FramePackArchitecture"]
