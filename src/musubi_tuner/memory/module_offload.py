"""Keep a few frozen modules of the DiT in CPU memory and give them device weights only for their own forward.

Used by `--img_in_txt_in_offloading` (HunyuanVideo's patch embedder `img_in` and text refiner `txt_in`, which run
once per step, before the blocks; the architecture names them through `Architecture.offloaded_input_modules`).
The reference moves the modules to the GPU before they run and back to the CPU after; here the CPU copy is the
master and the device copy is simply dropped after the forward (the weights are frozen, so nothing has to be copied
back). The copies go through the block-swap transfer engine interface (`start` / `ready` / `finish`), so tests can
record them and a CPU run is exact.

No backward ever runs through these modules: their inputs (noisy latents, text embeddings) need no gradient and
LoRA does not target them, so autograd keeps nothing that points at the dropped device weights.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from musubi_tuner.memory.block_swap import SwappedBlock, SyncEngine

logger = logging.getLogger(__name__)


class ModuleOffload:
    """Forward hooks that bring each module's weights to the device around its forward, one module at a time."""

    def __init__(self, modules: list[nn.Module], engine):
        self.engine = engine
        self.slots = [_cpu_master(i, module) for i, module in enumerate(modules)]
        self.handles = []
        for slot in self.slots:
            self.handles.append(slot.block.register_forward_pre_hook(lambda m, a, s=slot: self._before(s)))
            self.handles.append(slot.block.register_forward_hook(lambda m, a, o, s=slot: self._after(s)))

    def _before(self, slot: SwappedBlock) -> None:
        self.engine.start(slot)
        slot.point_at(self.engine.ready(slot))

    def _after(self, slot: SwappedBlock) -> None:
        slot.point_at(slot.masters)
        self.engine.finish(slot)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _cpu_master(index: int, module: nn.Module) -> SwappedBlock:
    """Point the module's tensors at CPU copies (freeing a device copy, if it was placed already)."""
    tensors = list(module.parameters()) + list(module.buffers())
    masters = []
    for t in tensors:
        masters.append(t.data.to("cpu"))
        t.data = masters[-1]
    return SwappedBlock(index, module, tensors, masters)


def offload_modules(modules: list[nn.Module], device: torch.device, engine=None) -> ModuleOffload:
    """Keep `modules` in CPU memory and move their weights to `device` only while each runs. Call it after the DiT
    is placed on the device. `engine` overrides the transfer engine (tests); the default copies on the compute
    stream, in program order (the modules are small and run once per step, so there is nothing to overlap)."""
    offload = ModuleOffload(modules, engine or SyncEngine(device))
    size = sum(m.numel() * m.element_size() for s in offload.slots for m in s.masters)
    logger.info("%d module(s) (%.1f MiB) kept in CPU memory, moved to %s for their forward only",
                len(modules), size / 2**20, device)
    return offload


def offload_input_modules(arch, dit: nn.Module, device: torch.device) -> ModuleOffload | None:
    """--img_in_txt_in_offloading: offload the modules the architecture names; a family with none gets a warning
    (the reference accepts the flag for every family and only HunyuanVideo acts on it)."""
    modules = arch.offloaded_input_modules(dit)
    if not modules:
        logger.warning("--img_in_txt_in_offloading has no effect for %s (only HunyuanVideo has img_in/txt_in)",
                       arch.name)
        return None
    return offload_modules(modules, device)
