"""`--network_module networks.lora_wan`: LoRA for Wan2.1 (names as in the reference's Wan model)."""

from __future__ import annotations

from typing import Any

from torch import nn

from musubi_tuner.networks import lora

ARCHITECTURE = "wan"


def create_network(
    dit: nn.Module,
    network_dim: int | None,
    network_alpha: float | None,
    network_dropout: float | None = None,
    network_args: Any = None,
    multiplier: float = 1.0,
) -> lora.LoRANetwork:
    """`lora.create_network` for this architecture."""
    return lora.create_network(ARCHITECTURE, dit, network_dim, network_alpha, network_dropout, network_args, multiplier)


def create_network_from_weights(
    dit: nn.Module, weights_sd: dict, multiplier: float = 1.0, **kwargs: Any
) -> lora.LoRANetwork:
    """`lora.create_network_from_weights` for this architecture."""
    return lora.create_network_from_weights(ARCHITECTURE, dit, weights_sd, multiplier, **kwargs)
