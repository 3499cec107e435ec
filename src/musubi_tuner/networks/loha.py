"""`--network_module networks.loha`: LoHa (Hadamard-product adapter) for any architecture, on LoRA's layers."""

from musubi_tuner.networks.lycoris import LoHaNetwork, entry_points

create_network, create_network_from_weights = entry_points(LoHaNetwork)
