"""--blocks_to_swap N: keep the weights of the last N transformer blocks in CPU memory and bring each block's
weights to the GPU only while it runs.

The blocks are the diffusers class's own repeated blocks (`_repeated_blocks`: `WanTransformerBlock`,
`FluxTransformerBlock` + `FluxSingleTransformerBlock` ...), so every architecture gets it without code of its
own. A forward pre-hook copies the block's parameters and buffers to the compute device (from pinned memory,
non-blocking); a forward hook points them back at the CPU copies. The base weights are frozen, so swapping
`.data` is safe; LoRA weights live in the network, on the GPU, and are not touched.

In training, pair it with `--gradient_checkpointing`: the checkpointed recompute runs the hooks again, so only a
few blocks' weights are on the GPU at once. The forward must run inside `full_recompute()`: by default PyTorch's
non-reentrant checkpoint stops the recompute as soon as it has the tensors backward needs, before the block's
forward hook, which would leave the block's GPU copy in place. Without checkpointing autograd keeps each block's
GPU weights alive until its backward, which is correct but saves little. Transfers run on the compute stream (not yet overlapped
with compute): block swap trades speed for memory.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from musubi_tuner.errors import UserError

logger = logging.getLogger(__name__)


def full_recompute():
    """Context for the training forward with block swap: checkpoints created inside recompute the whole block, so
    the forward hook that returns the weights to the CPU runs during backward too."""
    from torch.utils.checkpoint import set_checkpoint_early_stop

    return set_checkpoint_early_stop(False)


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks in execution order, from the class's `_repeated_blocks` names."""
    names = set(getattr(type(model), "_repeated_blocks", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


class SwappedBlock:
    """Hooks that stage one block's tensors on `device` for the duration of its forward."""

    def __init__(self, block: nn.Module, device: torch.device):
        self.device = device
        pin = device.type == "cuda"
        self.tensors = [t for t in list(block.parameters()) + list(block.buffers())]
        self.cpu_copies = []
        for t in self.tensors:
            cpu = t.data.to("cpu")
            self.cpu_copies.append(cpu.pin_memory() if pin else cpu)
            t.data = self.cpu_copies[-1]
        self.handles = [block.register_forward_pre_hook(self.to_device), block.register_forward_hook(self.to_cpu)]

    def to_device(self, module: nn.Module, args) -> None:
        for t, cpu in zip(self.tensors, self.cpu_copies):
            t.data = cpu.to(self.device, non_blocking=True)

    def to_cpu(self, module: nn.Module, args, output) -> None:
        for t, cpu in zip(self.tensors, self.cpu_copies):
            t.data = cpu

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def enable_block_swap(model: nn.Module, blocks_to_swap: int, device: torch.device) -> list[SwappedBlock]:
    """Move `model` to `device` except the last `blocks_to_swap` blocks, which stay in (pinned) CPU memory."""
    blocks = repeated_blocks(model)
    if not blocks:
        raise UserError(f"--blocks_to_swap: {type(model).__name__} declares no repeated blocks to swap")
    if not 0 < blocks_to_swap < len(blocks):
        raise UserError(f"--blocks_to_swap {blocks_to_swap}: this model has {len(blocks)} blocks; "
                        f"use 1 to {len(blocks) - 1}")
    swapped = blocks[-blocks_to_swap:]
    resident = {id(t) for b in swapped for t in list(b.parameters()) + list(b.buffers())}
    for module in model.modules():  # everything else goes to the compute device
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if id(t) not in resident:
                t.data = t.data.to(device)
    handles = [SwappedBlock(block, device) for block in swapped]
    logger.info("block swap: %d of %d blocks kept in CPU memory", blocks_to_swap, len(blocks))
    return handles
