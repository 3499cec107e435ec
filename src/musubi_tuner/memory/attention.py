"""Attention backend and torch.compile choices, applied through diffusers' own model APIs."""

from __future__ import annotations

import logging

from torch import nn

from musubi_tuner.errors import UserError

logger = logging.getLogger(__name__)

# reference flag / --attn_mode value -> diffusers attention backend (None: PyTorch SDPA, the default)
ATTENTION_BACKENDS = {
    "sdpa": None, "torch": None,
    "flash_attn": "flash", "flash": "flash", "flash2": "flash",
    "flash3": "_flash_3",
    "xformers": "xformers",
    "sageattn": "sage", "sage_attn": "sage",
}


def apply_attention_backend(dit: nn.Module, mode: str, flag: str) -> None:
    """Route the DiT's attention to `mode`; a backend whose package is missing is a clear error."""
    if mode not in ATTENTION_BACKENDS:
        raise UserError(f"{flag} {mode!r} is unknown; choose one of: {', '.join(ATTENTION_BACKENDS)}")
    backend = ATTENTION_BACKENDS[mode]
    if backend is None:
        return
    try:
        dit.set_attention_backend(backend)
    except Exception as exc:  # diffusers raises RuntimeError/ImportError/ValueError when the kernel is unavailable
        raise UserError(f"{flag}: attention backend {mode} is not usable here ({exc}); "
                        "install its package or use --sdpa") from exc
    logger.info("attention backend: %s", backend)


def compile_dit(dit: nn.Module, *, backend: str = "inductor", mode: str | None = None, dynamic: bool | None = None,
                fullgraph: bool = False) -> None:
    """torch.compile each repeated transformer block (diffusers' `compile_repeated_blocks`): fast to compile,
    and the LoRA wrappers inside the blocks are compiled with them."""
    kwargs = {"backend": backend, "fullgraph": fullgraph}
    if mode and mode != "default":
        kwargs["mode"] = mode
    if dynamic is not None:
        kwargs["dynamic"] = dynamic
    dit.compile_repeated_blocks(**kwargs)
    logger.info("compiled the repeated blocks with %s", kwargs)


def compile_dit_from_flags(dit: nn.Module, args) -> None:
    """`--compile` with `--compile_backend/_mode/_dynamic/_fullgraph/_cache_size_limit` (training and generation)."""
    import torch

    if args.compile_cache_size_limit:
        torch._dynamo.config.cache_size_limit = args.compile_cache_size_limit
    dynamic = {"true": True, "false": False}.get(args.compile_dynamic or "auto")
    compile_dit(dit, backend=args.compile_backend, mode=args.compile_mode, dynamic=dynamic,
                fullgraph=args.compile_fullgraph)
