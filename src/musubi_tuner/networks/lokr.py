"""`--network_module networks.lokr`: LoKr (Kronecker-product adapter) for any architecture, on LoRA's layers."""

from musubi_tuner.networks.lycoris import LoKrNetwork, entry_points

create_network, create_network_from_weights = entry_points(LoKrNetwork)
