"""--blocks_to_swap N: keep the weights of the last N transformer blocks in CPU memory and bring each block's
weights to the GPU only around its forward, copying the next block while the current one computes.

The blocks are the diffusers class's own repeated blocks (`_repeated_blocks`: `WanTransformerBlock`,
`FluxTransformerBlock` + `FluxSingleTransformerBlock` ...), so every architecture gets it without code of its own.
The base weights are frozen, so the CPU copy is the master and nothing is ever copied back (the reference's
D2H half of a swap never happens here); LoRA weights live in the network, on the GPU, and are not touched.

Two parts with one job each:
- `BlockSwapScheduler` decides WHEN: a forward pre-hook makes block k's weights ready and starts copying the block
  that runs next (k+1 in a forward; k-1 in a checkpointed backward, whose recompute runs the blocks in reverse;
  the first swapped block after the last one in generation, for the next step); a forward hook releases block k.
  At most `ring_size` swapped blocks are resident or in flight at once.
- A transfer engine does the copies: `SyncEngine` (CPU, or any device: copies in program order) and
  `CudaStreamEngine` (a side CUDA stream from pinned memory, with events so the compute stream waits only for the
  block it needs and a buffer is refilled only after the compute stream is done with it).

In training, pair it with `--gradient_checkpointing`: the checkpointed recompute runs the hooks again, so only a
few blocks' weights are on the GPU at once. The forward must run inside `full_recompute()`: by default PyTorch's
non-reentrant checkpoint stops the recompute as soon as it has the tensors backward needs, before the block's
forward hook. Without checkpointing autograd keeps each block's GPU weights alive until its backward, which is
correct but saves little.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from musubi_tuner.errors import UserError

logger = logging.getLogger(__name__)

_ALIGN = 256  # bytes; every tensor view in a flat ring buffer starts on this boundary


def full_recompute():
    """Context for the training forward with block swap: checkpoints created inside recompute the whole block, so
    the forward hook that releases the weights runs during backward too."""
    from torch.utils.checkpoint import set_checkpoint_early_stop

    return set_checkpoint_early_stop(False)


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks in execution order, from the `_repeated_blocks` names (the class's, unless a
    loader set them on the instance: diffusers' FramePack class declares none)."""
    names = set(getattr(model, "_repeated_blocks", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


@dataclass
class SwappedBlock:
    """One swapped block: its parameters/buffers and their CPU master copies (index = order among swapped blocks)."""

    index: int
    block: nn.Module
    tensors: list[torch.Tensor]
    masters: list[torch.Tensor]
    offsets: list[int] = field(default_factory=list)  # byte offsets in a flat buffer, see `flat_layout`
    nbytes: int = 0

    def point_at(self, data: list[torch.Tensor]) -> None:
        for t, d in zip(self.tensors, data):
            t.data = d


def flat_layout(tensors: list[torch.Tensor]) -> tuple[list[int], int]:
    """Aligned byte offsets of `tensors` packed in one buffer, and the buffer's size."""
    offsets, end = [], 0
    for t in tensors:
        offsets.append(end)
        end += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    return offsets, end


def views_in(buffer: torch.Tensor, slot: SwappedBlock) -> list[torch.Tensor]:
    """`slot`'s tensors as views of a flat uint8 `buffer` (same dtypes and shapes as the masters)."""
    return [buffer[o:o + m.numel() * m.element_size()].view(m.dtype).view(m.shape)
            for o, m in zip(slot.offsets, slot.masters)]


class SyncEngine:
    """Copies in program order on the compute stream (CPU, or a device without streams): no overlap, exact."""

    def __init__(self, device: torch.device):
        self.device = device
        self.copies: dict[int, list[torch.Tensor]] = {}

    def start(self, slot: SwappedBlock) -> None:
        self.copies[slot.index] = [m.to(self.device) for m in slot.masters]

    def ready(self, slot: SwappedBlock) -> list[torch.Tensor]:
        return self.copies[slot.index]

    def finish(self, slot: SwappedBlock) -> None:
        self.copies.pop(slot.index, None)


class CudaStreamEngine:
    """H2D copies on a side CUDA stream (not measured on a GPU yet; correct by construction, see the docs).

    reuse_buffers (--block_swap_h2d_only): copies go into a ring of preallocated device buffers, one per resident
    block; otherwise each copy gets fresh device memory that the caching allocator recycles once the compute stream
    is done with it (`record_stream`). pinned_masters (--use_pinned_memory_for_block_swap): the CPU masters are
    pinned and copied directly; otherwise each copy goes through a pinned staging buffer per ring slot.
    """

    def __init__(self, device: torch.device, ring_size: int, nbytes: int, *, reuse_buffers: bool, pinned_masters: bool):
        self.device, self.pinned_masters = device, pinned_masters
        self.stream = torch.cuda.Stream(device=device)
        self.ring = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(ring_size)] \
            if reuse_buffers else None
        self.staging = None if pinned_masters else \
            [torch.empty(nbytes, dtype=torch.uint8).pin_memory() for _ in range(ring_size)]
        self.staging_done: list[torch.cuda.Event | None] = [None] * ring_size
        self.free = list(range(ring_size))
        self.in_flight: dict[int, tuple[int, list[torch.Tensor], torch.cuda.Event]] = {}

    def start(self, slot: SwappedBlock) -> None:
        ring_index = self.free.pop(0)
        compute = torch.cuda.current_stream(self.device)
        # a reused device buffer may still be read by kernels already queued on the compute stream
        self.stream.wait_stream(compute)
        sources = slot.masters
        if self.staging is not None:  # CPU -> pinned staging (host copy) once the previous H2D from it is done
            if self.staging_done[ring_index] is not None:
                self.staging_done[ring_index].synchronize()
            sources = views_in(self.staging[ring_index], slot)
            for s, m in zip(sources, slot.masters):
                s.copy_(m)
        with torch.cuda.stream(self.stream):
            targets = views_in(self.ring[ring_index], slot) if self.ring is not None else \
                [torch.empty_like(m, device=self.device) for m in slot.masters]
            for t, s in zip(targets, sources):
                t.copy_(s, non_blocking=True)
            done = self.stream.record_event()
        self.staging_done[ring_index] = done
        self.in_flight[slot.index] = (ring_index, targets, done)

    def ready(self, slot: SwappedBlock) -> list[torch.Tensor]:
        _, targets, done = self.in_flight[slot.index]
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(done)  # the GPU waits, not the host
        if self.ring is None:
            for t in targets:
                t.record_stream(compute)  # freed memory is reused only after the compute stream's use
        return targets

    def finish(self, slot: SwappedBlock) -> None:
        ring_index, _, _ = self.in_flight.pop(slot.index)
        self.free.append(ring_index)


def in_backward() -> bool:
    """Whether autograd's engine is running (a checkpointed block being recomputed)."""
    return torch._C._current_graph_task_id() != -1


class BlockSwapScheduler:
    """Orders the transfers of the swapped blocks around their forwards (see the module docstring)."""

    def __init__(self, slots: list[SwappedBlock], engine, ring_size: int,
                 expects_recompute: Callable[[], bool] = lambda: False):
        self.slots, self.engine, self.ring_size = slots, engine, ring_size
        self.expects_recompute = expects_recompute
        self.in_flight: list[int] = []  # started, in start order
        self.handles = []
        for slot in slots:
            self.handles.append(slot.block.register_forward_pre_hook(lambda m, a, k=slot.index: self.before(k)))
            self.handles.append(slot.block.register_forward_hook(lambda m, a, o, k=slot.index: self.after(k)))

    def next_after(self, k: int) -> int | None:
        """The swapped block that will run after block k."""
        last = len(self.slots) - 1
        if in_backward():
            return k - 1 if k > 0 else None
        if k < last:
            return k + 1
        return last if self.expects_recompute() else 0  # backward recomputes the last block first; else next step

    def before(self, k: int) -> None:
        self._start(k)
        self.slots[k].point_at(self.engine.ready(self.slots[k]))
        self._prefetch(self.next_after(k))

    def after(self, k: int) -> None:
        slot = self.slots[k]
        slot.point_at(slot.masters)
        self.engine.finish(slot)
        self.in_flight.remove(k)
        self._prefetch(self.next_after(k))

    def _start(self, k: int) -> None:
        if k in self.in_flight:
            return
        while len(self.in_flight) >= self.ring_size:  # a stale prefetch (a forward with no backward): drop it
            self.engine.finish(self.slots[self.in_flight.pop(0)])
        self.engine.start(self.slots[k])
        self.in_flight.append(k)

    def _prefetch(self, k: int | None) -> None:
        if k is not None and k not in self.in_flight and len(self.in_flight) < self.ring_size:
            self._start(k)

    def rebind(self) -> None:
        """The swapped blocks' modules now hold other tensors (Wan2.2's expert switch swaps whole parameter sets,
        the blocks' kept in CPU memory): drop the copies in flight, which are of the old tensors, and take the new
        tensors and their CPU data as the masters."""
        for k in list(self.in_flight):
            self.engine.finish(self.slots[k])
        self.in_flight.clear()
        for slot in self.slots:
            slot.tensors = list(slot.block.parameters()) + list(slot.block.buffers())
            slot.masters = [t.data for t in slot.tensors]
            if any(m.device.type != "cpu" for m in slot.masters):
                raise RuntimeError(f"block swap: swapped block {slot.index} was rebound to device tensors")

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for k in list(self.in_flight):
            self.engine.finish(self.slots[k])
        self.in_flight.clear()


@dataclass(frozen=True)
class BlockSwapOptions:
    """--use_pinned_memory_for_block_swap, --block_swap_h2d_only, --block_swap_ring_size."""

    pinned_memory: bool = False
    reuse_buffers: bool = False
    ring_size: int = 2

    @classmethod
    def from_args(cls, args) -> "BlockSwapOptions":
        return cls(pinned_memory=bool(getattr(args, "use_pinned_memory_for_block_swap", False)),
                   reuse_buffers=bool(getattr(args, "block_swap_h2d_only", False)),
                   ring_size=getattr(args, "block_swap_ring_size", None) or 2)


def last_blocks(blocks: list[nn.Module], count: int) -> list[nn.Module]:
    """--blocks_to_swap N for single-stream families (Wan): the last N blocks."""
    if not 0 < count < len(blocks):
        raise UserError(f"--blocks_to_swap {count}: this model has {len(blocks)} blocks; use 1 to {len(blocks) - 1}")
    return blocks[-count:]


def double_single_split(double: list[nn.Module], single: list[nn.Module], count: int,
                        keep: int = 1) -> list[nn.Module]:
    """--blocks_to_swap N for double + single stream families, the reference's rule (HunyuanVideo, FLUX,
    FramePack): the last N // 2 double blocks and the last (N - N // 2) * 2 + 1 single blocks (a single block is
    about half a double one), at least `keep` of each kind staying on the GPU (the reference: 1 for HunyuanVideo and
    FramePack, 2 for FLUX)."""
    def split(n: int) -> tuple[int, int]:
        return n // 2, (n - n // 2) * 2 + 1

    allowed = [n for n in range(1, len(double) + len(single))
               if split(n)[0] <= len(double) - keep and split(n)[1] <= len(single) - keep]
    if count not in allowed:
        hint = f"use 1 to {max(allowed)}" if allowed else "this model is too small to swap any"
        raise UserError(f"--blocks_to_swap {count}: swaps {split(count)[0]} double and {split(count)[1]} single "
                        f"blocks (N // 2 and (N - N // 2) * 2 + 1, as the reference); this model has {len(double)} "
                        f"double and {len(single)} single blocks and keeps at least {keep} of each on the device, "
                        f"so {hint}")
    swapped_double, swapped_single = split(count)
    return double[len(double) - swapped_double:] + single[len(single) - swapped_single:]


def enable_block_swap(model: nn.Module, blocks_to_swap: int, device: torch.device,
                      options: BlockSwapOptions = BlockSwapOptions(), engine=None,
                      blocks: list[nn.Module] | None = None) -> BlockSwapScheduler:
    """Move `model` to `device` except the swapped blocks, which stay in CPU memory and are swapped in around their
    forwards. blocks: the swapped blocks in execution order (the architecture's `swapped_blocks`; default: the last
    `blocks_to_swap` repeated blocks). `engine` overrides the transfer engine (tests)."""
    every = repeated_blocks(model)
    if not every:
        raise UserError(f"--blocks_to_swap: {type(model).__name__} declares no repeated blocks to swap")
    swapped = last_blocks(every, blocks_to_swap) if blocks is None else blocks
    resident = {id(t) for b in swapped for t in list(b.parameters()) + list(b.buffers())}
    for module in model.modules():  # everything else goes to the compute device
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if id(t) not in resident:
                t.data = t.data.to(device)
    cuda = device.type == "cuda"
    slots = [_swapped_block(i, block, pin=cuda and options.pinned_memory) for i, block in enumerate(swapped)]
    if engine is None:
        engine = CudaStreamEngine(device, options.ring_size, max(s.nbytes for s in slots),
                                  reuse_buffers=options.reuse_buffers, pinned_masters=options.pinned_memory) \
            if cuda else SyncEngine(device)
    scheduler = BlockSwapScheduler(slots, engine, options.ring_size,
                                   expects_recompute=lambda: torch.is_grad_enabled() and model.training
                                   and bool(getattr(model, "is_gradient_checkpointing", False)))
    logger.info("block swap (--blocks_to_swap %d): %d of %d blocks kept in CPU memory (%s engine, at most %d "
                "resident)", blocks_to_swap, len(swapped), len(every), type(engine).__name__, options.ring_size)
    model.__dict__[SCHEDULER_ATTRIBUTE] = scheduler  # not a submodule: found by `block_swap_of`
    return scheduler


SCHEDULER_ATTRIBUTE = "_musubi_block_swap"


def block_swap_of(model: nn.Module) -> BlockSwapScheduler | None:
    """The scheduler `enable_block_swap` attached to `model`, or None without block swap."""
    return model.__dict__.get(SCHEDULER_ATTRIBUTE)


def _swapped_block(index: int, block: nn.Module, pin: bool) -> SwappedBlock:
    tensors = list(block.parameters()) + list(block.buffers())
    masters = []
    for t in tensors:
        cpu = t.data.to("cpu")
        masters.append(cpu.pin_memory() if pin else cpu)
        t.data = masters[-1]
    offsets, nbytes = flat_layout(masters)
    return SwappedBlock(index, block, tensors, masters, offsets, nbytes)
