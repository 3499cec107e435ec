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


# processor arguments that carry one row per batch item; everything else (rotary tables, flags) is shared
BATCHED_ARGUMENTS = ("hidden_states", "encoder_hidden_states", "attention_mask", "encoder_attention_mask")


class SplitAttentionProcessor:
    """--split_attn: runs the wrapped diffusers attention processor once per batch item and concatenates the
    results, so the attention's working memory (scores, or a kernel's workspace) is one sample's, not the batch's.
    Per item the computation is the same; results equal the batched call's up to the kernels' row blocking."""

    def __init__(self, inner):
        import inspect

        self.inner = inner
        self.signature = inspect.signature(inner.__call__)

        # diffusers hands a processor only the keyword arguments its `__call__` names (it inspects
        # `processor.__call__`): show the wrapped processor's parameters there, or HunyuanVideo's
        # `image_rotary_emb` would be dropped silently. Calls still go through the class's __call__.
        def call(*args, **kwargs):
            return type(self).__call__(self, *args, **kwargs)

        call.__signature__ = self.signature
        self.__dict__["__call__"] = call

    def __getattr__(self, name):  # `_attention_backend`, `_parallel_config` ... are the wrapped processor's
        return getattr(self.__dict__["inner"], name)

    def __call__(self, attn, *args, **kwargs):
        import torch

        bound = self.signature.bind(attn, *args, **kwargs)
        batch = bound.arguments["hidden_states"].shape[0]
        if batch == 1:
            return self.inner(attn, *args, **kwargs)
        outputs = []
        for i in range(batch):
            item = {name: value[i:i + 1] if name in BATCHED_ARGUMENTS and torch.is_tensor(value)
                    and value.shape[0] == batch else value for name, value in bound.arguments.items()}
            item.pop("self", None)
            outputs.append(self.inner(**item))
        if isinstance(outputs[0], tuple):  # joint attention returns (image tokens, text tokens)
            return tuple(torch.cat(parts) for parts in zip(*outputs))
        return torch.cat(outputs)


def apply_split_attention(dit: nn.Module) -> int:
    """Wrap every attention module's processor in `SplitAttentionProcessor` (after the backend is chosen, so the
    wrapped processor keeps it). Returns the number of attention modules wrapped."""
    wrapped = 0
    for module in dit.modules():
        processor = getattr(module, "processor", None)
        if processor is None or not callable(processor) or not hasattr(module, "set_processor"):
            continue
        if not isinstance(processor, SplitAttentionProcessor):  # wrapping twice would split nothing more
            module.set_processor(SplitAttentionProcessor(processor))
        wrapped += 1
    if not wrapped:
        raise UserError(f"--split_attn: {type(dit).__name__} has no attention processors to split")
    logger.info("split attention: %d attention modules run one batch item at a time", wrapped)
    return wrapped


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
