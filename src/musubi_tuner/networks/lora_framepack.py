"""`--network_module networks.lora_framepack`: LoRA for FramePack (diffusers module names, as the reference's
packed model: `lora_unet_transformer_blocks_0_attn_to_q`). Targets and default excludes:
`architectures/framepack/lora_conversion.py`; other LoRA layouts: `framepack_lora_from_any` there."""

from musubi_tuner.networks.lora import architecture_entry_points

ARCHITECTURE = "framepack"

create_network, create_network_from_weights = architecture_entry_points(ARCHITECTURE)
