"""HunyuanVideo (T2V, SkyReels V1 I2V) as an architecture module.

Networks are diffusers' `HunyuanVideoTransformer3DModel` / `AutoencoderKLHunyuanVideo`; this package knows how
to load the DiT from the files users have, the official layer names LoRA files use, and the latent format. The
VAE lives in `models/hunyuan_video/` because FramePack shares it.
"""

from musubi_tuner.architectures.hunyuan_video.architecture import HunyuanVideoArchitecture

__all__ = ["HunyuanVideoArchitecture"]
