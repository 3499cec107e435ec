"""Registry of model families. One place names them all; unknown names list the choices."""

from __future__ import annotations

import importlib

from musubi_tuner.architectures.base import Architecture

_REGISTRY: dict[str, str] = {
    "wan": "musubi_tuner.architectures.wan:WanArchitecture",
    "flux_kontext": "musubi_tuner.architectures.flux_kontext:FluxKontextArchitecture",
    "hunyuan_video": "musubi_tuner.architectures.hunyuan_video:HunyuanVideoArchitecture",
    "framepack": "musubi_tuner.architectures.framepack:FramePackArchitecture",
}


def architecture_names() -> list[str]:
    return sorted(_REGISTRY)


def get_architecture(name: str) -> Architecture:
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; choose one of: {', '.join(architecture_names())}")
    module_name, class_name = _REGISTRY[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls()
