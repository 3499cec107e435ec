"""FramePack (HunyuanVideo packed, I2V with history latents): model files, forward, LoRA names."""
