"""`--network_module networks.lora_wan`: LoRA for Wan2.1 (names as in the reference's Wan model)."""

from musubi_tuner.networks.lora import architecture_entry_points

ARCHITECTURE = "wan"

create_network, create_network_from_weights = architecture_entry_points(ARCHITECTURE)
