"""LoRA networks: modules, injection into diffusers models by original names, file formats."""
