"""`--network_module networks.lora_flux`: LoRA for FLUX.1 Kontext (names as in the BFL checkpoint)."""

from musubi_tuner.networks.lora import architecture_entry_points

ARCHITECTURE = "flux_kontext"

create_network, create_network_from_weights = architecture_entry_points(ARCHITECTURE)
