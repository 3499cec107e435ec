"""--blocks_to_swap: the swapped blocks keep their weights in CPU memory between calls, and nothing else changes."""

import pytest
import torch

from musubi_tuner.architectures.wan.tiny import make_tiny_dit
from musubi_tuner.errors import UserError
from musubi_tuner.memory.block_swap import enable_block_swap, repeated_blocks


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 2, 8, 8, generator=gen), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 12, 32, generator=gen), return_dict=False)


def test_outputs_and_gradients_are_unchanged_and_weights_return_to_cpu_storage():
    reference, swapped = make_tiny_dit(), make_tiny_dit()
    inputs = _inputs()
    expected = reference(**inputs)[0]
    handles = enable_block_swap(swapped, 1, torch.device("cpu"))
    last = repeated_blocks(swapped)[-1]
    storage = [p.data_ptr() for p in last.parameters()]
    seen = []
    last.register_forward_pre_hook(lambda m, a: seen.append([p.data_ptr() for p in m.parameters()]))
    assert torch.equal(swapped(**inputs)[0], expected)
    assert seen and [p.data_ptr() for p in last.parameters()] == storage  # back on the CPU copies after the call
    for handle in handles:
        handle.remove()


def test_training_with_checkpointing_gives_the_same_gradients():
    results = []
    for swap in (0, 1):
        model = make_tiny_dit()
        model.enable_gradient_checkpointing()
        model.train()
        if swap:
            enable_block_swap(model, swap, torch.device("cpu"))
        x = _inputs()["hidden_states"].requires_grad_(True)
        out = model(**{**_inputs(), "hidden_states": x})[0]
        out.square().mean().backward()
        results.append(x.grad.clone())
    assert torch.equal(results[0], results[1])


def test_a_swap_count_out_of_range_names_the_flag():
    with pytest.raises(UserError, match="--blocks_to_swap 2: this model has 2 blocks"):
        enable_block_swap(make_tiny_dit(), 2, torch.device("cpu"))
