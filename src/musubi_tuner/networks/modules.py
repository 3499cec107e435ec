"""`--network_module` names -> the modules that build a LoRA. One registry; unknown names list the choices."""

from __future__ import annotations

import importlib
from types import ModuleType

from musubi_tuner.errors import UserError

# Reference names (`networks.lora_wan`) -> our module. The `musubi_tuner.` prefix is accepted too.
_NETWORK_MODULES = {
    "networks.lora_wan": "musubi_tuner.networks.lora_wan",
    "networks.lora_flux": "musubi_tuner.networks.lora_flux",
    "networks.lora_framepack": "musubi_tuner.networks.lora_framepack",
    # the reference's generic module; its target classes exist only in HunyuanVideo
    "networks.lora": "musubi_tuner.networks.lora_hunyuan_video",
    # LoHa / LoKr for every architecture (no ARCHITECTURE: the caller passes arch=)
    "networks.loha": "musubi_tuner.networks.loha",
    "networks.lokr": "musubi_tuner.networks.lokr",
}
_NOT_YET = ("lycoris.kohya",)


def network_module_names() -> list[str]:
    return sorted(_NETWORK_MODULES)


def resolve_network_module(name: str) -> ModuleType:
    """The module for `--network_module name`: `create_network` / `create_network_from_weights`, and
    `ARCHITECTURE` when it serves one family only (otherwise they take `arch=`)."""
    key = name.strip()
    key = key.removeprefix("musubi_tuner.")
    if key in _NETWORK_MODULES:
        return importlib.import_module(_NETWORK_MODULES[key])
    why = "is not supported yet" if key in _NOT_YET else "is unknown"
    raise UserError(f"--network_module {name!r} {why}; choose one of: {', '.join(network_module_names())}")
