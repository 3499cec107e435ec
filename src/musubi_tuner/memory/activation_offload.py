"""--gradient_checkpointing_cpu_offload: the inputs each checkpointed block keeps for its backward recompute live in
CPU memory instead of on the GPU.

With plain checkpointing, every block's input (the hidden states, B x L x C) stays on the GPU until the backward
reaches it, which for long videos is most of the activation memory that remains. Here the checkpoint holds a CPU
copy; the block's own forward (and its recompute in backward) moves it back, and the gradient flows back through
both moves. Used as diffusers' `gradient_checkpointing_func`, so every architecture's blocks get it.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

OFFLOAD_DEVICE = torch.device("cpu")


def checkpoint_with_cpu_offload(block, *args):
    """Run `block(*args)` under non-reentrant checkpointing, keeping its tensor inputs in CPU memory meanwhile.
    Non-tensor arguments (e.g. a tuple of rotary tables shared by every block) are passed through unchanged."""
    homes = [a.device if torch.is_tensor(a) else None for a in args]

    def run_on_device(*held):
        return block(*[h if home is None else h.to(home) for h, home in zip(held, homes)])

    held = [a.to(OFFLOAD_DEVICE) if torch.is_tensor(a) else a for a in args]  # differentiable copies
    return checkpoint(run_on_device, *held, use_reentrant=False)
