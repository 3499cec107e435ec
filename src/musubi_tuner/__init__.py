"""musubi-tuner: LoRA training and inference for video/image diffusion models."""

__version__ = "0.1.0"
