"""`--network_module networks.lora_framepack`: LoRA for FramePack (the reference's target blocks and names,
`lora_unet_transformer_blocks_0_attn_to_q`; targets from `FramePackArchitecture.lora_candidates`)."""

from musubi_tuner.networks.lora import architecture_entry_points

ARCHITECTURE = "framepack"

create_network, create_network_from_weights = architecture_entry_points(ARCHITECTURE)
