"""Helpers shared by the FLUX and HunyuanVideo tests (fused original layers, real-width checks)."""

from __future__ import annotations

import torch

from musubi_tuner.networks.lora_formats import NameIndex, parse_lora_state_dict


def reference_lora(targets, rank: int = 4, alpha: float | None = 2.0, seed: int = 1) -> dict[str, torch.Tensor]:
    """A LoRA in the reference tool's layout: one module per (fused) original layer."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for t in targets:
        sd[f"{t.lora_name}.lora_down.weight"] = torch.randn(rank, t.in_features, generator=gen)
        sd[f"{t.lora_name}.lora_up.weight"] = torch.randn(t.out_features, rank, generator=gen)
        sd[f"{t.lora_name}.alpha"] = torch.tensor(float(rank if alpha is None else alpha))
    return sd


def assert_fused_lora_matches_original_layer(arch, dit, original_name: str, original_sd: dict[str, torch.Tensor],
                                            rank: int) -> None:
    """The LoRA on the split diffusers layers (shared down, split up) computes exactly what one LoRA of the reference
    layout computes on the fused ORIGINAL layer `original_name` (weights from `original_sd`)."""
    from musubi_tuner.networks.lora import create_network_from_weights

    targets = [t for t in arch.lora_candidates(dit) if t.original_name == original_name]
    sd = reference_lora(targets, rank=rank)
    network = create_network_from_weights(arch, dit, sd)
    network.load_weights(sd)
    network.apply_to()
    try:
        x = torch.randn(3, targets[0].in_features)
        ours = torch.cat([p.module(x) for p in targets[0].parts], dim=-1)
    finally:
        network.remove()
    stem = targets[0].lora_name
    down, up = sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"]
    fused = x @ original_sd[f"{original_name}.weight"].T + original_sd[f"{original_name}.bias"]
    expected = fused + (x @ down.T @ up.T) * (2.0 / rank)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def deltas(sd: dict[str, torch.Tensor], targets) -> dict[str, torch.Tensor]:
    canonical, unmatched = parse_lora_state_dict(sd, NameIndex(targets=targets))
    assert not unmatched
    return {name: w.delta() for name, w in canonical.items()}


def probes(sd: dict[str, torch.Tensor], targets) -> dict[str, torch.Tensor]:
    """delta @ v for a fixed random v per layer: compares real-width LoRAs without building the deltas."""
    canonical, unmatched = parse_lora_state_dict(sd, NameIndex(targets=targets))
    assert not unmatched
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, w in sorted(canonical.items()):
        v = torch.randn(w.down.shape[1], generator=gen)
        out[name] = w.up.float() @ (w.down.float() @ v) * w.scale
    return out


def row_coded(shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Tensor i = i * 1e5 + row index, broadcast over the other dims (tiny memory at full width).

    Key converters only move whole rows, so equal row codes mean equal tensors."""
    out = {}
    for i, (key, shape) in enumerate(sorted(shapes.items())):
        rows = torch.arange(shape[0], dtype=torch.float64) + i * 100_000
        out[key] = rows.reshape(-1, *([1] * (len(shape) - 1))).expand(shape)
    return out
